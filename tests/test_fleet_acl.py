"""The embedded broker's logins and per-device topic ACL, with real sessions."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from agentproc import wait_for
from fleetdevice import FAST, FakeDevice, connect, enroll

from contract import protocol
from agent.mqtt import Message, MqttError, MqttTimeout, Session
from hub.broker_auth import device_may
from hubproc import HubProcess


@pytest.fixture
def two(hub: HubProcess) -> Iterator[tuple[FakeDevice, dict]]:
    """Device A, connected; device B, enrolled."""
    a = connect(enroll(hub, "a"))
    a.session.wait_connected(15)
    yield a, enroll(hub, "b")
    a.session.close()


def refused(hub: HubProcess, **options: object) -> str:
    """Log in with OPTIONS and return why the session could not connect."""
    with Session(f"mqtt://127.0.0.1:{hub.mqtt_port}", backoff=FAST,
                 **options) as session:  # type: ignore[arg-type]
        with pytest.raises(MqttTimeout) as failure:
            session.wait_connected(1)
    return str(failure.value)


def test_a_device_cannot_read_or_write_another_devices_topics(
        hub: HubProcess, api: httpx.Client, two: tuple[FakeDevice, dict]) -> None:
    a, b = two
    b_id = b["device"]["id"]
    for topic in (protocol.desired_topic(b_id), "edgefleet/v1/devices/+/desired", "#",
                  protocol.reported_topic(a.id)):
        with pytest.raises(MqttError, match="refused the subscription"):
            a.session.subscribe(topic)
    # amqtt acknowledges a refused publish and drops it; so the proof is that
    # A's own report, sent after, arrives while B's forged one never does.
    a.session.publish(protocol.reported_topic(b_id), b"forged")
    a.report(("tiny", "tiny", 1, "serving"))
    wait_for(lambda: api.get(f"/api/v1/devices/{a.id}").json()["reported"], what="A's report")
    assert api.get(f"/api/v1/devices/{b_id}").json()["reported"] == {}
    assert api.get("/api/v1/fleet/status").json()["ingest"]["dropped"].get("reported") is None


def test_logins_are_checked(hub: HubProcess, two: tuple[FakeDevice, dict]) -> None:
    a, b = two
    b_id, b_token = b["device"]["id"], b["mqtt"]["password"]
    assert "refused" in refused(hub, client_id=b_id, username=b_id, password="efd_wrong")
    assert "refused" in refused(hub, client_id=b_id, username=b_id,
                                password=a.enrollment["mqtt"]["password"])
    assert "refused" in refused(hub, client_id=b_id)  # anonymous
    assert "refused" in refused(hub, client_id="someone-else", username=b_id, password=b_token)
    assert "refused" in refused(hub, client_id=b_id, username=b_id, password=b_token,
                                will=Message(protocol.status_topic(a.id), b"offline"))
    assert "refused" in refused(hub, client_id="edgefleet-hub-2", username="edgefleet-hub",
                                password=b_token)
    log = hub.log()
    for reason in ("unknown device or wrong device token", "no device id", "is not the device id",
                   "not on the device's own status topic", "wrong password for the hub"):
        assert reason in log
    assert b_token not in log
    fine = connect(b)
    fine.session.wait_connected(15)
    fine.session.close()


@pytest.mark.parametrize("action, topic, allowed", [
    ("publish", "edgefleet/v1/devices/dev-1/reported", True),
    ("publish", "edgefleet/v1/devices/dev-1/telemetry", True),
    ("publish", "edgefleet/v1/devices/dev-1/status", True),
    ("publish", "edgefleet/v1/devices/dev-1/commands/c-1/result", True),
    ("publish", "edgefleet/v1/devices/dev-1/desired", False),
    ("publish", "edgefleet/v1/devices/dev-2/reported", False),
    ("subscribe", "edgefleet/v1/devices/dev-1/desired", True),
    ("subscribe", "edgefleet/v1/devices/dev-1/commands", True),
    ("subscribe", "edgefleet/v1/devices/dev-1/reported", False),
    ("subscribe", "edgefleet/v1/devices/dev-2/desired", False),
    ("subscribe", "edgefleet/v1/devices/+/desired", False),
    ("subscribe", "edgefleet/v1/devices/dev-1/#", False),
    ("subscribe", "$SYS/#", False),
])
def test_device_topic_policy(action: str, topic: str, allowed: bool) -> None:
    assert device_may("dev-1", action, topic) is allowed  # type: ignore[arg-type]
