"""What devices send, written to the database in batches: status, reported state, telemetry.

One thread takes messages from the hub's MQTT session and writes each batch
in one SQLite transaction, so the cost is per batch, not per message. A
batch is what has arrived (up to `max_batch`) when the thread comes round:
under load batches grow by themselves, and it never waits for more while
holding messages the broker counts as in flight. The broker gets its
acknowledgements only after the commit, so a hub that dies mid-batch loses
nothing: the broker delivers those messages again, and writing them twice
is harmless (telemetry is keyed by (device, seq), the rest is state).

- status: `devices.status` ('online'/'offline'); last_seen, and 'online' for any
  live message (hub/liveness.py marks devices silent too long 'offline')
- reported: `devices.reported` (the document), applied_generation, platform,
  inventory (accelerators, agent version), and the device's rows in
  `deployment_status`, replaced; only the newest report per device in a
  batch is parsed and written (the older ones are counted, not checked, unless
  the newest is malformed: then the next newest is read)
- telemetry: `hub.telemetry.store`, the whole batch's points in one INSERT, once per
  (device, seq)
- desired (the hub's own topics): handed to hub/retained.py, which looks for
  states the hub did not put there; nothing is written

`last_seen` is the hub's clock when a live message arrived; retained status
messages, which the broker replays on every subscribe, are old news and do
not touch it. A message from an unknown device, or one that breaks the
protocol, is counted and dropped, and the loop goes on; the log gets one
line per kind and reason a minute at most (hub/repeats.py), naming the
latest device and reason and how many more there were. Telemetry points
stamped outside a sane window of the hub's clock (`OLDEST_POINT` back,
`NEWEST_POINT` ahead: a device clock that is wrong, or lies) are counted
and dropped the same way; the rest of their message is stored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from agent.mqtt import Delivery, Message, MqttError, MqttTimeout, Session
from contract import protocol
from hub import drift_sketches, events, telemetry
from hub.repeats import Repeats
from hub.retained import DESIRED_FILTER, RetainedWatch
from hub.storage.db import Connection, Database, dumps, format_time

log = logging.getLogger("edgefleet.hub.ingest")

# The hub's message to itself through the broker (hub/fleet.py): its arrival
# here proves that this loop still receives. Only the hub may use the topic.
HEARTBEAT_TOPIC = f"{protocol.ROOT}/hub/heartbeat"
# What the hub reads. Command results are not handled yet, so not subscribed. The
# desired topics are the hub's own, watched for states it did not put there.
SUBSCRIPTIONS = (*(
    f for f in protocol.HUB_SUBSCRIPTIONS
    if f.rsplit("/", 1)[-1] in ("reported", "telemetry", "status")
), HEARTBEAT_TOPIC, DESIRED_FILTER)
# Several hubs on one broker (replicas on one PostgreSQL database) read what devices send
# live through one MQTT shared subscription group, so the broker hands each message to
# one of them: a telemetry point is written once, not once per replica.
SHARE_GROUP = "edgefleet-hub"
_SHARED_KINDS = ("reported", "telemetry")


def replica_subscriptions(replica: str) -> tuple[tuple[str, ...], str]:
    """The topic filters and the heartbeat topic of the replica whose client id is REPLICA.

    Reported states and telemetry go to one replica of the group. Status is read by
    every replica, not shared: its messages are retained, the broker replays them on
    subscribing (how a hub learns what changed while it was away) and never hands
    retained messages to a shared subscription; writing a status twice is harmless.
    The desired topics are watched by every replica (hub/retained.py needs the retained
    ones too), and each replica's heartbeat proves its own session receives."""
    heartbeat = f"{HEARTBEAT_TOPIC}/{replica}"
    filters = tuple(f"$share/{SHARE_GROUP}/{f}" if f.rsplit("/", 1)[-1] in _SHARED_KINDS
                    else f for f in SUBSCRIPTIONS if f not in (HEARTBEAT_TOPIC, DESIRED_FILTER))
    return (*filters, heartbeat, DESIRED_FILTER), heartbeat
# Points older than this (an agent queues at most ~6 days offline) or further ahead
# than this (clock skew) are dropped: a point of 9999-12-31 would stay "newest" for ever.
OLDEST_POINT = timedelta(days=30)
NEWEST_POINT = timedelta(minutes=10)


@dataclass
class Counters:
    """Messages written and dropped: one batch's, or summed since the hub started."""

    ingested: Counter[str] = field(default_factory=Counter)   # messages, by kind
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)  # by (kind, reason)
    points: int = 0          # telemetry points stored
    duplicate_points: int = 0  # points seen before (resent after a reconnect)
    points_out_of_window: int = 0  # points stamped too far from the hub's clock, dropped
    sketches: int = 0        # drift sketches stored (hub/drift.py)
    sketches_dropped: Counter[str] = field(default_factory=Counter)  # by reason
    batches: int = 0
    last_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # messages a batch -> batches
    # The hub's clock minus the newest telemetry point's time in the last batch that had
    # any: how far behind the devices' measurements the database is (clock skew included).
    lag_seconds: float | None = None
    # One batch's latest log line per (kind, reason); the loop hands them to its Repeats.
    notes: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, other: Counters) -> None:
        self.ingested.update(other.ingested)
        self.dropped.update(other.dropped)
        self.points += other.points
        self.duplicate_points += other.duplicate_points
        self.points_out_of_window += other.points_out_of_window
        self.sketches += other.sketches
        self.sketches_dropped.update(other.sketches_dropped)
        self.batches += other.batches
        self.last_batch = other.last_batch
        self.batch_sizes.update(other.batch_sizes)
        if other.lag_seconds is not None:
            self.lag_seconds = other.lag_seconds

    def as_dict(self) -> dict[str, Any]:
        dropped: dict[str, dict[str, int]] = {}
        for (kind, reason), count in sorted(self.dropped.items()):
            dropped.setdefault(kind, {})[reason] = count
        return {"ingested": dict(self.ingested), "dropped": dropped,
                "telemetry_points": self.points, "duplicate_points": self.duplicate_points,
                "points_out_of_window": self.points_out_of_window,
                "sketches": self.sketches, "sketches_dropped": dict(self.sketches_dropped),
                "batches": self.batches, "last_batch": self.last_batch}


@dataclass
class _Batch:
    """One batch, parsed and sorted by what it changes."""

    status: dict[str, str] = field(default_factory=dict)  # device -> its newest status
    seen: set[str] = field(default_factory=set)           # devices that sent live messages
    reported: dict[str, tuple[protocol.ReportedState, bytes]] = field(default_factory=dict)
    telemetry: list[protocol.TelemetryBatch] = field(default_factory=list)


def _drop(counters: Counters, kind: str, reason: str, source: str, detail: str) -> None:
    """Count a dropped message and note why for the log; SOURCE is its device id, or
    its topic."""
    counters.dropped[kind, reason] += 1
    counters.notes[kind, reason] = (f"dropped a {kind} message from {source}: {reason}: "
                                    f"{detail[:300]}")


def _parse(
    addressed: Sequence[tuple[Message, str, str]], known: set[str], counters: Counters
) -> _Batch:
    batch = _Batch()
    for message, device, kind in addressed:
        if device not in known:
            _drop(counters, kind, "unknown_device", device,
                  "the hub knows no such device (never enrolled here)")
            continue
        try:
            if kind == "status":
                batch.status[device] = protocol.parse_status(message.payload)
            elif kind == "reported":
                report = protocol.parse_reported(message.payload, device_id=device)
                batch.reported[device] = (report, message.payload)
            elif kind == "telemetry":
                batch.telemetry.append(protocol.parse_telemetry(message.payload,
                                                                device_id=device, fast=orjson))
            else:
                _drop(counters, kind, "unexpected", device, "the hub does not read these")
                continue
        except protocol.ProtocolError as exc:
            _drop(counters, kind, "malformed", device, str(exc))
            continue
        counters.ingested[kind] += 1
        if not message.retain:
            batch.seen.add(device)
    return batch


def _newest_reports(addressed: Sequence[tuple[Message, str, str]]) -> tuple[
        list[tuple[Message, str, str]], list[tuple[Message, str, str]]]:
    """ADDRESSED less the reported states that a later one of the same device in it
    supersedes, and those. Only the newest report per device in a batch is written, so
    only it is parsed: a device sends one per update state, and a batch taken while
    the hub is behind holds several of one device (parsing was most of a report's cost
    at 10,000 devices, py-spy)."""
    newest = {device: i for i, (_, device, kind) in enumerate(addressed) if kind == "reported"}
    kept: list[tuple[Message, str, str]] = []
    superseded: list[tuple[Message, str, str]] = []
    for i, item in enumerate(addressed):
        _, device, kind = item
        (superseded if kind == "reported" and newest[device] != i else kept).append(item)
    return kept, superseded


def _count_superseded(superseded: Sequence[tuple[Message, str, str]], known: set[str],
                      counters: Counters, batch: _Batch) -> None:
    """Superseded reports count as ingested, unchecked (a malformed one is not told
    apart), and as live messages of their device; an unknown device's are dropped.
    A device whose newest report was malformed has its next newest parsed instead,
    and so on: what would have been written before a newer one came still is."""
    for message, device, kind in reversed(superseded):  # newest first
        if device not in known:
            _drop(counters, kind, "unknown_device", device,
                  "the hub knows no such device (never enrolled here)")
            continue
        if device not in batch.reported:
            try:
                report = protocol.parse_reported(message.payload, device_id=device)
            except protocol.ProtocolError as exc:
                _drop(counters, kind, "malformed", device, str(exc))
                continue
            batch.reported[device] = (report, message.payload)
        counters.ingested[kind] += 1
        if not message.retain:
            batch.seen.add(device)


def write_batch(db: Database, messages: Sequence[Message], *, shared: bool = False) -> Counters:
    """Parse MESSAGES and write them in one transaction; bad ones are dropped.
    Returns what was written and dropped. SHARED: other replicas take messages of the
    same devices (`replica_subscriptions`), so a report may arrive after a newer one
    (see `_stale`).

    Parsing happens before the transaction, so the write lock is held only
    for the writes."""
    counters = Counters(batches=1, last_batch=len(messages),
                        batch_sizes=Counter({len(messages): 1}))
    addressed: list[tuple[Message, str, str]] = []
    for message in messages:
        try:
            device, kind = protocol.parse_topic(message.topic)
        except protocol.ProtocolError as exc:
            _drop(counters, "other", "bad_topic", repr(message.topic[:200]), str(exc))
            continue
        addressed.append((message, device, kind))
    addressed, superseded = _newest_reports(addressed)
    known = {r["id"] for r in db.query(
        "SELECT id FROM devices WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted({device for _, device, _ in addressed})),))}
    batch = _parse(addressed, known, counters)
    _count_superseded(superseded, known, counters, batch)
    clock = datetime.now(UTC)
    stamp = format_time(clock)
    if batch.telemetry:
        newest = max(points.points[-1].at for points in batch.telemetry)
        counters.lag_seconds = (clock - newest).total_seconds()
    with db.transaction() as conn:
        events.device_status(conn, {**dict.fromkeys(batch.seen, "online"), **batch.status},
                             actor="ingest")
        conn.executemany("UPDATE devices SET status = ? WHERE id = ?",
                         [(status, device) for device, status in batch.status.items()])
        # A live message says the device is there: online again if hub/liveness.py had
        # marked it offline for its silence (unless the batch has its own status news).
        # One statement for the batch's devices: one each cost ~2 us a message.
        conn.execute("UPDATE devices SET last_seen = ?, status = CASE WHEN id IN"
                     " (SELECT value FROM json_each(?)) THEN status ELSE 'online' END"
                     " WHERE id IN (SELECT value FROM json_each(?))",
                     (stamp, json.dumps(sorted(batch.status)), json.dumps(sorted(batch.seen))))
        reports = {}
        for device, (report, payload) in batch.reported.items():
            if shared and _stale(conn, device, report):
                _drop(counters, "reported", "stale", device, "a newer report is stored")
                continue
            reports[device] = (report, payload)
        _write_reported(conn, reports, stamp)
        oldest, newest = clock - OLDEST_POINT, clock + NEWEST_POINT
        sketches = drift_sketches.Sketches(conn, [points.device_id for points in batch.telemetry])
        counted = drift_sketches.stored_points(conn, [(points.device_id, p.seq) for points in
                                             batch.telemetry for p in points.points if p.sketches])
        rows = []
        stamps: dict[datetime, str] = {}  # a message's points mostly share one time
        for points in batch.telemetry:
            kept = [p for p in points.points if oldest <= p.at <= newest]
            if len(kept) < len(points.points):
                outside = len(points.points) - len(kept)
                counters.points_out_of_window += outside
                counters.notes["telemetry", "out_of_window"] = (
                    f"dropped {outside} telemetry point(s) from {points.device_id}: stamped "
                    f"outside {protocol.format_time(oldest)}..{protocol.format_time(newest)}")
            for p in kept:
                at = stamps.get(p.at)
                if at is None:
                    at = stamps[p.at] = protocol.format_time(p.at)
                rows.append((points.device_id, p.seq, at, p.kind, p.values))
                if (points.device_id, p.seq) not in counted:  # resent: counted already
                    sketches.add(points.device_id, p)
        new = telemetry.store(db, rows)  # a savepoint in this transaction
        counters.points += new
        counters.duplicate_points += len(rows) - new
        _count_sketches(counters, sketches)
    return counters


def _count_sketches(counters: Counters, sketches: drift_sketches.Sketches) -> None:
    sketches.write()
    counters.sketches += sketches.stored
    counters.sketches_dropped.update(sketches.dropped)
    if sketches.dropped:
        counters.notes["telemetry", "sketch_dropped"] = sketches.note


def derived_tags(report: protocol.ReportedState) -> dict[str, str]:
    """Tags a rollout can target without anyone setting them: the CPU architecture
    ("arch=arm64"), each accelerator ("accel.openvino.GPU=yes") and, for a device
    in container mode, its engine ("runtime.container=podman"). A tag an
    operator set by hand wins over a derived one of the same key."""
    arch = report.platform.split("/")[1]
    tags = {"arch": arch}
    for choice in report.accelerators:
        runtime, _, device = choice.partition(":")
        tags[f"accel.{runtime}.{device}"] = "yes"
    engine = report.inventory.get("container_engine")
    if engine:
        tags["runtime.container"] = str(engine)
    return {**tags, **cluster_tags(report.inventory)}


def cluster_tags(inventory: Mapping[str, object]) -> dict[str, str]:
    """A Kubernetes agent's (agent/kube/inventory.py facts): "runtime.kubernetes=true",
    each architecture its nodes have ("arch.arm64=yes") and each extended resource
    with its count ("accel.kubernetes.nvidia.com_gpu=2")."""
    if "kubernetes_version" not in inventory:
        return {}
    tags = {"runtime.kubernetes": "true"}
    for platform in str(inventory.get("platforms", "")).split(","):
        if platform.count("/") >= 1:
            tags[f"arch.{platform.split('/')[1]}"] = "yes"
    for name, value in inventory.items():
        if name.startswith("accelerator."):
            tags[f"accel.kubernetes.{name.removeprefix('accelerator.')}"[:64]] = str(value)
    return tags


def _stale(conn: Connection, device: str, report: protocol.ReportedState) -> bool:
    """Is a newer report of DEVICE stored? Replicas write one device's reports in
    parallel, and one may hold an older report while another writes a newer (or one it
    had in flight when it died, delivered again when it is back). A device applies
    desired generations in order, and within one its states only move forward in time:
    of two reports, the newer has the higher (applied generation, newest state's start)."""
    stored = conn.execute(
        "SELECT applied_generation, (SELECT MAX(since) FROM deployment_status"
        " WHERE device_id = ?) FROM devices WHERE id = ?", (device, device)).fetchone()
    if stored is None or stored[0] is None:
        return False
    since = max((protocol.format_time(d.since) for d in report.deployments), default="")
    return (stored[0], stored[1] or "") > (report.applied_generation, since)


def _write_reported(
    conn: Connection, reports: Mapping[str, tuple[protocol.ReportedState, bytes]], stamp: str,
) -> None:
    """Write a batch's REPORTS (device -> its newest report and that report's payload):
    a statement for all of them each, not a few per device (py-spy at 10,000 devices)."""
    if not reports:
        return
    conn.executemany(
        "UPDATE devices SET reported = ?, applied_generation = ?, platform = ?,"
        " inventory = json_patch(COALESCE(inventory, '{}'), ?),"
        " tags = json_patch(?, COALESCE(tags, '{}')) WHERE id = ?",
        [(payload.decode("utf-8"), report.applied_generation, report.platform,
          dumps({**report.inventory, "accelerators": list(report.accelerators),
                 "agent_version": report.agent_version}),
          dumps(derived_tags(report)), device) for device, (report, payload) in reports.items()],
    )
    events.deployment_failures(
        conn, {device: report.deployments for device, (report, _) in reports.items()},
        actor="ingest")
    conn.execute("DELETE FROM deployment_status WHERE device_id IN"
                 " (SELECT value FROM json_each(?))", (dumps(sorted(reports)),))
    conn.executemany(
        "INSERT INTO deployment_status (device_id, name, model, version, state, error, runtime,"
        " device, since, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(device, d.name, d.model, d.version, str(d.state), d.error, d.runtime, d.device,
          protocol.format_time(d.since), stamp)
         for device, (report, _) in reports.items() for d in report.deployments],
    )


class Ingest:
    """The loop: take what has arrived, write it, go round again; see the module docstring."""

    def __init__(self, db: Database, session: Session, *, max_batch: int = 500,
                 watch: RetainedWatch | None = None,
                 heartbeat_topic: str = HEARTBEAT_TOPIC, shared: bool = False) -> None:
        """SHARED: one replica of several, reading `replica_subscriptions`."""
        self.db, self.session, self.max_batch = db, session, max_batch
        self.heartbeat_topic = heartbeat_topic  # this hub's own (`replica_subscriptions`)
        self.shared = shared
        self.watch = watch  # judges what is on the desired topics (hub/retained.py)
        self._counters = Counters()
        self._counters_lock = threading.Lock()  # the REST API reads them from other threads
        self._repeats = Repeats(log)  # the ingest thread's only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat_at: float | None = None  # time.monotonic() when the last one arrived

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mqtt-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch under way, then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = self._take()
                except MqttError:  # the session was closed under us: stopping
                    return
                if batch:
                    self._write(batch)
        finally:
            self._repeats.flush()

    def _take(self) -> list[Delivery]:
        """What has arrived, up to max_batch, waiting up to half a second for the first."""
        try:
            return self.session.take_many(self.max_batch, 0.5)
        except MqttTimeout:
            return []

    def _write(self, batch: list[Delivery]) -> None:
        beats = [d for d in batch if d.message.topic == self.heartbeat_topic]
        if beats:
            self.heartbeat_at = time.monotonic()
            self.session.ack_many(beats)
            batch = [d for d in batch if d.message.topic != self.heartbeat_topic]
            if not batch:
                return
        desired = [d for d in batch if d.message.topic.endswith("/desired")]
        if desired:
            self._watch(desired)
            batch = [d for d in batch if not d.message.topic.endswith("/desired")]
            if not batch:
                return
        try:
            self._count(write_batch(self.db, [d.message for d in batch], shared=self.shared))
        except Exception:
            log.exception("writing a batch of %d message(s) failed; writing them one by one",
                          len(batch))
            self._write_one_by_one(batch)
            return
        self.session.ack_many(batch)

    def _watch(self, deliveries: list[Delivery]) -> None:
        addressed = []
        for delivery in deliveries:
            try:
                device, _ = protocol.parse_topic(delivery.message.topic)
            except protocol.ProtocolError:
                continue
            addressed.append((device, delivery.message.payload))
        if self.watch is not None and addressed:
            try:
                self.watch.see(addressed)
            except Exception:  # the loop must survive a busy or broken database
                log.exception("judging %d desired state(s) on the broker failed",
                              len(addressed))
        self.session.ack_many(deliveries)

    def _write_one_by_one(self, batch: list[Delivery]) -> None:
        """So a message that breaks the writer costs only itself. It is acknowledged
        all the same: left unacknowledged it would come back after every reconnect
        and hold a place in the broker's in-flight window."""
        for delivery in batch:
            message = delivery.message
            try:
                self._count(write_batch(self.db, [message], shared=self.shared))
            except Exception as exc:
                failed = Counters()
                _drop(failed, message.topic.rsplit("/", 1)[-1], "write_failed",
                      repr(message.topic[:200]), repr(exc))
                self._count(failed)
            self.session.ack(delivery)

    def _count(self, counters: Counters) -> None:
        for key, line in counters.notes.items():
            count = counters.dropped.get(key, 1)
            self._repeats.note(key, line, count)
        with self._counters_lock:
            self._counters.add(counters)

    def stats(self) -> dict[str, Any]:
        with self._counters_lock:
            return self._counters.as_dict()

    def totals(self) -> Counters:
        """A copy of the counters since the hub started (hub/metrics.py reads them)."""
        with self._counters_lock:
            c = self._counters
            return replace(c, ingested=Counter(c.ingested), dropped=Counter(c.dropped),
                           batch_sizes=Counter(c.batch_sizes),
                           sketches_dropped=Counter(c.sketches_dropped))
