"""The thread that drives rollouts: `hub.rollouts.engine.Engine.tick` once a second.

All rollout state is in the database, so this thread holds none: killed and
started again (with the hub), it carries on where the database says. Health
checks read telemetry, and completed rollouts look for devices that joined
their target with a scan of the devices, so both run every few ticks rather
than every one. Of several hubs on one PostgreSQL database only the leader ticks
(hub/leader.py); the others check each interval whether they lead now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from hub.rollouts.engine import Engine
from hub.storage.db import Database

log = logging.getLogger("edgefleet.rollouts")


class RolloutEngine:
    def __init__(self, db: Database, notify: Callable[[Iterable[str]], None], *,
                 interval: float = 1.0, health_every: int = 5,
                 leads: Callable[[], bool] = lambda: True) -> None:
        """LEADS says whether this hub runs the one-replica jobs now (hub/leader.py)."""
        self.engine = Engine(db, notify)
        self.leads = leads
        self.interval = interval
        self.health_every = health_every
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def poke(self) -> None:
        """Tick now (a rollout was created or changed), not at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        ticks = 0
        while not self._stop.is_set():
            if not self.leads():
                self._wake.wait(self.interval)
                self._wake.clear()
                continue
            try:
                slow = ticks % self.health_every == 0
                self.engine.tick(check_health=slow, check_joiners=slow)
            except Exception:  # the database gone: one bad tick must not end rollouts for good
                log.exception("rollout tick failed")
            ticks += 1
            self._wake.wait(self.interval)
            self._wake.clear()
