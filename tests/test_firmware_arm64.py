"""The arm64 class's root filesystem, built from Debian's arm64 packages through qemu-user
(binfmt), holds the agent for arm64 and its services, and no identity or token."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from firmwareimage import BUILD_TIMEOUT
from hubproc import EDGEFLEET
from packager.base import can_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(BUILD_TIMEOUT),
    pytest.mark.skipif(not can_run("arm64"), reason="this kernel has no qemu-aarch64 binfmt "
                       "handler (apt-get install qemu-user-static binfmt-support)"),
]
CLASS = "generic-arm64"
AARCH64 = 183  # ELF e_machine


def test_the_arm64_root_filesystem_has_the_agent_and_its_services(tmp_path: Path) -> None:
    done = subprocess.run([*EDGEFLEET, "firmware", "build", CLASS, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, done.stderr
    print(f"\n{done.stdout.strip()}")
    with tarfile.open(tmp_path / f"{CLASS}-rootfs.tar") as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        image = json.load(tar.extractfile(members["etc/edgefleet/image.json"]))  # type: ignore[arg-type]
        machine_id = tar.extractfile(members["etc/machine-id"]).read()  # type: ignore[union-attr]
        runtime = next(m for n, m in members.items()
                       if n.startswith("opt/edgefleet/lib/python3.11/site-packages/onnxruntime/")
                       and n.endswith(".so") and m.isfile())
        header = tar.extractfile(runtime).read(20)  # type: ignore[union-attr]
    assert image["class"] == CLASS and image["platform"] == "linux/arm64"
    assert machine_id == b""
    assert int.from_bytes(header[18:20], "little") == AARCH64
    for path in ("opt/edgefleet/bin/python", "etc/systemd/system/edgefleet-agent.service",
                 "etc/systemd/system/edgefleet-enrollment.service",
                 "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service",
                 "usr/lib/sysusers.d/edgefleet.conf"):
        assert path in members, path
    assert "etc/edgefleet/enrollment.conf" not in members
    assert not any(n.startswith("var/lib/edgefleet/") for n in members)
    packages = (tmp_path / f"{CLASS}.packages.txt").read_text()
    assert "\npython3\t" in packages and "\tarm64\n" in packages
    assert "\nonnxruntime\t" in packages and "\nai_edge_litert\t" in packages
