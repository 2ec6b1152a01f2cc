"""Drift sketches counted off the request path: a bounded queue and one thread.

An answered request hands its inputs and outputs to `offer`, which never blocks:
when MAXSIZE requests are already waiting to be counted, this one is dropped (the
caller counts it: `edgefleet_serving_sketch_dropped_total`) instead of slowing the
requests behind it. The thread counts each into its version's bins
(agent/sketches.py `Sketcher.observe`, the same call the request made before), so
the counts are the ones the request path made, later. `settle` waits until what
was offered before it is counted: the stats the agent reads then hold every
request answered before the read, as they did when requests counted themselves.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping

import numpy as np

from agent.sketches import Sketcher

log = logging.getLogger("edgefleet.serving")

MAXSIZE = 1024  # requests waiting to be counted (each holds its own arrays)

_Item = tuple[Sketcher, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class SketchQueue:
    def __init__(self, maxsize: int = MAXSIZE) -> None:
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize)
        self._done = threading.Condition()
        self._offered = 0   # requests queued so far
        self._counted = 0   # ... and counted
        threading.Thread(target=self._run, name="sketches", daemon=True).start()

    def offer(self, sketcher: Sketcher, inputs: Mapping[str, np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> bool:
        """Queue one answered request's tensors for SKETCHER; False (dropped) when full."""
        with self._done:
            try:
                self._queue.put_nowait((sketcher, inputs, outputs))
            except queue.Full:
                return False
            self._offered += 1
        return True

    def settle(self, timeout: float) -> bool:
        """Wait up to TIMEOUT seconds until every request offered so far is counted."""
        with self._done:
            wanted = self._offered
            return self._done.wait_for(lambda: self._counted >= wanted, timeout)

    def _run(self) -> None:
        while True:
            sketcher, inputs, outputs = self._queue.get()
            try:
                sketcher.observe(inputs, outputs)
            except Exception:  # a bug must not stop the counting of every later request
                log.exception("counting a request into its drift sketches failed")
            finally:
                with self._done:
                    self._counted += 1
                    self._done.notify_all()
