"""The agent's uplink (agent/uplink.py), in process, against a real Mosquitto.

A watcher session on the same broker sees what the uplink sends: the newest
reported state (again after every reconnect) and telemetry in sequence,
including what was measured while the broker was away.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt import BackoffPolicy, MqttTimeout, Session
from agent.telemetry_queue import TelemetryQueue
from agent.uplink import Uplink
from contract.protocol import (
    ReportedState,
    build_reported,
    parse_reported,
    parse_telemetry,
    reported_topic,
    telemetry_topic,
)
from mosquitto import Mosquitto, mosquitto  # noqa: F401  (fixture)

DEVICE = "dev-uplink"
QUICK = BackoffPolicy(initial=0.1, maximum=0.5)


def reported(generation: int) -> bytes:
    return build_reported(ReportedState(DEVICE, generation, (), "linux/amd64",
                                        ("onnxruntime:CPU",), "test"))


class Watcher:
    """What the broker delivers on the device's reported and telemetry topics."""

    def __init__(self, broker: Mosquitto) -> None:
        self.session = Session(broker.url, client_id="watcher", backoff=QUICK,
                               subscriptions=[reported_topic(DEVICE), telemetry_topic(DEVICE)])
        self.generations: list[int] = []
        self.seqs: list[int] = []

    def take_until(self, done: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            try:
                message = self.session.get(timeout=0.2)
            except MqttTimeout:
                continue
            if message.topic == reported_topic(DEVICE):
                self.generations.append(
                    parse_reported(message.payload, device_id=DEVICE).applied_generation)
            else:
                self.seqs += [p.seq for p in
                              parse_telemetry(message.payload, device_id=DEVICE).points]


@pytest.fixture
def linked(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[tuple[Uplink, Watcher]]:  # noqa: F811
    watcher = Watcher(mosquitto)
    watcher.session.start()
    session = Session(mosquitto.url, client_id=DEVICE, backoff=QUICK)
    queue = TelemetryQueue(tmp_path / "telemetry.db")

    def measure() -> list[tuple[str, dict[str, Any]]]:
        return [("system", {"cpu_percent": 1.5, "telemetry_dropped": queue.dropped})]

    uplink = Uplink(session, DEVICE, queue, measure, interval=0.1)
    session.start()
    uplink.start()
    yield uplink, watcher
    uplink.stop()
    session.close()
    watcher.session.close()
    queue.close()


def test_the_report_and_telemetry_reach_the_broker_in_order(
        linked: tuple[Uplink, Watcher]) -> None:
    uplink, watcher = linked
    uplink.report(reported(1))
    watcher.take_until(lambda: 1 in watcher.generations and len(watcher.seqs) >= 5,
                       "the reported state and five points")
    assert watcher.seqs[:5] == [1, 2, 3, 4, 5]
    uplink.report(reported(2))
    watcher.take_until(lambda: 2 in watcher.generations, "the newer reported state")
    assert watcher.generations.count(1) == 1  # an unchanged report is not sent again


def test_what_is_measured_offline_is_sent_after_the_broker_returns(
        linked: tuple[Uplink, Watcher], mosquitto: Mosquitto) -> None:  # noqa: F811
    uplink, watcher = linked
    uplink.report(reported(1))
    watcher.take_until(lambda: bool(watcher.generations and watcher.seqs), "the first sends")
    mosquitto.stop()
    deadline = time.monotonic() + 30
    while len(uplink.queue) < 3:  # measuring goes on into the queue (slowly on a busy machine)
        assert time.monotonic() < deadline, f"{len(uplink.queue)} points queued in 30 s"
        time.sleep(0.1)
    last_sent, queued = max(watcher.seqs), len(uplink.queue)
    uplink.report(reported(2))
    mosquitto.start()
    watcher.take_until(lambda: 2 in watcher.generations and max(watcher.seqs) >= last_sent + queued,
                       "the report made while offline and the queued telemetry")
    # Every point arrives; one whose PUBACK was lost may come twice, none goes missing.
    assert set(watcher.seqs) == set(range(1, max(watcher.seqs) + 1))
