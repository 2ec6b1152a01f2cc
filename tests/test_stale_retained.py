"""Desired states left on the broker by someone else (hub/retained.py), with a real hub and
a real Mosquitto anyone may write to: a replayed old state, a forgery, a deleted state and
one left while the hub was down are each replaced by the hub's own, counted and audited;
the hub's own traffic is never taken for one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from agent.mqtt import MqttTimeout, Session
from agentproc import deploy, publish_version, wait_for
from contract import protocol, signing
from hubproc import HubProcess, start_hub
from modelgen import make_onnx
from mosquitto import Mosquitto


@pytest.fixture(scope="module")
def hubs(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[list[HubProcess]]:
    """The hub, in a list: the last test restarts it."""
    running = [start_hub(tmp_path_factory.mktemp("hub") / "data",
                         extra_args=("--mqtt-url", broker.url))]
    yield running
    assert running[-1].stop() == 0, running[-1].log()


@pytest.fixture(scope="module")
def versions(hubs: list[HubProcess], tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    work = tmp_path_factory.mktemp("models")
    made = []
    for name in ("a", "b"):
        (work / name).mkdir()
        made.append(publish_version(hubs[0], "tiny", make_onnx(work / name / "model.onnx")))
    return made


def api(hub: HubProcess) -> httpx.Client:
    return httpx.Client(base_url=hub.url, verify=hub.verify, timeout=30,
                        headers={"Authorization": f"Bearer {hub.admin_token}"})


def enroll(hub: HubProcess) -> str:
    """A device record (no agent: the hub is what is tested)."""
    with api(hub) as c:
        token = c.post("/api/v1/enrollment-tokens", json={}).raise_for_status().json()["token"]
        answer = c.post("/api/v1/enroll", headers={"Authorization": ""}, json={
            "token": token, "name": f"d-{uuid.uuid4().hex[:6]}",
            "public_key": signing.public_key_pem(signing.generate_private_key())})
    return str(answer.raise_for_status().json()["device"]["id"])


def retained(broker: Mosquitto, device: str) -> bytes | None:
    """What the broker holds on DEVICE's desired topic now (None: nothing)."""
    with Session(broker.url, client_id=f"reader-{uuid.uuid4().hex[:8]}",
                 subscriptions=[protocol.desired_topic(device)]) as reader:
        try:
            return reader.get(timeout=3).payload or None
        except MqttTimeout:
            return None


def leave(broker: Mosquitto, device: str, payload: bytes) -> None:
    """Publish PAYLOAD retained on DEVICE's desired topic, as someone with broker access."""
    with Session(broker.url, client_id=f"attacker-{uuid.uuid4().hex[:8]}") as attacker:
        attacker.publish(protocol.desired_topic(device), payload, retain=True)


def generation(payload: bytes | None) -> int | None:
    return json.loads(payload)["generation"] if payload else None


def desired_stats(hub: HubProcess) -> dict:
    with api(hub) as c:
        return c.get("/api/v1/fleet/status").raise_for_status().json()["desired"]


def stale_audits(hub: HubProcess) -> list[dict]:
    with api(hub) as c:
        return c.get("/api/v1/audit", params={"action": "desired.stale"}).json()


def forged(device: str, generation: int) -> bytes:
    now = datetime.now(UTC)
    return protocol.sign_desired(protocol.DesiredState(
        device, generation, now, now + timedelta(hours=1), ()), signing.generate_private_key())


def test_a_replayed_forged_or_deleted_state_is_replaced_by_the_hubs(
    hubs: list[HubProcess], broker: Mosquitto, versions: list[int],
) -> None:
    hub = hubs[0]
    device = enroll(hub)
    deploy(hub, device, f"tiny:{versions[0]}")
    old = wait_for(lambda: retained(broker, device), what="the first state retained")
    deploy(hub, device, f"tiny:{versions[1]}")
    latest = wait_for(lambda: (p := retained(broker, device)) and generation(p) > generation(old)
                      and p, what="the second state retained")
    assert desired_stats(hub)["stale_retained"] == 0  # the hub's own traffic is no suspect

    for n, (payload, reason) in enumerate([(old, "replay"), (forged(device, 99), "bad_signature"),
                                           (b"", "cleared")], start=1):
        leave(broker, device, payload)
        wait_for(lambda n=n: desired_stats(hub)["stale_retained"] == n, timeout=30,  # type: ignore[misc]
                 what=f"the hub noticing ({reason})")
        back = wait_for(lambda: (p := retained(broker, device)) and generation(p) ==
                        generation(latest) and p, what="the hub's state back on the broker")
        assert json.loads(back)["signature"]["keyid"] == json.loads(latest)["signature"]["keyid"]
        assert desired_stats(hub)["last_stale"]["reason"].startswith(reason)
    assert [a["target"] for a in stale_audits(hub)] == [device] * 3
    with api(hub) as c:  # and each is an event (webhooks can page someone)
        replaced = c.get("/api/v1/events", params={"type": "desired.replaced"}).json()["events"]
    assert [e["subject"] for e in replaced] == [device] * 3


def test_a_device_with_nothing_assigned_gets_its_topic_cleared(
    hubs: list[HubProcess], broker: Mosquitto,
) -> None:
    hub = hubs[0]
    device = enroll(hub)
    before = desired_stats(hub)["stale_retained"]
    leave(broker, device, forged(device, 1))
    wait_for(lambda: desired_stats(hub)["stale_retained"] == before + 1, what="noticed")
    wait_for(lambda: retained(broker, device) is None, what="the forgery cleared")


def test_a_state_left_while_the_hub_was_down_is_found_at_its_start(
    hubs: list[HubProcess], broker: Mosquitto, versions: list[int], tmp_path: Path,
) -> None:
    hub = hubs[0]
    device = enroll(hub)
    deploy(hub, device, f"tiny:{versions[0]}")
    old = wait_for(lambda: retained(broker, device), what="the first state retained")
    deploy(hub, device, f"tiny:{versions[1]}")
    wait_for(lambda: generation(retained(broker, device)) == generation(old) + 1,  # type: ignore[operator]
             what="the second state retained")
    assert hub.stop() == 0, hub.log()
    leave(broker, device, old)  # the hub is away: nobody sees it happen
    hubs.append(start_hub(hub.data_dir, port=hub.port, extra_args=("--mqtt-url", broker.url)))
    hub = hubs[-1]
    wait_for(lambda: desired_stats(hub)["stale_retained"] == 1, what="the hub finding it")
    wait_for(lambda: generation(retained(broker, device)) == generation(old) + 1,  # type: ignore[operator]
             what="the hub's state back")
    assert "replay" in stale_audits(hub)[0]["detail"]
