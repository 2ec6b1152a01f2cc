"""At most N inferences at once, at most Q waiting; anything beyond is turned away at once.

A full queue answers 503 with Retry-After instead of letting latency grow
without bound: the client (or the load balancer in front) can go elsewhere
or come back. Used from the event loop only, so its counters need no lock.
A slot is released when the work it guarded has finished in its thread,
not when the awaiting coroutine goes away, so a cancelled request never
lets more than N computations run.
"""

from __future__ import annotations

import asyncio

from agent.serving.errors import Overloaded

RETRY_AFTER_SECONDS = 1


class Limiter:
    def __init__(self, *, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_concurrency)

    @property
    def busy(self) -> bool:
        """True when a new request would have to wait."""
        return self._slots.locked()

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if there is room; Overloaded if there is none."""
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise Overloaded(
                f"the server is at capacity ({self.running} inferences running,"
                f" {self.waiting} waiting); retry later",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._slots.release()
