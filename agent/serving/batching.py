"""Adaptive batching: requests to one version that arrive while it is busy share one runtime call.

For a model whose inputs and outputs all have a free first dimension (the
batch), requests wait in the version's batcher instead of the slot queue.
Whenever a slot is free the batcher takes what is pending (requests whose
inputs agree on everything but the batch size, up to `max_batch_size` rows),
stacks the inputs, runs the model once in a worker thread and hands each
request its rows of the outputs. With nobody else waiting a request runs
alone at once, so one client sees no added latency; under load batches grow
by themselves, up to the size. `max_delay_ms` makes the first request of a
batch wait up to that long for more (throughput over latency).

If a merged call fails, or returns outputs without the batch's rows, each
request of the batch runs alone: a bad request fails alone, never its
neighbours. Pending requests count as waiting in the limiter (metrics, the
count and the wait budget); a batch takes one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from agent.serving.body import Batching
from agent.serving.limits import Limiter
from agent.serving.table import settle
from contract.settings import unbatchable as unbatchable  # the one check; control.py asks

# A batch whose runtime call should take less than this runs on the event loop: the hop to
# a worker thread and back costs more than such a call, and on two busy cores far more
# (scoring.py does the same per request). The prediction is the larger of the recent
# shortest call (a call's fixed cost) and the batch's rows times the recent lowest seconds
# per row (what grows with the rows), each kept by table.settle.
INLINE_MAX_SECONDS = 0.0003

Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
# One request's result: its outputs, the runtime call's seconds, its share of the batch's seconds.
Result = tuple[Outputs, float, float]


def batch_key(inputs: Inputs) -> tuple[tuple[str, str, tuple[int, ...]], ...] | None:
    """What must agree for requests to share a call: names, dtypes, all but the first dimension.
    None: inputs that disagree on their batch size, which run alone."""
    rows = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
    if len(rows) != 1 or -1 in rows:
        return None
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


def rows_of(inputs: Inputs) -> int:
    return max(1, next(iter(inputs.values())).shape[0]) if inputs else 1


def run_batch(
    infer: Callable[[Inputs], Outputs], batch: Sequence[Inputs]
) -> list[Outputs | Exception]:
    """Each request of BATCH answered by one call of INFER on them all stacked; blocking."""
    if len(batch) > 1:
        rows = [next(iter(inputs.values())).shape[0] for inputs in batch]
        stacked = {name: np.concatenate([inputs[name] for inputs in batch]) for name in batch[0]}
        try:
            merged = infer(stacked)
        except Exception:
            merged = None  # find out whose request it was: each runs alone below
        total = sum(rows)
        if merged is not None and all(
            np.ndim(out) and np.shape(out)[0] == total for out in merged.values()
        ):
            cuts = np.cumsum(rows)[:-1]
            parts = {name: np.split(np.asarray(out), cuts) for name, out in merged.items()}
            return [{name: parts[name][i] for name in parts} for i in range(len(batch))]
    results: list[Outputs | Exception] = []
    for inputs in batch:
        try:
            results.append(infer(inputs))
        except Exception as e:
            results.append(e)
    return results


@dataclass
class _Pending:
    inputs: Inputs
    rows: int
    key: object
    expected: float  # seconds admitted with, given back to the limiter when done
    release: Callable[[], None]  # the request's reference on the version
    future: asyncio.Future[Result]
    arrived: float = field(default=0.0)


class Batcher:
    """The pending requests of one version and the task that dispatches them in batches."""

    def __init__(
        self,
        policy: Batching,
        infer: Callable[[Inputs], Outputs],
        limiter: Limiter,
        pool: ThreadPoolExecutor,
        observe: Callable[[int], None] = lambda rows: None,
    ) -> None:
        self.policy = policy
        self._observe = observe  # each batch's rows, for the metrics
        self._infer = infer
        self._limiter = limiter
        self._pool = pool
        self._pending: list[_Pending] = []
        self._rows = 0
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call = float("inf")  # seconds of the shortest recent call (settle)
        self._per_row = float("inf")  # seconds per row of the cheapest recent rows (settle)

    def submit(
        self, inputs: Inputs, expected: float, release: Callable[[], None]
    ) -> asyncio.Future[Result]:
        """Queue one admitted request; from now on the batcher calls RELEASE and gives
        EXPECTED back to the limiter once the request's batch is done."""
        loop = asyncio.get_running_loop()
        item = _Pending(inputs, rows_of(inputs), batch_key(inputs), expected, release,
                        loop.create_future(), loop.time())
        self._pending.append(item)
        self._limiter.enqueue()
        self._rows += item.rows
        if self._rows >= self.policy.max_batch_size:
            self._full.set()
        if self._task is None:
            self._task = asyncio.create_task(self._dispatch())
        return item.future

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                delay = self.policy.max_delay_ms / 1000
                wait = self._pending[0].arrived + delay - loop.time()
                if wait > 0 and self._rows < self.policy.max_batch_size:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), wait)
                await self._limiter.slot(counted=False)
                self._start(self._take())
        finally:
            self._task = None

    def _take(self) -> list[_Pending]:
        """The oldest request and those that can share its call, up to the batch size."""
        first = self._pending[0]
        batch, rest, rows = [first], [], first.rows
        for item in self._pending[1:]:
            fits = first.key is not None and item.key == first.key
            if fits and rows + item.rows <= self.policy.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self._pending = rest
        self._rows -= rows
        for _ in batch:
            self._limiter.dequeue()
        return batch

    def _start(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(item.rows for item in batch)

        def work() -> tuple[list[Outputs | Exception], float]:
            started = time.perf_counter()
            results = run_batch(self._infer, [item.inputs for item in batch])
            seconds = time.perf_counter() - started
            self._call = settle(self._call, seconds)
            self._per_row = settle(self._per_row, seconds / rows)
            return results, seconds

        if max(self._call, rows * self._per_row) < INLINE_MAX_SECONDS:
            inline: Future[tuple[list[Outputs | Exception], float]] = Future()
            try:
                inline.set_result(work())
            except Exception as e:
                inline.set_exception(e)
            for item in batch:
                item.release()
            self._finish(batch, inline)
            return

        def finished(done: Future[tuple[list[Outputs | Exception], float]]) -> None:
            for item in batch:
                item.release()  # here, in the thread: the version may close right after
            loop.call_soon_threadsafe(self._finish, batch, done)

        self._pool.submit(work).add_done_callback(finished)

    def _finish(
        self, batch: list[_Pending], done: Future[tuple[list[Outputs | Exception], float]]
    ) -> None:
        self._limiter.release(0.0)
        for item in batch:
            self._limiter.leave(item.expected)
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if error is not None:
            outcomes: list[Outputs | BaseException] = [error] * len(batch)
            seconds = 0.0
        else:
            results, seconds = done.result()
            outcomes = list(results)
        total_rows = sum(item.rows for item in batch)
        self._observe(total_rows)
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():  # the client went away
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result((outcome, seconds, seconds * item.rows / total_rows))
