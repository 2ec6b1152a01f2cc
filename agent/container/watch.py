"""Container mode's supervision: the engine and the containers that should be serving.

The daemon asks `ContainerWatch.check` from its main loop. Every few
seconds (when due) it lists the agent's containers: containers of versions
nothing serves any more (an interrupted update's, after a kill -9) are
removed, and the deployments whose containers are not running (crashed past
their restart policy, removed by hand, or an engine that came back empty)
are named for the daemon to load again, with why. An engine that does not
answer is recorded (the inventory's `container_engine_error`, telemetry's
`container_engine_up`) and asked again with backoff; nothing here raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.container.engine import ContainerStatus, EngineError
from agent.container.serving import ContainerError, ContainerServing
from agent.mqtt import BackoffPolicy

log = logging.getLogger("edgefleet.agent")


@dataclass
class ContainerWatch:
    serving: ContainerServing
    interval: float = 5.0  # between checks while the engine answers
    policy: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=1.0,
                                                                         maximum=60.0))
    clock: Callable[[], float] = time.monotonic
    engine: dict[str, str] = field(default_factory=dict)  # describe(), once it answered
    error: str | None = None  # why the engine did not answer the last time
    _failures: int = 0
    _next: float = 0.0

    def due(self) -> bool:
        return self.clock() >= self._next

    def check(self, wanted: Mapping[str, set[str]]) -> dict[str, str]:
        """WANTED: the container names each serving deployment needs. The deployments
        to load again, each with why."""
        try:
            if not self.engine:
                self.engine = self.serving.engine.describe()
            found = self.serving.containers()
            keep = set().union(*wanted.values()) if wanted else set()
            removed = self.serving.keep_only(keep)
        except (EngineError, ContainerError) as exc:
            self._failed(str(exc))
            return {}
        if removed:
            log.info("removed containers nothing serves: %s", ", ".join(removed))
        self._failures, self.error = 0, None
        self._next = self.clock() + self.interval
        by_name = {c.name: c for c in found}
        broken = {}
        for deployment, names in wanted.items():
            down = [by_name.get(name) for name in sorted(names)
                    if name not in by_name or by_name[name].ended]
            if down:
                broken[deployment] = "; ".join(
                    _why(status) + ("" if status is None else
                                    f"; last log lines:\n{self.serving.engine.logs(status.name)}")
                    for status in down)
        return broken

    def _failed(self, error: str) -> None:
        if self.error is None:
            log.warning("the container engine does not answer: %s", error)
        self.error = error
        self._next = self.clock() + self.policy.delay(self._failures)
        self._failures += 1

    def facts(self) -> dict[str, str]:
        """What the inventory says of the engine."""
        facts = {}
        if self.engine:
            facts = {"container_engine": self.engine["engine"],
                     "container_engine_version": self.engine["version"][:128]}
        # Always sent: the hub merges inventories, so a cleared error must be said.
        facts["container_engine_error"] = (self.error or "")[:128]
        return facts


def _why(status: ContainerStatus | None) -> str:
    if status is None:
        return "its container was gone"
    ended = (f"exit code {status.exit_code}" if status.exit_code is not None
             else status.state)
    oom = ", out of memory" if status.oom_killed else ""
    return f"{status.name} ended ({ended}{oom}, {status.restarts} restarts)"
