"""At most N inferences at once; a request that would wait too long is turned away at once.

Two limits on waiting, whichever is reached first: a count (at most Q
requests waiting, a bound on memory) and a wait budget (a request whose
estimated wait is over B seconds). The estimate is the expected work ahead of
it, queued and running, shared by the N slots; each request brings its own
expected work (its version's recent time per request). So a burst of 32 on a
sub-millisecond model waits a few milliseconds and is served, while a slow
model sheds load as soon as the queue holds more than B seconds of it.
Either refusal is a 503 with Retry-After, so the client (or the load balancer
in front) can go elsewhere or come back.

Used from the event loop only, so its counters need no lock. A slot is
released when the work it guarded has finished in its thread, not when the
awaiting coroutine goes away, so a cancelled request never lets more than N
computations run.
"""

from __future__ import annotations

import asyncio
import math

from agent.serving.errors import Overloaded

RETRY_AFTER_SECONDS = 1


class Limiter:
    def __init__(
        self, *, max_concurrency: int, max_queue: int, max_wait: float | None = None
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue}")
        if max_wait is not None and not 0 < max_wait <= 3600:
            raise ValueError(f"max_wait must be above 0 and at most 3600 s, got {max_wait}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_wait = max_wait  # seconds; None: only the count limits waiting
        self.running = 0
        self.waiting = 0
        self.backlog = 0.0  # expected seconds of work admitted and not finished
        self._slots = asyncio.Semaphore(max_concurrency)

    @property
    def busy(self) -> bool:
        """True when a new request would have to wait."""
        return self._slots.locked()

    def estimated_wait(self) -> float:
        """Seconds a request admitted now would wait for its turn."""
        return self.backlog / self.max_concurrency

    def admit(self, expected: float, *, queued: bool) -> None:
        """Count a request expecting EXPECTED seconds of work in, or raise Overloaded.
        QUEUED: it will wait (all slots are busy, or it joins a batch being gathered).
        Every admitted request leaves with `leave`."""
        if queued:
            if self.waiting >= self.max_queue:
                raise Overloaded(
                    f"the server is at capacity ({self.running} inferences running,"
                    f" {self.waiting} waiting); retry later",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            wait = self.estimated_wait()
            if self.max_wait is not None and wait > self.max_wait:
                raise Overloaded(
                    f"the server would make this request wait about {wait * 1000:.0f} ms, over"
                    f" its budget of {self.max_wait * 1000:.0f} ms; retry later",
                    retry_after=max(RETRY_AFTER_SECONDS, math.ceil(wait)),
                )
        self.backlog += expected

    def leave(self, expected: float) -> None:
        # Clamped: floating point sums of many small numbers do not cancel exactly.
        self.backlog = max(0.0, self.backlog - expected)

    def enqueue(self) -> None:
        """One more admitted request waiting outside the slot queue (in a batch being gathered)."""
        self.waiting += 1

    def dequeue(self) -> None:
        self.waiting -= 1

    async def slot(self, *, counted: bool = True) -> None:
        """Wait for a free slot however long it takes (for work already admitted).
        COUNTED: as a waiting request (a batcher counts its requests itself)."""
        self.waiting += counted
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= counted
        self.running += 1

    async def acquire(self, expected: float = 0.0) -> None:
        """Admit a request and take a slot, waiting in the queue if there is room;
        Overloaded if there is none. Release with `release(expected)`."""
        self.admit(expected, queued=self._slots.locked())
        try:
            await self.slot()
        except BaseException:
            self.leave(expected)
            raise

    def release(self, expected: float = 0.0) -> None:
        self.running -= 1
        self._slots.release()
        self.leave(expected)
