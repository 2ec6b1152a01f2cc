"""The thread that drives rollouts: `hub.rollouts.engine.Engine.tick` once a second.

All rollout state is in the database, so this thread holds none: killed and
started again (with the hub), it carries on where the database says. Health
checks read telemetry, completed rollouts look for devices that joined
their target with a scan of the devices, and serving devices are looked at
(hub/rollouts/engine.py `news`), so these run every few ticks rather than
every one. Of several hubs on one PostgreSQL database only the leader ticks
(hub/leader.py); the others check each interval whether they lead now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hub.periodic import Periodic
from hub.rollouts.engine import Engine
from hub.storage.db import Database


class RolloutEngine(Periodic):
    """`poke()` when a rollout was created or changed: it ticks now."""

    def __init__(self, db: Database, notify: Callable[[Iterable[str]], None], *,
                 interval: float = 1.0, health_every: int = 5,
                 leads: Callable[[], bool] = lambda: True) -> None:
        """LEADS says whether this hub runs the one-replica jobs now (hub/leader.py)."""
        super().__init__("rollouts", self._tick, interval=interval, leads=leads,
                         at_start=True)
        self.engine = Engine(db, notify)
        self.health_every = health_every
        self._ticks = 0

    def _tick(self) -> None:
        slow = self._ticks % self.health_every == 0
        self._ticks += 1
        self.engine.tick(check_health=slow, check_joiners=slow)
