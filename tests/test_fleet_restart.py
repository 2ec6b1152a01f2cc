"""Restarts and outages: the hub publishes what the broker is missing, and nothing else."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from agent.mqtt import MqttTimeout
from agentproc import wait_for
from conftest import Cli
from contract import protocol
from fleetdevice import connect, enroll, tiny_packages
from hubproc import HubProcess, start_hub
from mosquitto import Mosquitto, mosquitto  # noqa: F401  (mosquitto: the fixture)


def fleet(hub: HubProcess) -> dict:
    answer = httpx.get(f"{hub.url}/api/v1/fleet/status",
                       headers={"Authorization": f"Bearer {hub.admin_token}"})
    answer.raise_for_status()
    return answer.json()


def test_a_restart_republishes_nothing_and_a_deploy_during_an_outage_arrives_after_it(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    args = ("--mqtt-url", mosquitto.url)
    hub = start_hub(tmp_path / "data", extra_args=args)
    try:
        cli = Cli(hub, tmp_path)
        tiny_packages(hub, cli, tmp_path)
        device = connect(enroll(hub, "cam"))
        cli.run("deploy", "tiny:1", "--device", device.id)
        assert device.desired().generation == 1
        assert hub.stop() == 0

        hub = start_hub(tmp_path / "data", extra_args=args)
        cli = Cli(hub, tmp_path)
        wait_for(lambda: fleet(hub)["connected"], what="the hub's broker connection")
        with pytest.raises(MqttTimeout):
            device.session.get(1)
        assert fleet(hub)["desired"]["published"] == 0
        # The broker kept the retained state for devices that come (back) later.
        later = connect(device.enrollment, client_id=device.id + "-again")
        assert later.desired().generation == 1
        later.session.close()

        mosquitto.stop()
        started = time.monotonic()
        cli.run("deploy", "tiny:2", "--device", device.id)
        assert time.monotonic() - started < 5  # the API does not wait for the broker
        mosquitto.start()
        assert device.desired_generation(2).deployments[0].version == 2
        assert fleet(hub)["desired"]["published"] == 1
        device.session.close()
    finally:
        assert hub.stop() == 0, hub.log()


def test_the_managed_broker_keeps_logins_and_desired_states_across_a_hub_restart(
        tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "data")
    try:
        cli = Cli(hub, tmp_path)
        tiny_packages(hub, cli, tmp_path)
        device = connect(enroll(hub, "cam"))
        cli.run("deploy", "tiny:1", "--device", device.id)
        assert device.desired().generation == 1
        assert hub.stop() == 0

        hub = start_hub(tmp_path / "data", port=hub.port, mqtt_port=hub.mqtt_port)
        # The device's login survived, and so did its retained state (sent
        # again on its resubscribe), which the hub did not publish again.
        device.session.wait_connected(30)
        wait_for(lambda: fleet(hub)["connected"], what="the hub's broker connection")
        with pytest.raises(protocol.ProtocolRefusal, match="already_applied"):
            device.desired()
        assert fleet(hub)["desired"]["published"] == 0
        cli.run("deploy", "tiny:2", "--device", device.id)
        assert device.desired().generation == 2
        device.session.close()
    finally:
        assert hub.stop() == 0, hub.log()
