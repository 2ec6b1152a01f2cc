"""Telemetry rollups as values: per-minute and per-hour aggregates of raw points (pure).

A rollup is one (device, period, bucket start, kind, deployment, version): how many raw
points fell in it and, per numeric value, a `Stat` (count, sum, min, max and a small
histogram). The histogram's buckets are fixed (a quarter of a power of two wide, by sign),
so stats of the same value merge by adding counts: minute and hour rollups are built from
the same points, and a point that arrives late merges into the rollup already stored.
Percentiles read from it are within about 9% of the true value (half a bucket).

System points have no deployment and version (""); inference points are keyed by theirs
(`values.deployment`, `values.version`), which are not aggregated.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from hub.storage.db import format_time

MINUTE: Final = 60
HOUR: Final = 3600
PERIODS: Final = {"minute": MINUTE, "hour": HOUR}
_STEPS_PER_DOUBLING: Final = 4  # bucket width: 2**(1/4), about 19%
_KEYS: Final = ("deployment", "version")  # what names an inference series, not aggregated


@functools.lru_cache(maxsize=65_536)  # devices repeat values (CPU % to one decimal)
def _bucket(value: float) -> str:
    if value == 0:
        return "0"
    index = math.floor(math.log2(abs(value)) * _STEPS_PER_DOUBLING)
    return f"{'+' if value > 0 else '-'}{index}"


def _middle(bucket: str) -> float:
    """The bucket's geometric middle: its representative value."""
    if bucket == "0":
        return 0.0
    size = 2 ** ((int(bucket[1:]) + 0.5) / _STEPS_PER_DOUBLING)
    return size if bucket[0] == "+" else -size


def _order(bucket: str) -> tuple[int, int]:
    if bucket == "0":
        return (0, 0)
    index = int(bucket[1:])
    return (1, index) if bucket[0] == "+" else (-1, -index)


@dataclass
class Stat:
    """One value's aggregate over a rollup's points."""

    n: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    histogram: dict[str, int] = field(default_factory=dict)

    def add(self, value: float) -> None:
        # Called for every value of every point rolled up: plain comparisons, no builtins.
        self.n += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        key = _bucket(value)
        self.histogram[key] = self.histogram.get(key, 0) + 1

    def merge(self, other: Stat) -> None:
        self.n += other.n
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        for key, count in other.histogram.items():
            self.histogram[key] = self.histogram.get(key, 0) + count

    def quantile(self, q: float) -> float | None:
        """The Q-quantile (0..1) of the values, from the histogram, kept inside [min, max]."""
        if self.n == 0:
            return None
        rank, seen = q * self.n, 0
        for key in sorted(self.histogram, key=_order):
            seen += self.histogram[key]
            if seen >= rank:
                return min(max(_middle(key), self.min), self.max)
        return self.max

    def to_json(self) -> list[Any]:
        """[n, sum, min, max, zeros, positive run, negative run]: a run is the first
        bucket index and the counts from there on, a third the size of a JSON object of
        the same buckets (bench/retention.py measures the bytes a rollup takes)."""
        runs: dict[str, dict[int, int]] = {"+": {}, "-": {}}
        for key, count in self.histogram.items():
            if key != "0":
                runs[key[0]][int(key[1:])] = count
        return [self.n, self.sum, self.min, self.max, self.histogram.get("0", 0),
                _run(runs["+"]), _run(runs["-"])]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Stat:
        n, total, low, high, zeros, positive, negative = raw
        histogram = {"0": int(zeros)} if zeros else {}
        for sign, run in (("+", positive), ("-", negative)):
            for offset, count in enumerate(run[1:]):
                if count:
                    histogram[f"{sign}{run[0] + offset}"] = int(count)
        return cls(int(n), float(total), float(low), float(high), histogram)

    def summary(self) -> dict[str, float | int | None]:
        """What a reader gets: count, sum, mean, min, max, p50, p95, p99."""
        return {"count": self.n, "sum": self.sum, "mean": self.sum / self.n if self.n else None,
                "min": self.min, "max": self.max, "p50": self.quantile(0.5),
                "p95": self.quantile(0.95), "p99": self.quantile(0.99)}


def _run(counts: dict[int, int]) -> list[int]:
    if not counts:
        return []
    first = min(counts)
    return [first, *(counts.get(i, 0) for i in range(first, max(counts) + 1))]


Key = tuple[str, int, str, str, str, str]  # device, period, start, kind, deployment, version


@dataclass
class Rollup:
    points: int = 0
    stats: dict[str, Stat] = field(default_factory=dict)

    def add(self, values: Mapping[str, Any]) -> None:
        self.points += 1
        for name, value in values.items():
            if name in _KEYS or isinstance(value, str) or isinstance(value, bool):
                continue
            self.stats.setdefault(name, Stat()).add(float(value))

    def merge(self, other: Rollup) -> None:
        self.points += other.points
        for name, stat in other.stats.items():
            self.stats.setdefault(name, Stat()).merge(stat)

    def dumps(self) -> str:
        return json.dumps({name: s.to_json() for name, s in sorted(self.stats.items())},
                          separators=(",", ":"))

    @classmethod
    def loads(cls, points: int, text: str) -> Rollup:
        return cls(points, {name: Stat.from_json(raw) for name, raw in json.loads(text).items()})


def bucket_start(at: datetime, period: int) -> str:
    seconds = int(at.timestamp())
    return format_time(datetime.fromtimestamp(seconds - seconds % period, tz=at.tzinfo))


def roll_up(points: Iterable[tuple[str, str, str, Mapping[str, Any]]]) -> dict[Key, Rollup]:
    """(device, at, kind, values) points -> their minute rollups, and the hour rollups
    those make. AT is as stored (fixed width, UTC: hub.storage.db.format_time), so a
    bucket's start is a prefix of it."""
    minutes: dict[Key, Rollup] = {}
    for device, at, kind, values in points:
        inference = kind == "inference"
        key = (device, MINUTE, at[:16] + ":00.000000Z", kind,
               str(values.get("deployment", "")) if inference else "",
               str(values.get("version", "")) if inference else "")
        rollup = minutes.get(key)
        if rollup is None:
            rollup = minutes[key] = Rollup()
        rollup.add(values)
    found = dict(minutes)
    for (device, _, start, *series), rollup in minutes.items():
        hour = (device, HOUR, start[:13] + ":00:00.000000Z", *series)
        found.setdefault(hour, Rollup()).merge(rollup)  # type: ignore[arg-type]
    return found
