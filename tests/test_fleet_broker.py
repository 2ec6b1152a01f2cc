"""The managed broker under attack and failure: takeovers, floods, deleted devices, a frozen
or dead broker. A real hub with its Mosquitto, real MQTT sessions."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from agent.mqtt import MqttError, MqttTimeout, Session
from agentproc import wait_for
from conftest import Cli
from contract import protocol, signing
from fleetdevice import FAST, FakeDevice, connect, enroll, tiny_packages
from hubproc import EDGEFLEET, HubProcess, start_hub


@pytest.fixture(scope="module")
def fleet_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, Cli]]:
    base = tmp_path_factory.mktemp("broker")
    hub = start_hub(base / "data", extra_args=("--heartbeat-seconds", "1"))
    cli = Cli(hub, base)
    tiny_packages(hub, cli, base)
    yield hub, cli
    assert hub.stop() == 0, hub.log()


@pytest.fixture
def api(fleet_hub: tuple[HubProcess, Cli]) -> Iterator[httpx.Client]:
    hub, _ = fleet_hub
    with httpx.Client(base_url=hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as client:
        yield client


@pytest.fixture
def device(fleet_hub: tuple[HubProcess, Cli], request: pytest.FixtureRequest
           ) -> Iterator[FakeDevice]:
    fake = connect(enroll(fleet_hub[0], request.node.name[:60]))
    fake.session.wait_connected(15)
    yield fake
    fake.session.close()


def status(api: httpx.Client) -> dict[str, Any]:
    answer = api.get("/api/v1/fleet/status")
    answer.raise_for_status()
    return dict(answer.json())


def refused(hub: HubProcess, **options: Any) -> str:
    with Session(f"mqtt://127.0.0.1:{hub.mqtt_port}", backoff=FAST, **options) as session:
        with pytest.raises(MqttTimeout) as failure:
            session.wait_connected(1)
    return str(failure.value)


def test_a_hostile_connect_with_the_hubs_or_a_devices_client_id_takes_over_nothing(
        fleet_hub: tuple[HubProcess, Cli], api: httpx.Client, device: FakeDevice) -> None:
    hub, cli = fleet_hub
    token = device.enrollment["mqtt"]["password"]
    for client_id, username, password in (
            ("edgefleet-hub", "edgefleet-hub", "wrong"),
            ("edgefleet-hub", None, None),
            ("edgefleet-hub", "edgefleet-canary", "wrong"),
            (device.id, device.id, "efd_wrong"),
            (device.id, None, None)):
        assert "refused" in refused(hub, client_id=client_id, username=username,
                                    password=password)
    # A device's own login with the hub's client id is let in, as that device:
    # the broker names each client by its login.
    with Session(f"mqtt://127.0.0.1:{hub.mqtt_port}", client_id="edgefleet-hub",
                 username=device.id, password=token, backoff=FAST) as renamed:
        renamed.wait_connected(15)
    device.session.wait_connected(15)  # it was that device's session that moved, briefly
    # Both sessions survived: telemetry flows in and the next desired state flows out.
    device.telemetry(range(1, 4))
    wait_for(lambda: len(api.get(f"/api/v1/devices/{device.id}/telemetry").json()) == 3,
             what="the device's telemetry")
    cli.run("deploy", "tiny:1", "--device", device.id)
    assert device.desired().generation == 1
    now = status(api)
    assert now["connected"] and now["receiving"] and now["broker"]["restarts"] == 0


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_a_device_flooding_big_retained_messages_is_cut_off_and_nothing_piles_up(
        fleet_hub: tuple[HubProcess, Cli], api: httpx.Client, device: FakeDevice) -> None:
    hub, _ = fleet_hub
    # Over the packet limit: refused, and the connection is dropped. (A session
    # of its own: a Session sends an unacknowledged message again after every reconnect.)
    login = device.enrollment["mqtt"]
    for _ in range(3):
        with Session(login["url"], client_id=device.id, username=device.id,
                     password=login["password"], backoff=FAST) as flood:
            with pytest.raises(MqttError):
                flood.publish(protocol.telemetry_topic(device.id), b"x" * (8 * 2**20),
                              retain=True, timeout=5)
    # Under it, on its own topics: each topic keeps one retained message, the
    # newest, so a flood of sixty MiB leaves about two behind. Measured over a
    # second flood, after a first one has warmed the allocators up (what it keeps
    # of the first flood's buffers varies from run to run, 8 to 33 MiB seen):
    # were the messages piling up, the second would add sixty MiB more.
    device.session.wait_connected(15)
    broker_pid = status(api)["broker"]["pid"]
    almost = b"x" * (protocol.MAX_TELEMETRY_BYTES - 100)

    def dropped() -> int:
        counts = status(api)["ingest"]["dropped"]
        return sum(counts.get(kind, {}).get("malformed", 0) for kind in ("telemetry", "reported"))

    def flood() -> None:
        already = dropped()
        for i in range(60):
            topic = (protocol.telemetry_topic, protocol.reported_topic)[i % 2](device.id)
            device.session.publish(topic, almost, retain=True, timeout=30)
        # Under its commands topic, a level per made-up id: refused outright by the ACL.
        for i in range(5):
            device.session.publish(f"{protocol.commands_topic(device.id)}/c{i}/result", almost,
                                   retain=True, timeout=30)
        wait_for(lambda: dropped() >= already + 60, what="the whole flood read and dropped",
                 timeout=120)

    flood()
    hub_before, broker_before = rss(hub.process.pid), rss(broker_pid)
    flood()
    grown_hub = rss(hub.process.pid) - hub_before
    grown_broker = rss(broker_pid) - broker_before
    print(f"hub RSS +{grown_hub / 2**20:.1f} MiB, broker RSS +{grown_broker / 2**20:.1f} MiB")
    grown = f"hub +{grown_hub / 2**20:.1f} MiB, broker +{grown_broker / 2**20:.1f} MiB"
    assert grown_hub < 32 * 2**20, grown
    assert grown_broker < 16 * 2**20, grown  # not sixty
    assert status(api)["receiving"]


def test_a_deleted_device_is_dropped_and_refused_at_once(
        fleet_hub: tuple[HubProcess, Cli], api: httpx.Client, device: FakeDevice) -> None:
    hub, cli = fleet_hub
    cli.run("deploy", "tiny:1", "--device", device.id)
    assert device.desired().generation == 1
    token = device.enrollment["device_token"]
    pull = f"{hub.url}/v2/models/tiny/tags/list"
    assert httpx.get(pull, headers={"Authorization": f"Bearer {token}"}).status_code == 200

    assert api.delete(f"/api/v1/devices/{device.id}").status_code == 204
    wait_for(lambda: not device.session.connected, what="the open connection dropped")
    with pytest.raises(MqttTimeout, match="refused"):
        device.session.wait_connected(2)
    assert httpx.get(pull, headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert api.get(f"/api/v1/devices/{device.id}").status_code == 404
    assert api.get(f"/api/v1/devices/{device.id}/deployments").status_code == 404
    assert api.delete(f"/api/v1/devices/{device.id}").status_code == 404
    audit = [(e["action"], e["target"], e["result"]) for e in
             api.get("/api/v1/audit", params={"limit": 5}).json()]
    assert ("device.delete", device.id, "ok") in audit
    viewer = api.post("/api/v1/tokens", json={"name": "v", "role": "viewer"}).json()["token"]
    other = enroll(hub, "other")["device"]["id"]
    forbidden = httpx.delete(f"{hub.url}/api/v1/devices/{other}",
                             headers={"Authorization": f"Bearer {viewer}"})
    assert forbidden.status_code == 403


def test_fleet_status_says_so_when_nothing_comes_back_through_a_frozen_broker(
        fleet_hub: tuple[HubProcess, Cli], api: httpx.Client) -> None:
    pid = status(api)["broker"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # The TCP connection stays open and nothing is refused: only the heartbeat tells.
        wait_for(lambda: not status(api)["receiving"], what="receiving: false", timeout=15)
        assert status(api)["connected"]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: status(api)["receiving"], what="receiving again", timeout=30)


def test_a_broker_that_dies_is_started_again_and_gets_every_desired_state(
        fleet_hub: tuple[HubProcess, Cli], api: httpx.Client, device: FakeDevice) -> None:
    hub, cli = fleet_hub
    cli.run("deploy", "tiny:1", "--device", device.id)
    assert device.desired().generation == 1
    before = status(api)
    os.kill(before["broker"]["pid"], signal.SIGKILL)  # no chance to save anything
    wait_for(lambda: status(api)["broker"]["restarts"] == before["broker"]["restarts"] + 1
             and status(api)["connected"], what="the broker back", timeout=30)
    assert "mosquitto stopped (exit code -9)" in hub.log()
    # Every desired state is published again, in case the broker lost it.
    wait_for(lambda: status(api)["desired"]["published"] > before["desired"]["published"],
             what="the states published again")
    cli.run("deploy", "tiny:2", "--device", device.id)
    assert device.desired_generation(2).deployments[0].version == 2


def test_a_missing_mosquitto_is_one_line_saying_how_to_install_it(tmp_path: Path) -> None:
    done = subprocess.run([*EDGEFLEET, "hub", "serve", "--data-dir", str(tmp_path / "data"),
                           "--mosquitto", str(tmp_path / "no-such-mosquitto")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "apt-get install mosquitto" in done.stderr
    assert not (tmp_path / "data").exists()


def test_enrollments_at_once_share_reloads_and_each_login_works(
        fleet_hub: tuple[HubProcess, Cli]) -> None:
    hub, _ = fleet_hub
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: enroll(hub, f"burst-{i}"), range(16)))
    for answer in answers:
        with Session(answer["mqtt"]["url"], client_id=answer["device"]["id"],
                     username=answer["mqtt"]["username"], password=answer["mqtt"]["password"],
                     backoff=FAST) as session:
            session.wait_connected(5)


def test_an_enrollment_the_broker_does_not_take_is_undone(
        fleet_hub: tuple[HubProcess, Cli], api: httpx.Client) -> None:
    hub, _ = fleet_hub
    token = api.post("/api/v1/enrollment-tokens", json={"max_uses": 1}).json()
    before = {d["id"] for d in api.get("/api/v1/devices").json()}
    pid = status(api)["broker"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # it cannot reload its logins
    try:
        answer = httpx.post(f"{hub.url}/api/v1/enroll", timeout=60, json={
            "token": token["token"], "name": "late",
            "public_key": signing.public_key_pem(signing.generate_private_key())})
    finally:
        os.kill(pid, signal.SIGCONT)
    assert answer.status_code == 503, answer.text
    assert "did not reload its logins" in answer.json()["detail"]
    assert {d["id"] for d in api.get("/api/v1/devices").json()} == before
    (again,) = [t for t in api.get("/api/v1/enrollment-tokens").json() if t["id"] == token["id"]]
    assert again["uses"] == 0  # the use was given back: the token still enrolls one device
    assert httpx.post(f"{hub.url}/api/v1/enroll", json={
        "token": token["token"], "name": "late",
        "public_key": signing.public_key_pem(signing.generate_private_key())}).status_code == 201
