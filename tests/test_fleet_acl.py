"""The managed broker's logins and per-device topic ACL, with real sessions."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import MqttTimeout, Session
from agentproc import wait_for
from contract import protocol
from fleetdevice import FAST, FakeDevice, connect, enroll
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
    # Mosquitto grants a subscription past the ACL and delivers nothing on it.
    for topic in (protocol.desired_topic(b_id), "edgefleet/v1/devices/+/desired", "#",
                  protocol.reported_topic(a.id), protocol.status_topic(b_id), "$SYS/#"):
        a.session.subscribe(topic)
    other = connect(b)
    other.report(("tiny", "tiny", 1, "serving"))
    other.telemetry(range(1, 3))
    other.session.close()
    # It acknowledges a refused publish and drops it; so the proof is that
    # A's own report, sent after, arrives while B's forged one never does.
    a.session.publish(protocol.reported_topic(b_id), b"forged")
    a.session.publish(protocol.desired_topic(a.id), b"forged", retain=True)
    a.report(("tiny", "tiny", 1, "serving"))
    with pytest.raises(MqttTimeout):  # nothing of B's, nor A's own report, nor $SYS
        a.session.get(1)
    wait_for(lambda: api.get(f"/api/v1/devices/{a.id}").json()["reported"], what="A's report")
    assert api.get(f"/api/v1/devices/{b_id}").json()["reported"] != {}  # B's own report
    assert api.get("/api/v1/fleet/status").json()["ingest"]["dropped"].get("reported") is None


def test_logins_are_checked(hub: HubProcess, two: tuple[FakeDevice, dict]) -> None:
    a, b = two
    b_id, b_token = b["device"]["id"], b["mqtt"]["password"]
    assert "refused" in refused(hub, client_id=b_id, username=b_id, password="efd_wrong")
    assert "refused" in refused(hub, client_id=b_id, username=b_id,
                                password=a.enrollment["mqtt"]["password"])
    assert "refused" in refused(hub, client_id=b_id)  # anonymous
    assert "refused" in refused(hub, client_id="edgefleet-hub-2", username="edgefleet-hub",
                                password=b_token)
    assert "not authorised" in hub.log()
    assert b_token not in hub.log()
    fine = connect(b)
    fine.session.wait_connected(15)
    fine.session.close()
    # The broker names each client by its login, whatever client id it sent:
    # with B's login, "someone-else" is B and may do only what B may.
    with Session(f"mqtt://127.0.0.1:{hub.mqtt_port}", client_id="someone-else", username=b_id,
                 password=b_token, backoff=FAST) as renamed:
        renamed.wait_connected(15)


def test_a_last_will_on_another_devices_topic_is_never_published(
        hub: HubProcess, api: httpx.Client, two: tuple[FakeDevice, dict]) -> None:
    a, b = two
    wait_for(lambda: api.get(f"/api/v1/devices/{a.id}").json()["status"] == "online",
             what="A online")
    forger = paho.Client(CallbackAPIVersion.VERSION2, client_id=b["device"]["id"])
    forger.username_pw_set(b["device"]["id"], b["mqtt"]["password"])
    forger.will_set(protocol.status_topic(a.id), protocol.OFFLINE, qos=1, retain=True)
    forger.connect("127.0.0.1", hub.mqtt_port)
    forger.loop(1)
    assert forger.is_connected()
    sock = forger.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)  # gone without a DISCONNECT: the broker sends the will
    sock.close()
    # B's own status message, sent after, is the marker that the will had its chance.
    marker = connect(b)
    marker.session.publish(protocol.status_topic(marker.id), protocol.OFFLINE)
    wait_for(lambda: api.get(f"/api/v1/devices/{marker.id}").json()["status"] == "offline",
             what="B's own status")
    marker.session.close()
    assert api.get(f"/api/v1/devices/{a.id}").json()["status"] == "online"
