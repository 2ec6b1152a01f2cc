"""A fuzzer of what devices publish, against a real hub and its managed Mosquitto.

An enrolled device sends hypothesis-made payloads to every topic it may write
(reported, telemetry, status: contract/protocol.py): raw bytes, any JSON, valid
documents with one field replaced or removed, deep nesting, timestamps of any
year. The hub must not crash, ingest must keep going (a valid message sent after
the fuzz is stored), drops are counted, and the log gets a few lines, not one
per message: 10,000 malformed messages give a handful of WARNING lines."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.mqtt import Message
from contract import protocol
from fleetdevice import FakeDevice, connect, enroll
from hubproc import HubProcess

KINDS = ("reported", "telemetry", "status")
EXAMPLES = 150  # per run; each is one message through the broker


@pytest.fixture(scope="module")
def device(hub: HubProcess) -> Iterator[FakeDevice]:
    fake = connect(enroll(hub, "fuzzed"))
    fake.session.wait_connected(15)
    yield fake
    fake.session.close()


def fleet(api: httpx.Client) -> dict[str, Any]:
    return api.get("/api/v1/fleet/status").raise_for_status().json()["ingest"]


def dropped(api: httpx.Client) -> int:
    return sum(sum(reasons.values()) for reasons in fleet(api)["dropped"].values())


def topic(device: FakeDevice, kind: str) -> str:
    return {"reported": protocol.reported_topic, "telemetry": protocol.telemetry_topic,
            "status": protocol.status_topic}[kind](device.id)


def valid_document(device_id: str, kind: str, at: datetime) -> dict[str, Any]:
    if kind == "telemetry":
        payload = protocol.build_telemetry(protocol.TelemetryBatch(device_id, (
            protocol.Point(1, at, "system", {"cpu": 1.5}),)))
    else:
        payload = protocol.build_reported(protocol.ReportedState(
            device_id=device_id, applied_generation=0, deployments=(),
            platform="linux/amd64", accelerators=(), agent_version="1"))
    return json.loads(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@st.composite
def payloads(draw: st.DrawFn, device_id: str, kind: str) -> bytes:
    how = draw(st.sampled_from(["bytes", "json", "mutated", "deep", "time"]))
    if how == "bytes":
        return draw(st.binary(max_size=512))
    if how == "json":
        return json.dumps(draw(json_values)).encode()
    if how == "deep":
        depth = draw(st.integers(1, 200_000))
        return b"[" * depth + b"]" * draw(st.integers(0, depth))
    at = draw(st.datetimes(timezones=st.just(UTC))) if how == "time" else datetime.now(UTC)
    document = valid_document(device_id, "telemetry" if kind == "status" else kind, at)
    if how == "mutated":
        key = draw(st.sampled_from(sorted(document)))
        if draw(st.booleans()):
            del document[key]
        else:
            document[key] = draw(json_values)
    return json.dumps(document).encode()


def test_fuzzed_payloads_on_every_device_topic(hub: HubProcess, api: httpx.Client,
                                               device: FakeDevice) -> None:
    before = dropped(api)
    sent: list[Message] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def publish(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(KINDS))
        message = Message(topic(device, kind), data.draw(payloads(device.id, kind)),
                          retain=data.draw(st.booleans()))
        sent.append(message)
        device.session.publish_many([message])

    publish()
    # Ingest goes on: a valid point sent last is stored.
    device.telemetry(range(10_000, 10_001))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        points = api.get(f"/api/v1/devices/{device.id}/telemetry").json()
        if any(p["seq"] == 10_000 for p in points):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the valid point after the fuzz was not stored")
    assert hub.process.poll() is None
    assert dropped(api) > before
    log = hub.log()
    assert "Traceback" not in log
    drop_lines = [line for line in log.splitlines() if "dropped a " in line]
    assert len(drop_lines) <= 20, drop_lines
    print(f"ingest fuzz: {len(sent)} messages, {dropped(api) - before} dropped, "
          f"{len(drop_lines)} log lines")


def test_a_flood_of_malformed_messages_gives_a_few_log_lines(
        hub: HubProcess, api: httpx.Client, device: FakeDevice) -> None:
    before = fleet(api)["dropped"].get("telemetry", {}).get("malformed", 0)
    lines_before = hub.log().count("dropped a telemetry message")
    flood = [Message(topic(device, "telemetry"), b"{not json %d" % i) for i in range(10_000)]
    for start in range(0, len(flood), 500):
        device.session.publish_many(flood[start:start + 500], timeout=30)
    deadline = time.monotonic() + 60
    while fleet(api)["dropped"].get("telemetry", {}).get("malformed", 0) < before + 10_000:
        assert time.monotonic() < deadline, fleet(api)
        time.sleep(0.2)
    lines = hub.log().count("dropped a telemetry message") - lines_before
    assert lines <= 3, lines
    counted = re.findall(r"and (\d+) more like it", hub.log())
    print(f"flood: 10000 malformed messages, {lines} log line(s), counts {counted}")


def test_points_stamped_far_from_the_hubs_clock_are_counted_and_dropped(
        hub: HubProcess, api: httpx.Client, device: FakeDevice) -> None:
    before = fleet(api)["points_out_of_window"]
    now = datetime.now(UTC)
    stamps = [datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC),
              now - timedelta(days=31), now + timedelta(hours=1), now]
    device.session.publish(topic(device, "telemetry"), protocol.build_telemetry(
        protocol.TelemetryBatch(device.id, tuple(
            protocol.Point(20_000 + i, at, "system", {"cpu": 1.0})
            for i, at in enumerate(stamps)))))
    deadline = time.monotonic() + 30
    while fleet(api)["points_out_of_window"] < before + 4:
        assert time.monotonic() < deadline, fleet(api)
        time.sleep(0.2)
    stored = [p["seq"] for p in api.get(f"/api/v1/devices/{device.id}/telemetry").json()
              if p["seq"] >= 20_000]
    assert stored == [20_004]
    assert "stamped outside" in hub.log()
