"""Shadow mode: a candidate version sees a copy of what the primary answers.

The copy runs after the primary's response is ready, on its own small
thread pool, and only its metrics record what happened: latency, failures,
and whether its outputs agree with the primary's. It is best effort by
design: when the shadow pool is busy or primary requests are queueing, the
copy is dropped (and counted) instead of competing with real traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from agent.serving.limits import Limiter
from agent.serving.table import ModelTable, ModelVersion
from agent.serving.telemetry import Telemetry

log = logging.getLogger("edgefleet.serving")

# Outputs agree when every tensor has the same name, shape and, for floating
# point, values within these tolerances (a re-exported or quantised model is
# not bit-identical); other types must be equal.
RTOL = 1e-3
ATOL = 1e-5


def agree(primary: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> bool:
    if primary.keys() != candidate.keys():
        return False
    for name, a in primary.items():
        a, b = np.asarray(a), np.asarray(candidate[name])
        if a.shape != b.shape:
            return False
        if a.dtype.kind in "fc" and b.dtype.kind in "fc":
            if not np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
                return False
        elif not np.array_equal(a, b):
            return False
    return True


class Shadow:
    def __init__(
        self, table: ModelTable, limiter: Limiter, telemetry: Telemetry, *, concurrency: int = 1
    ) -> None:
        self._table = table
        self._limiter = limiter
        self._telemetry = telemetry
        self._concurrency = concurrency
        self._running = 0  # touched on the event loop only
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="shadow")

    def offer(
        self,
        primary: ModelVersion,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """Mirror a request PRIMARY answered to its candidate, if shadowing and there is room."""
        candidate = self._table.lease_shadow(primary.deployment, primary)
        if candidate is None:
            return
        if self._running >= self._concurrency or self._limiter.busy:
            candidate.release()
            self._telemetry.shadow_dropped.inc(candidate.deployment, candidate.version)
            return
        self._running += 1
        loop = asyncio.get_running_loop()

        def finished(_: Future[None]) -> None:
            # Runs even if the work was cancelled at shutdown, so the reference is never lost.
            candidate.release()
            loop.call_soon_threadsafe(self._finished)

        self._pool.submit(self._run, candidate, inputs, outputs).add_done_callback(finished)

    def _finished(self) -> None:
        self._running -= 1

    def _run(
        self,
        candidate: ModelVersion,
        inputs: Mapping[str, np.ndarray],
        expected: Mapping[str, np.ndarray],
    ) -> None:
        labels = (candidate.deployment, candidate.version)
        t = self._telemetry
        t.shadow_requests.inc(*labels)
        start = time.perf_counter()
        try:
            outputs = candidate.model.infer(inputs)
        except Exception as e:
            t.shadow_failures.inc(*labels)
            log.debug("shadow %s failed: %s", candidate, e)
            return
        t.shadow_latency.observe(time.perf_counter() - start, *labels)
        t.shadow_agreement.inc(*labels, "agree" if agree(expected, outputs) else "disagree")
        t.sketch(*labels, inputs, outputs)  # its drift bins, if it has a baseline

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
