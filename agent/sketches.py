"""Drift sketches: a version's inputs and outputs counted into its spec's fixed bins.

The spec (contract/sketch.py) comes with the desired state. Counting takes a
few numpy calls per tensor on the whole request batch (a comparison with the
edges and one `bincount` for all its columns), so its cost on the serving path
does not grow with the number of features (bench/serving_speed.py measures it).
Counts are cumulative, like the serving process's other counters; the agent
sends their differences (agent/telemetry.py). The simulator (agent/sim) counts its generated inputs
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
    return _Tensor([0], [np.asarray(edges, dtype=np.float64)]).counts(
        np.asarray(values).reshape(-1, 1))


class _Tensor:
    """The sketched columns of one tensor, counted in a fixed number of numpy calls
    whatever the number of columns: compare each value with its column's edges
    (padded with +inf), sum, and one bincount over every column's bins at once."""

    def __init__(self, columns: list[int], edges: list[np.ndarray]) -> None:
        self.columns = np.asarray(columns)
        self.width = max(columns) + 1  # the columns a batch needs at least
        width = max(len(e) for e in edges)
        self.edges = np.full((len(edges), width), np.inf)
        for i, e in enumerate(edges):
            self.edges[i, :len(e)] = e
        self.last = np.asarray([len(e) for e in edges])     # each column's top bin
        self.offsets = np.cumsum([0, *(len(e) + 1 for e in edges)])

    def counts(self, rows: np.ndarray) -> np.ndarray:
        """The counts of ROWS ([n, columns of the tensor]), every column's bins in a row
        (`split` cuts them apart)."""
        values = rows[:, self.columns].astype(np.float64, copy=False)
        index = np.minimum((~(values[:, :, None] < self.edges)).sum(axis=2), self.last)
        return np.bincount((index + self.offsets[:-1]).ravel(), minlength=self.offsets[-1])

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


def rows_of(array: np.ndarray) -> np.ndarray | None:
    """A batch as [rows, columns] (a 1-D tensor is one column); None if it is not
    numeric or has more dimensions."""
    if array.dtype.kind not in "biuf" or array.ndim > 2:
        return None
    return array.reshape(-1, 1) if array.ndim <= 1 else array


class Sketcher:
    """One version's cumulative counts; `observe` may run on several threads at once."""

    def __init__(self, spec: SketchSpec) -> None:
        self.spec = spec
        grouped: dict[tuple[str, str], list[Feature]] = {}
        for f in spec.features:
            grouped.setdefault((f.side, f.tensor), []).append(f)
        self._tensors = [
            (side, tensor, [f.name for f in features],
             _Tensor([f.column for f in features], [np.asarray(f.edges) for f in features]))
            for (side, tensor), features in grouped.items()]
        self._counts = [np.zeros(t.offsets[-1], dtype=np.int64) for *_, t in self._tensors]
        self._lock = threading.Lock()

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        found = []
        for i, (side, tensor, _, counter) in enumerate(self._tensors):
            array = (inputs if side == "input" else outputs).get(tensor)
            rows = None if array is None else rows_of(np.asarray(array))
            if rows is not None and rows.size and rows.shape[1] >= counter.width:
                found.append((i, counter.counts(rows)))
        with self._lock:
            for i, counts in found:
                self._counts[i] += counts

    def counts(self) -> dict[str, list[int]]:
        """The cumulative counts of the features seen at least once."""
        with self._lock:
            flat = [c.copy() for c in self._counts]
        return {name: c.tolist()
                for (*_, names, counter), f in zip(self._tensors, flat, strict=True)
                for name, c in zip(names, counter.split(f), strict=True) if c.any()}
