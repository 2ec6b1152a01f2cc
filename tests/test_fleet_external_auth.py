"""An external Mosquitto set up as docs/architecture.md says: password file and `pattern` ACL."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

import bench.harness as fixture  # the module whose CONFIG starts the broker
from agent.mqtt import MqttTimeout
from agentproc import wait_for
from conftest import Cli
from contract import protocol
from fleetdevice import connect, enroll, tiny_packages
from hubproc import EDGEFLEET, start_hub

DOCS = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def documented_acl() -> str:
    return DOCS.read_text().split("# /etc/mosquitto/acl\n", 1)[1].split("```", 1)[0]


def add_user(passwd: Path, user: str, password: str) -> None:
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)


def test_the_documented_mosquitto_setup_lets_the_hub_and_devices_in_and_no_further(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    passwd, acl = directory / "passwd", directory / "acl"
    passwd.touch()
    add_user(passwd, "edgefleet-hub", "hub-secret")
    acl.write_text(documented_acl())
    monkeypatch.setattr(fixture, "CONFIG", fixture.CONFIG.replace(
        "allow_anonymous true",
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}"))
    broker = fixture.start_mosquitto(directory)
    hub = start_hub(tmp_path / "data", extra_args=(
        "--mqtt-url", broker.url, "--mqtt-username", "edgefleet-hub",
        "--mqtt-password", "hub-secret"))
    try:
        cli = Cli(hub, tmp_path)
        auth = {"Authorization": f"Bearer {hub.admin_token}"}
        fleet = f"{hub.url}/api/v1/fleet/status"
        wait_for(lambda: httpx.get(fleet, headers=auth).json()["connected"], what="the hub in")
        tiny_packages(hub, cli, tmp_path)
        enrollment, other = enroll(hub, "cam"), enroll(hub, "other")
        # The provisioning step the docs describe, then a reload.
        add_user(passwd, enrollment["mqtt"]["username"], enrollment["mqtt"]["password"])
        assert broker.process is not None
        broker.process.send_signal(signal.SIGHUP)

        device = connect(enrollment)
        device.session.wait_connected(15)
        cli.run("deploy", "tiny:1", "--device", device.id)
        assert device.desired().generation == 1
        device.telemetry(range(1, 4))
        points = f"{hub.url}/api/v1/devices/{device.id}/telemetry"
        wait_for(lambda: len(httpx.get(points, headers=auth).json()) == 3, what="telemetry")
        # Mosquitto grants the subscription but delivers nothing past the ACL.
        device.session.subscribe(protocol.desired_topic(other["device"]["id"]))
        cli.run("deploy", "tiny:1", "--device", other["device"]["id"])
        shown = f"{hub.url}/api/v1/devices/{other['device']['id']}"
        wait_for(lambda: httpx.get(shown, headers=auth).json()["published_generation"] == 1,
                 what="the other device's state on the broker")
        with pytest.raises(MqttTimeout):
            device.session.get(2)
        device.session.close()
    finally:
        assert hub.stop() == 0, hub.log()
        broker.stop()


@pytest.mark.parametrize("args, complaint", [
    (("--mqtt-username", "hub"), "are for a --mqtt-url broker"),
    (("--mqtt-url", "mqtt://127.0.0.1:1", "--mqtt-password", "x"), "needs --mqtt-username"),
    (("--desired-validity-days", "0"), "must be 1-3650"),
    (("--mqtt-url", "mqtt://127.0.0.1:1", "--mosquitto", "/usr/sbin/mosquitto"),
     "--mosquitto is for the broker the hub runs"),
    (("--heartbeat-seconds", "0"), "must be 1-3600"),
    (("--mqtt-max-queued-messages", "5"), "must be 100-100000000"),
])
def test_bad_broker_settings_are_usage_errors(tmp_path: Path, args: tuple[str, ...],
                                              complaint: str) -> None:
    done = subprocess.run([*EDGEFLEET, "hub", "serve", "--data-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and complaint in done.stderr
