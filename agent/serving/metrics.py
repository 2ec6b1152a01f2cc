"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms with labels; a Registry renders them all.
Values are updated from the event loop and from worker threads, so each
metric guards its samples with a lock. Gauges whose value lives elsewhere
(queue depth, loaded models) are read through a callback when rendered.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))  # counts read as counts
    return repr(float(value))


def _sample(name: str, names: Sequence[str], values: Sequence[str], value: float) -> str:
    if not names:
        return f"{name} {_number(value)}"
    pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in zip(names, values, strict=True))
    return f"{name}{{{pairs}}} {_number(value)}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, values: Sequence[str]) -> Labels:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}")
        return tuple(values)

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, help, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def samples(self) -> Iterable[str]:
        return [_sample(self.name, self.labels, k, v) for k, v in sorted(self.snapshot().items())]

    def snapshot(self) -> dict[Labels, float]:
        with self._lock:
            return dict(self._values)


class Gauge(_Metric):
    """A gauge read from READ when rendered: (label values, value) pairs."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], Iterable[tuple[Labels, float]]],
        labels: Sequence[str] = (),
    ) -> None:
        super().__init__(name, help, labels)
        self._read = read

    def samples(self) -> Iterable[str]:
        return [_sample(self.name, self.labels, self._key(k), v) for k, v in self._read()]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError(f"{name}: buckets must be increasing and not empty")
        if "le" in labels:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        super().__init__(name, help, labels)
        self.bounds = (*buckets, math.inf)
        # Per label set: a count per bucket (not cumulative), then sum and count.
        self._values: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        index = bisect.bisect_left(self.bounds, value)  # the first bucket with value <= le
        with self._lock:
            counts, total = self._values.setdefault(key, ([0] * len(self.bounds), [0.0]))
            counts[index] += 1
            total[0] += value

    def snapshot(self) -> dict[Labels, tuple[list[int], float]]:
        """Per label set: the count in each bucket (not cumulative) and the sum."""
        with self._lock:
            return {k: (list(c), t[0]) for k, (c, t) in self._values.items()}

    def samples(self) -> Iterable[str]:
        values = sorted(self.snapshot().items())
        names = (*self.labels, "le")
        lines = []
        for key, (counts, total) in values:
            cumulative = 0
            for bound, count in zip(self.bounds, counts, strict=True):
                cumulative += count
                lines.append(
                    _sample(f"{self.name}_bucket", names, (*key, _number(bound)), cumulative)
                )
            lines.append(_sample(f"{self.name}_sum", self.labels, key, total))
            lines.append(_sample(f"{self.name}_count", self.labels, key, cumulative))
        return lines


M = TypeVar("M", bound=_Metric)


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        return "".join(m.render() for m in self._metrics.values())
