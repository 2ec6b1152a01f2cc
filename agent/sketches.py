"""Drift sketches: a version's inputs and outputs counted into its spec's fixed bins.

The spec (contract/sketch.py) comes with the desired state. Counting is one
`searchsorted` and one `bincount` per feature on the whole request batch, so
the cost on the serving path is a few microseconds whatever the batch size
(bench/agent.py measures it). Counts are cumulative, like the serving
process's other counters; the agent sends their differences
(agent/telemetry.py). The simulator (agent/sim) counts its generated inputs
with the same `histogram`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from contract.sketch import Feature, SketchSpec


def histogram(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts of VALUES in the bins EDGES make: below the first edge, between each
    pair, at or above the last; NaN counts in the last bin."""
    index = np.searchsorted(edges, values, side="right")
    return np.bincount(index.ravel(), minlength=len(edges) + 1)


def column(array: np.ndarray, index: int) -> np.ndarray | None:
    """Feature INDEX of a batch: column INDEX of the last dimension (a 1-D tensor is
    one feature); None if the tensor has no such column or is not numeric."""
    if array.dtype.kind not in "biuf":
        return None
    if array.ndim <= 1:
        return array.ravel() if index == 0 else None
    if index >= array.shape[-1]:
        return None
    return array[..., index]


class Sketcher:
    """One version's cumulative counts; `observe` may run on several threads at once."""

    def __init__(self, spec: SketchSpec) -> None:
        self.spec = spec
        self._edges = {f.name: np.asarray(f.edges, dtype=np.float64) for f in spec.features}
        self._counts = {f.name: np.zeros(f.bins, dtype=np.int64) for f in spec.features}
        self._lock = threading.Lock()

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        found = []
        for f in self.spec.features:
            values = self._values(f, inputs if f.side == "input" else outputs)
            if values is not None and values.size:
                found.append((f.name, histogram(self._edges[f.name], values)))
        with self._lock:
            for name, counts in found:
                self._counts[name] += counts

    @staticmethod
    def _values(f: Feature, tensors: Mapping[str, np.ndarray]) -> np.ndarray | None:
        array = tensors.get(f.tensor)
        return None if array is None else column(np.asarray(array), f.column)

    def counts(self) -> dict[str, list[int]]:
        """The cumulative counts of the features seen at least once."""
        with self._lock:
            return {name: c.tolist() for name, c in self._counts.items() if c.any()}
