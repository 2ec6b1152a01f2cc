"""Where the agent puts the hub's CA for the container engine's pulls (agent/container/trust.py).

The engines reading it at pull time, and refusing another CA, are in
tests/test_container_engine.py and tests/test_container_agent.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.container.trust import CERTS_DIRS, RegistryTrust, TrustError, check_setting
from hubproc import EDGEFLEET


def test_the_ca_goes_where_each_engine_reads_it(tmp_path: Path) -> None:
    ca = tmp_path / "hub-ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    auto = RegistryTrust(ca, "hub.lan:8080")
    assert auto.path("podman") == Path("/etc/containers/certs.d/hub.lan:8080/ca.crt")
    assert auto.path("docker") == Path("/etc/docker/certs.d/hub.lan:8080/ca.crt")
    assert set(CERTS_DIRS) == {"podman", "docker"}
    assert RegistryTrust(ca, "hub.lan:8080", "off").install("docker") is None

    chosen = RegistryTrust(ca, "10.0.0.5:8080", str(tmp_path / "certs.d"))
    written = chosen.install("podman")
    assert written == tmp_path / "certs.d" / "10.0.0.5:8080" / "ca.crt"
    assert written.read_bytes() == ca.read_bytes() and written.stat().st_mode & 0o777 == 0o644
    os.utime(written, (1, 1))
    chosen.install("podman")
    assert written.stat().st_mtime == 1   # unchanged: not written again
    ca.write_bytes(b"another CA\n")       # the hub's CA as the agent pins it now
    chosen.install("podman")
    assert written.read_bytes() == b"another CA\n"


def test_a_directory_that_cannot_be_written_is_one_line_naming_the_path(tmp_path: Path) -> None:
    ca = tmp_path / "hub-ca.pem"
    ca.write_text("ca")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(TrustError) as failed:
        RegistryTrust(ca, "hub:8080", str(blocked)).install("docker")
    message = str(failed.value)
    assert f"{blocked}/hub:8080/ca.crt" in message and "--engine-certs-dir off" in message
    assert "\n" not in message


def test_the_setting_is_auto_off_or_an_absolute_directory(tmp_path: Path) -> None:
    assert check_setting("auto") == "auto" and check_setting("/etc/x") == "/etc/x"
    with pytest.raises(ValueError, match="absolute directory"):
        check_setting("certs.d")
    answer = subprocess.run([*EDGEFLEET, "agent", "run", "--mode", "container",
                             "--engine-certs-dir", "relative", "--data-dir", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=60)
    assert answer.returncode == 2 and "--engine-certs-dir" in answer.stderr
