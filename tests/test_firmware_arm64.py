"""The arm64 class's disk image, built from Debian's arm64 packages through qemu-user
(binfmt), has the arm64 layout (systemd-boot's AA64 loader, the arm64 root partition type)
and holds the agent for arm64 and its services, and no identity or token. Its root
partition is read with debugfs (tests/firmwareimage.py), without mounting it. Opt-in:
EDGEFLEET_FIRMWARE_ARM64=1 (the build takes ~35 min here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firmwareimage import BUILD_TIMEOUT, RootPartition, arm64_opt_in
from packager.base import can_run
from packager.firmware import disk

pytestmark = [
    pytest.mark.slow,
    arm64_opt_in,
    pytest.mark.timeout(BUILD_TIMEOUT),
    pytest.mark.skipif(not can_run("arm64"), reason="this kernel has no qemu-aarch64 binfmt "
                       "handler (apt-get install qemu-user-static binfmt-support)"),
]
CLASS = "generic-arm64"
AARCH64 = 183  # ELF e_machine
SITE = "opt/edgefleet/lib/python3.11/site-packages"


def test_the_arm64_image_has_the_agent_and_its_services(arm64_image: Path) -> None:
    info = json.loads(arm64_image.with_suffix(".json").read_text())
    assert info["class"] == CLASS and info["platform"] == "linux/arm64"
    assert disk.list_enrollment_dir(arm64_image) == ["README.txt"]
    root = RootPartition(arm64_image)
    assert root.type == disk.BOOT_PLATFORMS["linux/arm64"].root_type
    image = json.loads(root.read("etc/edgefleet/image.json"))
    assert image["class"] == CLASS and image["platform"] == "linux/arm64"
    assert root.read("etc/machine-id") == b""
    library = next(n for n in root.names(f"{SITE}/onnxruntime/capi") if n.endswith(".so"))
    header = root.read(f"{SITE}/onnxruntime/capi/{library}")[:20]
    assert int.from_bytes(header[18:20], "little") == AARCH64
    for path in ("opt/edgefleet/bin/python", "etc/systemd/system/edgefleet-agent.service",
                 "etc/systemd/system/edgefleet-enrollment.service",
                 "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service",
                 "usr/lib/sysusers.d/edgefleet.conf", disk.BOOT_PLATFORMS["linux/arm64"].loader):
        assert root.exists(path), path
    assert not root.exists("etc/edgefleet/enrollment.conf")
    if root.exists("var/lib/edgefleet"):
        assert root.names("var/lib/edgefleet") == []  # no identity yet
    packages = arm64_image.with_name(f"{CLASS}.packages.txt").read_text()
    assert "\npython3\t" in packages and "\tarm64\n" in packages
    assert "\nlinux-image-arm64\t" in packages and "\nsystemd-boot-efi\t" in packages
    assert "\nonnxruntime\t" in packages and "\nai_edge_litert\t" in packages
