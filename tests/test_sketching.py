"""Drift sketches counted off the request path (agent/serving/sketching.py): the counts are
those the request path made, and a full queue drops (and says so) instead of blocking."""

from __future__ import annotations

import numpy as np

from agent.serving.sketching import SketchQueue
from agent.sketches import Sketcher
from contract.sketch import SketchSpec

SPEC = SketchSpec.from_json([{"side": "input", "tensor": "x", "column": c,
                              "edges": [-1.0, 0.0, 1.0]} for c in range(3)])


def test_counts_are_those_counted_on_the_request_path() -> None:
    batches = [np.random.default_rng(i).normal(size=(n, 3)) for i, n in enumerate((1, 7, 40))]
    direct, queued = Sketcher(SPEC), Sketcher(SPEC)
    sketching = SketchQueue()
    for batch in batches:
        direct.observe({"x": batch}, {})
        assert sketching.offer(queued, {"x": batch}, {})
    assert sketching.settle(timeout=10)
    assert queued.counts() == direct.counts()


def test_a_full_queue_drops_at_once_and_counts_what_it_took() -> None:
    big = np.random.default_rng(0).normal(size=(400_000, 3))  # ~ms of counting each
    sketcher, sketching = Sketcher(SPEC), SketchQueue(maxsize=2)
    taken = [sketching.offer(sketcher, {"x": big}, {}) for _ in range(20)]
    assert sketching.settle(timeout=60)
    assert taken[:2] == [True, True] and not all(taken)  # offers outran the counting
    assert sum(sketcher.counts()["x[0]"]) == taken.count(True) * len(big)
