"""Simulated model inputs and outputs, drawn to look like a version's baseline, some shifted.

A simulated device knows a version's baseline only through its desired
state's bins (contract/sketch.py): the baseline's deciles. Values drawn
uniformly within a bin picked uniformly fall into the bins about as the
baseline's did, so an unshifted feature shows no drift; `--drift x[0]=1.5`
adds 1.5 to every value of feature x[0], as a changed sensor or population
would. The counts go through the agent's own `Sketcher` (agent/sketches.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from agent.sketches import Sketcher
from contract.sketch import Feature, SketchSpec


def draw(feature: Feature, n: int, rng: np.random.Generator) -> np.ndarray:
    """N values spread over FEATURE's bins as evenly as its baseline's deciles were; the
    two open bins reach one mean bin width beyond the outer edges."""
    edges = np.asarray(feature.edges)
    width = float(np.diff(edges).mean()) if len(edges) > 1 else 1.0
    bounds = np.concatenate([[edges[0] - width], edges, [edges[-1] + width]])
    bins = rng.integers(0, len(bounds) - 1, size=n)
    return bounds[bins] + rng.random(n) * (bounds[bins + 1] - bounds[bins])


def sketch(spec: SketchSpec, n: int, shifts: Mapping[str, float],
           rng: np.random.Generator) -> dict[str, list[int]]:
    """The sketch counts of N simulated requests (one row each) on a version with SPEC,
    the features named in SHIFTS moved by their shift."""
    tensors: dict[tuple[str, str], np.ndarray] = {}
    for f in spec.features:
        width = 1 + max(g.column for g in spec.features if (g.side, g.tensor) == (f.side, f.tensor))
        array = tensors.setdefault((f.side, f.tensor), np.zeros((n, width)))
        array[:, f.column] = draw(f, n, rng) + shifts.get(f.name, 0.0)
    sketcher = Sketcher(spec)
    sketcher.observe({t: a for (side, t), a in tensors.items() if side == "input"},
                     {t: a for (side, t), a in tensors.items() if side == "output"})
    return sketcher.counts()
