"""Device liveness from the hub's own clock: a device not heard from counts as offline.

The broker says when a device goes (its last will), but not always: a device that
died while the hub and its managed broker were down never had a connection for the
broker to lose, so its retained status stays `online`. So the hub also keeps its own
account. Every live message sets `devices.last_seen` (hub/ingest.py; agents send
telemetry every 10 s), and this thread marks `offline` every `online` device silent
for longer than `silent_for`. A device marked so that speaks again is `online` at
its next message.

The hub judges only what it can see: while its heartbeats do not come back through
the broker (hub/fleet.py `receiving`), silence says nothing about devices, so no
device is marked; and after a start, or once the link receives again, every device
gets a whole `silent_for` to be heard first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from hub import events
from hub.events import EventType
from hub.periodic import Periodic
from hub.storage.db import Database, format_time

log = logging.getLogger("edgefleet.hub.liveness")


def mark_silent(db: Database, *, now: datetime, silent_for: timedelta) -> list[str]:
    """Mark offline the online devices last heard from before NOW - SILENT_FOR; their ids."""
    with db.transaction() as conn:
        silent = sorted(row[0] for row in conn.execute(
            "UPDATE devices SET status = 'offline' WHERE status = 'online'"
            " AND (last_seen IS NULL OR last_seen < ?) RETURNING id",
            (format_time(now - silent_for),)))
        events.record_many(conn, EventType.DEVICE_OFFLINE, silent, actor="liveness",
                           detail=f"silent for over {silent_for}")
    return silent


class Liveness(Periodic):
    """The job: a sweep every INTERVAL seconds once the grace after a start is over."""

    def __init__(self, db: Database, *, silent_for: timedelta, receiving: Callable[[], bool],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 interval: float = 10.0, leads: Callable[[], bool] = lambda: True) -> None:
        """LEADS says whether this hub runs the one-replica jobs now (hub/leader.py)."""
        if silent_for <= timedelta(0):
            raise ValueError(f"liveness needs a positive silence, not {silent_for}")
        super().__init__("device-liveness", self.sweep, interval=interval, leads=leads)
        self.db, self.silent_for, self.receiving = db, silent_for, receiving
        self.clock = clock
        self.marked = 0
        self._heard_from = clock()  # since when the link has received without a break

    def start(self) -> None:
        self._heard_from = self.clock()
        super().start()

    def sweep(self) -> list[str]:
        """Mark the silent devices, if the hub can tell; returns their ids."""
        now = self.clock()
        if not self.receiving():
            self._heard_from = now
            return []
        if now - self._heard_from < self.silent_for:
            return []
        silent = mark_silent(self.db, now=now, silent_for=self.silent_for)
        if silent:
            self.marked += len(silent)
            log.info("%d device(s) silent for over %s, now offline: %s%s", len(silent),
                     self.silent_for, ", ".join(silent[:10]), " ..." if len(silent) > 10 else "")
        return silent
