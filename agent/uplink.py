"""Everything the agent sends to the hub, from one thread: reported state and telemetry.

The update logic never waits on the network: it hands the newest reported
state to `Uplink.report` and goes on. This thread publishes it (again after
every reconnect), measures every `interval` seconds, queues the points on
disk and sends them in batches. A batch leaves the queue only when the
broker has acknowledged it (PUBACK); while offline the queue fills up to its
bound and the thread keeps trying.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.mqtt import MqttError, Session
from agent.telemetry import SKETCHES
from agent.telemetry_queue import Point as QueuedPoint
from agent.telemetry_queue import TelemetryQueue
from contract.protocol import (
    MAX_TELEMETRY_POINTS,
    Point,
    TelemetryBatch,
    build_telemetry,
    parse_time,
    reported_topic,
    telemetry_topic,
)

log = logging.getLogger("edgefleet.agent")
PUBLISH_TIMEOUT = 10.0


def _point(p: QueuedPoint) -> Point:
    """A queued point on the wire: its drift sketches travel beside its values."""
    values = dict(p.values)
    sketches = values.pop(SKETCHES, {})
    return Point(p.seq, parse_time(p.at), p.kind, values, sketches)  # type: ignore[arg-type]


class Uplink:
    def __init__(
        self,
        session: Session,
        device_id: str,
        queue: TelemetryQueue,
        measure: Callable[[], list[tuple[str, dict]]],
        *,
        interval: float,
    ) -> None:
        self.session = session
        self.device_id = device_id
        self.queue = queue
        self.measure = measure
        self.interval = interval
        self._report: bytes | None = None
        self._report_sent = True
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Measure once more and try to send what is queued, then stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def report(self, payload: bytes) -> None:
        with self._lock:
            self._report, self._report_sent = payload, False
        self._wake.set()

    def _run(self) -> None:
        next_measure = time.monotonic() + self.interval
        was_connected = False
        while True:
            stopping = self._stop.is_set()
            connected = self.session.connected
            if connected and not was_connected:
                with self._lock:
                    self._report_sent = False  # the hub may have missed changes while we were away
            was_connected = connected
            if time.monotonic() >= next_measure or stopping:
                next_measure = time.monotonic() + self.interval
                self._measure()
            if connected:
                self._send_report()
                self._send_telemetry()
            if stopping:
                return
            self._wake.wait(min(1.0, max(next_measure - time.monotonic(), 0.05)))
            self._wake.clear()

    def _measure(self) -> None:
        try:
            self.queue.extend(self.measure())
        except Exception:  # a failed measurement must not stop reporting
            log.exception("measuring telemetry failed")

    def _send_report(self) -> None:
        with self._lock:
            payload, sent = self._report, self._report_sent
        if payload is None or sent:
            return
        try:
            self.session.publish(reported_topic(self.device_id), payload, timeout=PUBLISH_TIMEOUT)
        except MqttError as exc:
            log.info("reported state not sent yet: %s", exc)
            return
        with self._lock:
            if self._report is payload:
                self._report_sent = True

    def _send_telemetry(self) -> None:
        while points := self.queue.peek(MAX_TELEMETRY_POINTS):
            batch = TelemetryBatch(self.device_id, tuple(
                _point(p) for p in points
            ))
            try:
                self.session.publish(telemetry_topic(self.device_id), build_telemetry(batch),
                                     timeout=PUBLISH_TIMEOUT)
            except MqttError as exc:
                log.info("telemetry kept for later (%d points queued): %s", len(self.queue), exc)
                return
            self.queue.ack(batch.seq_to)
