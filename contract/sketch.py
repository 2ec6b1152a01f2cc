"""Drift sketches on the wire: which features a device sketches, and what it sends.

The hub computes fixed bin edges per feature from a version's baseline
(hub/drift.py) and sends them with the desired state (`SketchSpec`, on the
deployment); the device counts its inputs and outputs into those bins
(agent/sketches.py) and adds the counts to its inference points
(`Point.sketches`: feature name -> counts). A feature is one column of a
tensor, named "TENSOR[COLUMN]". Counts have one bin more than edges: below
the first edge, between each pair, and at or above the last (NaN counts there).

Sizes are bounded (`MAX_FEATURES`, `MAX_EDGES`), and no raw input ever
leaves the device. The hub reads a point's sketches one by one
(`read_counts`) so one bad sketch is dropped without its point.
Standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

MAX_FEATURES: Final = 64          # sketched features per version
MAX_EDGES: Final = 63             # so at most 64 bins a feature
MAX_COUNT: Final = 2**40          # a bin's count in one point: more is absurd
FEATURE_NAME: Final = re.compile(r"[A-Za-z0-9_.:/-]{1,64}\[[0-9]{1,4}\]")

Side = Literal["input", "output"]


class SketchError(ValueError):
    """A sketch or spec that breaks the rules above; the message is one line."""


def feature_name(tensor: str, column: int) -> str:
    return f"{tensor}[{column}]"


@dataclass(frozen=True)
class Feature:
    side: Side
    tensor: str
    column: int                  # in the tensor's last dimension; 0 for a 1-D tensor
    edges: tuple[float, ...]     # strictly increasing, finite

    @property
    def name(self) -> str:
        return feature_name(self.tensor, self.column)

    @property
    def bins(self) -> int:
        return len(self.edges) + 1


@dataclass(frozen=True)
class SketchSpec:
    features: tuple[Feature, ...]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"side": f.side, "tensor": f.tensor, "column": f.column,
                 "edges": list(f.edges)} for f in self.features]

    @classmethod
    def from_json(cls, value: object) -> SketchSpec:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_FEATURES:
            raise SketchError(f"a sketch spec is a list of 1..{MAX_FEATURES} features")
        features = tuple(_read_feature(i, item) for i, item in enumerate(value))
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise SketchError(f"a sketch spec names a feature twice: {names}")
        return cls(features)


def _read_feature(i: int, item: object) -> Feature:
    where = f"sketch feature {i}"
    if not isinstance(item, dict) or set(item) != {"side", "tensor", "column", "edges"}:
        raise SketchError(f"{where}: expected side, tensor, column and edges")
    side, tensor, column, edges = item["side"], item["tensor"], item["column"], item["edges"]
    if side not in ("input", "output"):
        raise SketchError(f"{where}: side {side!r} is not 'input' or 'output'")
    if not isinstance(tensor, str) or not isinstance(column, int) or isinstance(column, bool):
        raise SketchError(f"{where}: tensor must be a string and column an integer")
    if not FEATURE_NAME.fullmatch(feature_name(tensor, column)):
        raise SketchError(f"{where}: {feature_name(tensor, column)!r} does not match "
                          f"{FEATURE_NAME.pattern}")
    if not isinstance(edges, list) or not 1 <= len(edges) <= MAX_EDGES:
        raise SketchError(f"{where}: edges must be a list of 1..{MAX_EDGES} numbers")
    for edge in edges:
        if not isinstance(edge, int | float) or isinstance(edge, bool) or not math.isfinite(edge):
            raise SketchError(f"{where}: edge {edge!r} is not a finite number")
    if any(a >= b for a, b in zip(edges, edges[1:], strict=False)):
        raise SketchError(f"{where}: edges must increase strictly")
    return Feature(side, tensor, column, tuple(float(e) for e in edges))


# Feature names that matched FEATURE_NAME (at most 71 characters each): a fleet's points
# carry the same few, so most points' names are checked by one subset test.
_GOOD_NAMES: set[str] = set()
_MAX_GOOD_NAMES: Final = 4096


def check_sketches(value: object) -> Mapping[str, Any]:
    """A point's "sketches" object, checked only for its outer shape (an object of at
    most MAX_FEATURES names); each entry is read with `read_counts`."""
    if not isinstance(value, dict) or len(value) > MAX_FEATURES:
        raise SketchError(f"sketches must be an object of at most {MAX_FEATURES} features")
    if value.keys() <= _GOOD_NAMES:
        return value
    for name in value:
        if not FEATURE_NAME.fullmatch(name):
            raise SketchError(f"sketch name {name[:80]!r} does not match {FEATURE_NAME.pattern}")
        if len(_GOOD_NAMES) < _MAX_GOOD_NAMES:
            _GOOD_NAMES.add(name)
    return value


def read_counts(name: str, value: object, bins: int | None = None) -> tuple[int, ...]:
    """One feature's counts; SketchError if they are not 2..MAX_EDGES+1 counts in
    0..MAX_COUNT, all zero, or (BINS given) not BINS of them."""
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_EDGES + 1:
        raise SketchError(f"sketch {name}: expected a list of 2..{MAX_EDGES + 1} counts")
    # Passes in C over the list (this runs for every sketch the hub ingests).
    if set(map(type, value)) != {int} or not 0 <= min(value) <= max(value) <= MAX_COUNT:
        bad = next(c for c in value if type(c) is not int or not 0 <= c <= MAX_COUNT)
        raise SketchError(f"sketch {name}: count {bad!r} is not an integer in 0..{MAX_COUNT}")
    if bins is not None and len(value) != bins:
        raise SketchError(f"sketch {name}: {len(value)} bins; its spec has {bins}")
    if not any(value):
        raise SketchError(f"sketch {name}: every count is 0 (leave it out instead)")
    return tuple(value)
