"""The hub's side of the device link, end to end, on the managed broker and on an external one.

A real `edgefleet hub serve`; deployments made with the CLI; a device that
is a real MQTT session speaking the real protocol (tests/fleetdevice.py).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from agent.mqtt import MqttTimeout, Session
from agentproc import wait_for
from conftest import Cli
from contract import protocol
from fleetdevice import FakeDevice, connect, crashing_device, enroll, tiny_packages
from hubproc import HubProcess, start_hub
from mosquitto import Mosquitto, start_mosquitto


@dataclass
class Link:
    kind: str
    hub: HubProcess
    cli: Cli
    api: httpx.Client
    packages: dict[int, str]  # version of tiny -> its package digest

    def get(self, path: str, **params: Any) -> Any:
        response = self.api.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def fleet(self) -> dict[str, Any]:
        return self.get("/api/v1/fleet/status")


@pytest.fixture(scope="module", params=["managed", "mosquitto"])
def link(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Link]:
    base = tmp_path_factory.mktemp(request.param)
    broker: Mosquitto | None = None
    if request.param == "mosquitto":
        broker = start_mosquitto(base / "mosquitto")
    hub = start_hub(base / "data",
                    extra_args=("--mqtt-url", broker.url) if broker is not None else ())
    cli = Cli(hub, base)
    with httpx.Client(base_url=hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
        yield Link(request.param, hub, cli, api, tiny_packages(hub, cli, base))
    assert hub.stop() == 0, hub.log()
    if broker is not None:
        broker.stop()


@pytest.fixture
def device(link: Link, request: pytest.FixtureRequest) -> Iterator[FakeDevice]:
    fake = connect(enroll(link.hub, request.node.name[:100]))
    fake.session.wait_connected(15)
    yield fake
    fake.session.close()


def test_a_deploy_reaches_the_device_signed_and_its_reports_reach_the_hub(
        link: Link, device: FakeDevice) -> None:
    path = f"/api/v1/devices/{device.id}"
    wait_for(lambda: link.get(path)["status"] == "online", what="the birth message")
    link.cli.run("deploy", "tiny:1", "--device", device.id, "--prefer", "onnxruntime:CPU")
    state = device.desired()
    assert state.generation == 1
    (deployment,) = state.deployments
    assert (deployment.name, deployment.model, deployment.version) == ("tiny", "tiny", 1)
    assert deployment.package == protocol.Package("models/tiny", link.packages[1],
                                                  deployment.package.size)
    assert deployment.runtime.prefer == ("onnxruntime:CPU",) and deployment.candidate is None

    device.report(("tiny", "tiny", 1, "serving"))
    device.telemetry(range(1, 11))
    shown = wait_for(lambda: (d := link.get(f"{path}/deployments"))["reported"] and d,
                     what="the reported state")
    assert shown["desired_generation"] == shown["published_generation"] == 1
    assert shown["applied_generation"] == 1
    assert [(r["name"], r["version"], r["state"], r["device"]) for r in shown["reported"]] == [
        ("tiny", 1, "serving", "CPU")]
    record = link.get(path)
    assert record["platform"] == "linux/arm64"
    assert record["inventory"]["accelerators"] == ["onnxruntime:CPU"]
    assert record["last_seen"] is not None
    points = wait_for(lambda: len(link.get(f"{path}/telemetry")) == 10 and
                      link.get(f"{path}/telemetry"), what="10 telemetry points")
    assert [p["seq"] for p in points] == list(range(1, 11))
    table = link.cli.run("device", "show", device.id).stdout
    assert "tiny:1" in table and "1 serving on onnxruntime:CPU" in table

    # An A/B split with version 2, then taking the deployment away again.
    link.cli.run("deploy", "tiny:1", "--device", device.id, "--candidate", "2", "--traffic", "10")
    split = device.desired().deployments[0]
    assert split.traffic == 90 and split.candidate is not None
    assert (split.candidate.version, split.candidate.traffic, split.candidate.shadow) == (2, 10,
                                                                                          False)
    assert split.candidate.package.digest == link.packages[2]
    gone = link.cli.json("undeploy", "tiny", "--device", device.id)
    assert gone["generation"] == 3
    assert device.desired().deployments == ()


def test_the_same_deploy_twice_changes_nothing(link: Link, device: FakeDevice) -> None:
    first = link.cli.json("deploy", "tiny:latest", "--device", device.id)
    again = link.cli.json("deploy", "tiny:2", "--device", device.id)
    assert first["generation"] == again["generation"] == 1
    assert device.desired().deployments[0].version == 2
    with pytest.raises(MqttTimeout):
        device.session.get(1)


def test_the_last_will_marks_a_crashed_device_offline(link: Link) -> None:
    enrollment = enroll(link.hub, "crashes")
    path = f"/api/v1/devices/{enrollment['device']['id']}"
    process = crashing_device(enrollment)
    try:
        wait_for(lambda: link.get(path)["status"] == "online", what="online")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
    wait_for(lambda: link.get(path)["status"] == "offline", what="the last will")


def test_telemetry_resent_after_a_reconnect_is_stored_once(
        link: Link, device: FakeDevice) -> None:
    device.telemetry(range(1, 11))
    device.session.close()
    device.session.start()  # the same session again, as after a reconnect
    device.telemetry(range(5, 16))  # 5..10 were sent before
    path = f"/api/v1/devices/{device.id}/telemetry"
    wait_for(lambda: len(link.get(path)) == 15, what="15 points")
    assert [p["seq"] for p in link.get(path)] == list(range(1, 16))
    assert link.fleet()["ingest"]["duplicate_points"] >= 6


def test_bad_messages_are_dropped_and_counted_while_good_ones_flow(
        link: Link, device: FakeDevice) -> None:
    before = link.fleet()["ingest"]["dropped"]
    device.session.publish(protocol.reported_topic(device.id), b"{not json")
    device.session.publish(protocol.telemetry_topic(device.id), b'{"schema": "x"}')
    device.session.publish(protocol.status_topic(device.id), b"maybe")
    device.telemetry(range(1, 4))
    wait_for(lambda: len(link.get(f"/api/v1/devices/{device.id}/telemetry")) == 3,
             what="the good points")
    dropped = link.fleet()["ingest"]["dropped"]
    for kind in ("reported", "telemetry", "status"):
        assert dropped[kind]["malformed"] == before.get(kind, {}).get("malformed", 0) + 1
    if link.kind == "mosquitto":  # the managed broker lets no unknown device in at all
        with Session(link.fleet()["mqtt_url"], client_id="dev-nobody") as stranger:
            stranger.publish(protocol.telemetry_topic("dev-nobody"), b"{}")
        wait_for(lambda: link.fleet()["ingest"]["dropped"].get("telemetry", {})
                 .get("unknown_device"), what="the unknown device's message counted")
        assert "dev-nobody" in link.hub.log()
    assert link.fleet()["connected"]


def test_deploy_errors_say_what_to_do(link: Link, device: FakeDevice) -> None:
    files = [{"path": f["path"], "digest": f["digest"]}
             for f in link.get("/api/v1/models/tiny/versions/1")["files"]]
    link.api.post("/api/v1/models/other/versions", json={"files": files}).raise_for_status()
    no_package = link.cli.run("deploy", "other:1", "--device", device.id, ok=False)
    assert no_package.returncode == 1 and "edgefleet package build other:1" in no_package.stderr
    assert "Traceback" not in no_package.stderr
    unknown = link.cli.run("deploy", "tiny:1", "--device", "dev-nope", ok=False)
    assert "no device with id dev-nope" in unknown.stderr
    usage = link.cli.run("deploy", "tiny:1", "--device", device.id, "--traffic", "5", ok=False)
    assert usage.returncode == 2 and "--candidate" in usage.stderr
    same = link.cli.run("deploy", "tiny:1", "--device", device.id, "--candidate", "1",
                        "--traffic", "5", ok=False)
    assert "the deployment's own version" in same.stderr
    prefer = link.cli.run("deploy", "tiny:1", "--device", device.id, "--prefer", "cuda", ok=False)
    assert "RUNTIME:DEVICE" in prefer.stderr
    missing = link.cli.run("undeploy", "tiny", "--device", device.id, ok=False)
    assert "has no deployment 'tiny'" in missing.stderr
    actions = [(e["action"], e["result"]) for e in link.get("/api/v1/audit", limit=6)]
    assert ("device.deploy", "failed") in actions and ("device.undeploy", "failed") in actions
