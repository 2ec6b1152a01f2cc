"""Which hub process runs the one-replica jobs: exactly one of those on one database.

The rollout engine, liveness, retention, webhook delivery and the drift schedule
must run once per fleet, not once per hub (docs/architecture.md, "Several hub
replicas"). On SQLite there is one hub per database (DATA/hub.lock), so it leads.
On PostgreSQL, several hubs may share the database: the leader is the one holding a
session-level advisory lock on a connection of its own. The server frees it when
that session ends, so a leader killed outright (its socket closed by the kernel) is
followed by the next hub to look, within one job interval.

One `Leader` per process; its jobs (hub/periodic.py) ask `held()` from their own
threads, and the answer is kept for `recheck` seconds: the webhook dispatcher alone
asks four times a second, and each fresh answer is a round trip to the database.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib

from hub.storage import errors
from hub.storage.db import Connection, Database

log = logging.getLogger("edgefleet.hub.leader")

_LOCK = zlib.crc32(b"edgefleet rollout engine")  # the name it had when only the engine led
_JOBS = "the one-replica jobs (rollout engine, liveness, retention, webhooks, drift)"


class Leader:
    def __init__(self, db: Database, *, recheck: float = 1.0) -> None:
        if recheck < 0:
            raise ValueError(f"the leader's recheck interval cannot be negative: {recheck}")
        self._db, self.recheck = db, recheck
        self._conn: Connection | None = None
        self._held = False
        self._checked = -float("inf")  # time.monotonic() of the last fresh answer
        self._mutex = threading.Lock()  # one connection, asked from several jobs' threads

    def held(self) -> bool:
        """Whether this process leads now: takes the lock when free, and checks that a lock
        held is still held (its session alive)."""
        if self._db.dialect.name == "sqlite":
            return True
        with self._mutex:
            if time.monotonic() - self._checked < self.recheck:
                return self._held
            try:
                if self._conn is None:
                    self._conn = self._db.dialect.connect()
                if self._held:
                    self._conn.execute("SELECT 1")
                elif self._conn.execute("SELECT pg_try_advisory_lock(?)",
                                        (_LOCK,)).fetchone()[0]:
                    self._held = True
                    log.info("this hub now leads: it runs %s", _JOBS)
            except errors.ANY as exc:
                if self._held:
                    log.warning("this hub no longer leads %s: %s", _JOBS, exc)
                self._release()
            self._checked = time.monotonic()
            return self._held

    def release(self) -> None:
        """Give the lead up (the hub stops): another hub may take it at once."""
        with self._mutex:
            self._release()

    def _release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                if self._held:  # at once: the session's end frees it only a moment later
                    conn.execute("SELECT pg_advisory_unlock(?)", (_LOCK,))
                conn.close()
            except errors.ANY:
                pass  # a session the server already ended: nothing held
        self._held = False
        self._checked = -float("inf")
