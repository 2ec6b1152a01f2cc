"""The device images (amd64, and arm64 when asked for), built from Debian packages and booted
in real QEMU (software emulation: no KVM), enroll with a real hub on the host by themselves,
take a deployment and answer a scoring request from the host through a forwarded port.

QEMU's user networking puts the host at 10.0.2.2 inside the guest (the hub listens on the
host's loopback, which the guest reaches there). The hub runs TLS, with --public-url
https://10.0.2.2:PORT: its certificate then names 10.0.2.2 and it tells devices to use
mqtts://10.0.2.2:MQTT_PORT; the enrollment file's token pins the hub's CA. The image is the
session's (tests/firmwareimage.py: built, or the same inputs' image from the cache). The
boot-to-online time is printed (pytest -s) and recorded in firmware-images/README.md;
nothing here asserts a duration. The arm64 case (qemu-system-aarch64, UEFI from
qemu-efi-aarch64) is opt-in, EDGEFLEET_FIRMWARE_ARM64=1 (tests/firmwareimage.py says why).
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from agentproc import deploy, enrollment_token, publish_version, wait_for
from contract import enrollment, tls
from firmwareimage import AMD64_CLASS, ARM64_CLASS, BUILD_TIMEOUT, arm64_opt_in
from hubproc import EDGEFLEET, HubProcess, free_port, start_hub, stop_process
from packager.firmware import disk
from packager.samples import expected_linear, make_onnx

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT)]
GUEST_HOST = "10.0.2.2"  # the host, as QEMU's user network shows it to the guest
ROWS = [[1.0, 2.0, 3.0]]


@dataclass(frozen=True)
class Machine:
    """How QEMU emulates a class's device: its command up to the disk and the network."""

    device_class: str
    qemu: tuple[str, ...]


MACHINES = {
    AMD64_CLASS: Machine(AMD64_CLASS, (
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "1536", "-smp", "1",
        # numpy needs x86-64-v2 (SSE4.2, POPCNT) at least; TCG's default CPU has less.
        "-cpu", "max", "-bios", "/usr/share/ovmf/OVMF.fd")),
    # UEFI (edk2 for arm64, qemu-efi-aarch64) on the virt machine; cortex-a57: an ARMv8.0
    # core, as the wheels expect at least, and cheaper to emulate than -cpu max (pointer
    # authentication). Two vCPUs: TCG runs each on its own host thread.
    ARM64_CLASS: Machine(ARM64_CLASS, (
        "qemu-system-aarch64", "-machine", "virt", "-accel", "tcg", "-m", "1536", "-smp", "2",
        "-cpu", "cortex-a57", "-bios", "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")),
}
BOOTED = [
    pytest.param(MACHINES[AMD64_CLASS], id="amd64"),
    pytest.param(MACHINES[ARM64_CLASS], id="arm64", marks=arm64_opt_in),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """The hub as the guests reach it: https://10.0.2.2:PORT, in its certificate."""
    port = free_port()
    process = start_hub(tmp_path_factory.mktemp("hub") / "data", port=port,
                        extra_args=("--public-url", f"https://{GUEST_HOST}:{port}"))
    assert process.tls
    yield process
    assert process.stop() == 0, process.log()


def guest_config(hub: HubProcess, **token: object) -> enrollment.EnrollmentConfig:
    return enrollment.EnrollmentConfig(hub=f"https://{GUEST_HOST}:{hub.port}",
                                       token=enrollment_token(hub, **token))


def enrolled_copy(image: Path, copy: Path, config: enrollment.EnrollmentConfig) -> Path:
    """A copy of IMAGE (sparse) with CONFIG's enrollment file on its boot partition."""
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    done = subprocess.run([*EDGEFLEET, "firmware", "enroll", str(copy), "-"],
                          input=enrollment.render(config), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return copy


def start_vm(machine: Machine, disk: Path, console: Path,
             port: int) -> subprocess.Popen[bytes]:
    """DISK booted in QEMU; the guest's scoring port 8500 is the host's PORT."""
    return subprocess.Popen([
        *machine.qemu, "-display", "none", "-no-reboot", "-serial", f"file:{console}",
        "-drive", f"file={disk},format=raw,if=virtio",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:8500",
        "-device", "virtio-net-pci,netdev=net0",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class Booted:
    disk: Path
    port: int  # the host's port forwarded to the guest's scoring port
    api_key: str  # the scoring API's key in the enrollment file
    console: Path  # the guest's serial console, logged
    known: frozenset[str]  # the hub's device ids before the guest booted


@pytest.fixture(params=BOOTED)
def booted(request: pytest.FixtureRequest, firmware_image: Callable[[str], Path],
           hub: HubProcess, tmp_path: Path) -> Iterator[Booted]:
    """A copy of a class's image with an enrollment file on its boot partition, running in
    QEMU."""
    machine: Machine = request.param
    api_key = secrets.token_urlsafe(24)
    config = replace(guest_config(hub), serving_api_key=api_key)
    assert config.token is not None
    assert tls.split_token(config.token)[1] == tls.fingerprint(hub.ca_path.read_text())
    copy = enrolled_copy(firmware_image(machine.device_class), tmp_path / "disk.img", config)
    vm = Booted(copy, free_port(), api_key, tmp_path / "console.log",
                frozenset(d["id"] for d in devices(hub)))
    qemu = start_vm(machine, vm.disk, vm.console, vm.port)
    try:
        yield vm
    finally:
        stop_process(qemu, timeout=10)


def devices(hub: HubProcess) -> list[dict]:
    answer = httpx.get(f"{hub.url}/api/v1/devices", timeout=10,
                       headers={"Authorization": f"Bearer {hub.admin_token}"})
    answer.raise_for_status()
    return answer.json()


def test_the_image_boots_enrolls_by_itself_and_serves_a_deployed_model(
        booted: Booted, hub: HubProcess, tmp_path: Path) -> None:
    started = time.monotonic()

    def online() -> dict | None:
        return next((d for d in devices(hub)
                     if d["status"] == "online" and d["id"] not in booted.known), None)

    device = wait_for(online, timeout=1800, what="the booted image to come online")
    print(f"\nboot to online: {time.monotonic() - started:.0f} s")
    log = booted.console.read_text(errors="replace")
    assert f"enrollment for https://{GUEST_HOST}:{hub.port}" in log

    version = publish_version(hub, "tiny", make_onnx(tmp_path / "model.onnx"))
    deploy(hub, device["id"], f"tiny:{version}")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ROWS[0]}]}

    def scored() -> dict | None:
        try:
            answer = httpx.post(f"http://127.0.0.1:{booted.port}/v2/models/tiny/infer",
                                json=body, timeout=30,
                                headers={"Authorization": f"Bearer {booted.api_key}"})
        except httpx.TransportError:
            return None
        return answer.json() if answer.status_code == 200 else None

    deploy_started = time.monotonic()
    answer = wait_for(scored, timeout=1800, what="the device to serve tiny")
    print(f"deploy to serving: {time.monotonic() - deploy_started:.0f} s")
    expected = expected_linear(np.array(ROWS, dtype=np.float32)).ravel().tolist()
    assert answer["outputs"][0]["data"] == pytest.approx(expected, rel=1e-5)
    # The token left the boot partition at first boot.
    assert "enrollment.conf" not in disk.list_enrollment_dir(booted.disk)


def test_two_devices_flashed_from_one_enrolled_image_get_two_identities(
        amd64_image: Path, hub: HubProcess, tmp_path: Path) -> None:
    before = {d["id"] for d in devices(hub)}
    flashed = enrolled_copy(amd64_image, tmp_path / "flashed.img", guest_config(hub, max_uses=2))
    machines = []
    try:
        for number in (1, 2):
            card = tmp_path / f"card{number}.img"
            subprocess.run(["cp", "--sparse=always", str(flashed), str(card)], check=True)
            machines.append(start_vm(MACHINES[AMD64_CLASS], card,
                                     tmp_path / f"console{number}.log", free_port()))

        def both_online() -> set[str] | None:
            new = {d["id"] for d in devices(hub) if d["status"] == "online"} - before
            return new if len(new) == 2 else None

        assert len(wait_for(both_online, timeout=1800, what="both devices online")) == 2
    finally:
        for machine in machines:
            stop_process(machine, timeout=10)
