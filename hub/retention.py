"""Telemetry retention: raw points rolled up, then everything past its time deleted.

One thread of its own, so ingest never waits for it beyond one short transaction. A
pass first rolls up the raw points stored since the last one (hub/rollups.py: per
device and version, per minute and per hour), then deletes raw points older than
`raw`, minute rollups older than `minute` and hour rollups older than `hour`, and
events (hub/events.py) older than `events` with their webhook deliveries. Each
step is a transaction of at most `batch` rows with a rest after it, so ingest's
writes get the lock in between; the rest is long enough that the thread is busy at
most `duty` of the time (a quarter by default): in the same process, it would
otherwise take half the CPU from ingest while it catches up a backlog
(bench/retention.py measures both).

Which raw points are rolled up is kept per device (`telemetry_rolled`: the highest
seq done). Agents number points in the order they measure them, so a point that
arrives late (a device back from hours offline) has a higher seq than everything
before it and is rolled up by the next pass, merged into the rollups already
stored. A raw point is deleted only once it is rolled up, so a pass that falls
behind loses nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hub import rollups
from hub.periodic import Periodic
from hub.storage import errors
from hub.storage.db import Database, format_time

log = logging.getLogger("edgefleet.hub.retention")


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each resolution is kept; checked when made."""

    raw: timedelta = timedelta(hours=48)
    minute: timedelta = timedelta(days=7)
    hour: timedelta = timedelta(days=400)
    events: timedelta = timedelta(days=30)  # hub/events.py, with their webhook deliveries
    batch: int = 1000  # rows per transaction

    def __post_init__(self) -> None:
        if self.raw < timedelta(hours=1):
            raise ValueError(f"raw telemetry must be kept at least an hour, not {self.raw}")
        if not self.raw <= self.minute <= self.hour:
            raise ValueError("telemetry retention must grow with the resolution: raw "
                             f"{self.raw} <= minute rollups {self.minute} <= hour rollups "
                             f"{self.hour}")
        if self.events < timedelta(days=1):
            raise ValueError(f"events must be kept at least a day, not {self.events}")
        if not 1 <= self.batch <= 100_000:
            raise ValueError(f"the retention batch must be 1-100000 rows, not {self.batch}")

    def keep(self, resolution: str) -> timedelta:
        return {"raw": self.raw, "minute": self.minute, "hour": self.hour}[resolution]


def _track_new_devices(db: Database) -> None:
    """Every device gets a row in telemetry_rolled (seq 0: nothing rolled up yet)."""
    counts = db.query_one("SELECT (SELECT COUNT(*) FROM devices) AS devices,"
                          " (SELECT COUNT(*) FROM telemetry_rolled) AS tracked") or {}
    if counts.get("devices") != counts.get("tracked"):
        with db.transaction() as conn:
            # WHERE true: SQLite would read ON CONFLICT as the SELECT's join clause.
            conn.execute("INSERT INTO telemetry_rolled (device_id, seq)"
                         " SELECT id, 0 FROM devices WHERE true ON CONFLICT DO NOTHING")


def roll_up_batch(db: Database, limit: int) -> int:
    """Roll up at most LIMIT raw points not rolled up yet; returns how many there were.

    The reads and the merge happen outside the write transaction (only this thread
    writes rollups); the transaction moves each device's mark only if nobody moved it
    meanwhile (a deleted device has none), then writes the merged rows."""
    rows = db.query(
        "SELECT c.device_id, c.seq AS done, t.seq, t.at, t.kind, t.metrics"
        " FROM telemetry_rolled c CROSS JOIN telemetry t"  # c outer: a seek per device
        " ON t.device_id = c.device_id AND t.seq > c.seq"
        " ORDER BY c.device_id, t.seq LIMIT ?", (limit,))
    if not rows:
        return 0
    marks: dict[str, tuple[int, int]] = {}
    for r in rows:
        marks[r["device_id"]] = (r["done"], r["seq"])
    found = rollups.roll_up((r["device_id"], r["at"], r["kind"], json.loads(r["metrics"]))
                            for r in rows)
    stored = db.query(
        "SELECT r.* FROM json_each(?) k JOIN telemetry_rollups r"
        " ON r.device_id = json_extract(k.value, '$[0]')"
        " AND r.period = CAST(json_extract(k.value, '$[1]') AS BIGINT)"
        " AND r.start = json_extract(k.value, '$[2]') AND r.kind = json_extract(k.value, '$[3]')"
        " AND r.deployment = json_extract(k.value, '$[4]')"
        " AND r.version = json_extract(k.value, '$[5]')",
        (json.dumps(list(found)),))
    for r in stored:
        key = (r["device_id"], r["period"], r["start"], r["kind"], r["deployment"], r["version"])
        merged = rollups.Rollup.loads(r["points"], r["stats"])
        merged.merge(found[key])
        found[key] = merged
    with db.transaction() as conn:
        moved = {device for device, (done, last) in marks.items()
                 if conn.execute("UPDATE telemetry_rolled SET seq = ? WHERE device_id = ?"
                                 " AND seq = ?", (last, device, done)).rowcount}
        conn.executemany(
            "INSERT INTO telemetry_rollups (device_id, period, start, kind, deployment, version,"
            " points, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, period,"
            " start, kind, deployment, version) DO UPDATE SET points = excluded.points,"
            " stats = excluded.stats",
            [(*key, rollup.points, rollup.dumps()) for key, rollup in found.items()
             if key[0] in moved])
    return len(rows)


def prune_batch(db: Database, resolution: str, cutoff: datetime, limit: int) -> int:
    """Delete at most LIMIT rows of RESOLUTION older than CUTOFF (raw points only once
    rolled up); returns how many went."""
    stamp = format_time(cutoff)
    with db.transaction() as conn:
        if resolution == "raw":
            return conn.execute(
                "DELETE FROM telemetry WHERE rowid IN (SELECT t.rowid FROM telemetry t"
                " JOIN telemetry_rolled c ON c.device_id = t.device_id"
                " WHERE t.at < ? AND t.seq <= c.seq LIMIT ?)", (stamp, limit)).rowcount
        return conn.execute(
            "DELETE FROM telemetry_rollups WHERE rowid IN (SELECT rowid FROM telemetry_rollups"
            " WHERE period = ? AND start < ? LIMIT ?)",
            (rollups.PERIODS[resolution], stamp, limit)).rowcount


def prune_events(db: Database, cutoff: datetime, limit: int) -> int:
    """Delete at most LIMIT events older than CUTOFF, and the webhook deliveries of
    those events (delivered, dead or still trying: their body is gone); how many went."""
    with db.transaction() as conn:
        gone = [row[0] for row in conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE at < ?"
            " ORDER BY seq LIMIT ?) RETURNING seq", (format_time(cutoff), limit))]
        if gone:
            conn.execute("DELETE FROM webhook_deliveries WHERE event_seq <= ?", (max(gone),))
    return len(gone)


class Retention(Periodic):
    """The job: a pass every INTERVAL seconds; CLOCK is injected (tests, bench/retention.py)."""

    def __init__(
        self, db: Database, policy: RetentionPolicy, *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        interval: float = 30.0, pause: float = 0.05, duty: float = 0.25,
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        """LEADS says whether this hub runs the one-replica jobs now (hub/leader.py)."""
        if pause < 0 or not 0 < duty <= 1:
            raise ValueError(f"retention needs a pause not negative and a duty in (0, 1]; "
                             f"got {pause} and {duty}")
        super().__init__("telemetry-retention", self._pass, interval=interval, leads=leads,
                         at_start=True)
        self.db, self.policy, self.clock = db, policy, clock
        self.pause, self.duty = pause, duty
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {"passes": 0, "rolled_up": 0, "failures": 0,
                                       "deleted": {"raw": 0, "minute": 0, "hour": 0},
                                       "events_deleted": 0,
                                       "last_pass_seconds": None}

    def _pass(self) -> None:
        try:
            self.run_once()
        except errors.ANY as exc:  # a busy or full database: the next pass tries again
            log.warning("telemetry retention pass failed: %s; retrying in %ss",
                        exc, self.interval)
            self._count(failures=1)
        except Exception:  # a bug: logged whole, and the job keeps going
            log.exception("telemetry retention pass failed; retrying in %ss", self.interval)
            self._count(failures=1)

    def run_once(self) -> None:
        """Roll up everything new, then delete everything past its time, a batch at a time."""
        started = time.monotonic()
        _track_new_devices(self.db)
        while not self.stopping:
            step = time.monotonic()
            done = roll_up_batch(self.db, self.policy.batch)
            self._count(rolled_up=done)
            if done < self.policy.batch:
                break
            self._rest(step)
        now = self.clock()
        for resolution in ("raw", "minute", "hour"):
            cutoff = now - self.policy.keep(resolution)
            while not self.stopping:
                step = time.monotonic()
                gone = prune_batch(self.db, resolution, cutoff, self.policy.batch)
                self._count(deleted={resolution: gone})
                if gone < self.policy.batch:
                    break
                self._rest(step)
        while not self.stopping:
            step = time.monotonic()
            gone = prune_events(self.db, now - self.policy.events, self.policy.batch)
            self._count(events_deleted=gone)
            if gone < self.policy.batch:
                break
            self._rest(step)
        self._count(passes=1, last_pass_seconds=round(time.monotonic() - started, 3))

    def _rest(self, since: float) -> None:
        """After a step that began at SINCE: a pause, at least long enough to keep the
        thread busy no more than DUTY of the time."""
        busy = time.monotonic() - since
        self.rest(max(self.pause, busy * (1 - self.duty) / self.duty))

    def _count(self, **change: Any) -> None:
        with self._lock:
            for name, value in change.items():
                if name == "deleted":
                    for resolution, n in value.items():
                        self._stats["deleted"][resolution] += n
                elif name == "last_pass_seconds":
                    self._stats[name] = value
                else:
                    self._stats[name] += value

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "deleted": dict(self._stats["deleted"])}
