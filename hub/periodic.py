"""A job the hub runs every few seconds on a thread of its own, while this hub leads.

The rollout engine, liveness, retention and the drift schedule are each one of
these (docs/architecture.md, "Several hub replicas"): one loop here, so each of
them is only its work. LEADS says whether this hub runs the one-replica jobs now
(hub/leader.py); a hub that does not lead only waits for the next interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("edgefleet.hub.periodic")


class Periodic:
    """WORK every INTERVAL seconds (at once after a start if AT_START), sooner when poked."""

    def __init__(self, name: str, work: Callable[[], object], *, interval: float,
                 leads: Callable[[], bool] = lambda: True, at_start: bool = False) -> None:
        if not interval > 0:
            raise ValueError(f"the {name} job needs a positive interval, not {interval}")
        self.name, self.work, self.interval = name, work, interval
        self.leads, self.at_start = leads, at_start
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop once the work under way returns (long work checks `stopping`)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self) -> None:
        """Run now (something changed), not at the next interval."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def rest(self, seconds: float) -> bool:
        """A pause inside long work that a stop cuts short; whether the job is stopping."""
        return self._stop.wait(seconds)

    def _run(self) -> None:
        if not self.at_start:
            self._sleep()
        while not self._stop.is_set():
            if self.leads():
                try:
                    self.work()
                except Exception:  # one bad run (a database gone) must not end the job
                    log.exception("the %s job failed; again in %ss", self.name, self.interval)
            self._sleep()

    def _sleep(self) -> None:
        self._wake.wait(self.interval)
        self._wake.clear()
