"""The Prometheus text exposition format (version 0.0.4), written by hand: the hub needs a
few dozen series, not a client library.

`Exposition` is a strict builder: a family is declared once with its type and help,
samples belong to the family declared last, names and label names must match the
format's grammar and label values are escaped, so a device id or a route never breaks
the output. `Histogram` is a fixed-bucket histogram that can be observed from many
threads.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Final, Literal

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_BACKSLASH: Final = "\\"
Kind = Literal["counter", "gauge", "histogram"]
_SUFFIXES: Final = {"counter": ("_total",), "gauge": ("",),
                    "histogram": ("_bucket", "_sum", "_count")}


def _value(number: float) -> str:
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if math.isnan(number):
        return "NaN"
    return str(int(number)) if float(number).is_integer() and abs(number) < 2**53 else repr(
        float(number))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    def __init__(self) -> None:
        self._lines: list[str] = []
        self._declared: set[str] = set()
        self._family: tuple[str, Kind] | None = None

    def family(self, name: str, kind: Kind, help: str) -> None:
        """Declare NAME (a counter's without `_total`); its samples follow."""
        if not _NAME.fullmatch(name) or name in self._declared:
            raise ValueError(f"metric family {name!r} is not a valid name or is declared twice")
        self._declared.add(name)
        self._family = (name, kind)
        self._lines.append(f"# HELP {name} {help.replace(_BACKSLASH, _BACKSLASH * 2)}"
                           .replace("\n", "\\n"))
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, value: float, labels: Mapping[str, str] | None = None, *,
               suffix: str | None = None) -> None:
        """One sample of the current family; SUFFIX defaults to the kind's own
        (`_total` for a counter)."""
        if self._family is None:
            raise ValueError("a sample needs a family declared first")
        name, kind = self._family
        suffix = _SUFFIXES[kind][0] if suffix is None else suffix
        if suffix not in _SUFFIXES[kind]:
            raise ValueError(f"{kind} {name} has no samples named {name}{suffix}")
        text = ""
        if labels:
            for label in labels:
                if not _LABEL.fullmatch(label) or label.startswith("__"):
                    raise ValueError(f"{label!r} is not a valid label name")
            text = "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"
        self._lines.append(f"{name}{suffix}{text} {_value(value)}")

    def histogram(self, snapshot: HistogramSnapshot, labels: Mapping[str, str] | None = None,
                  ) -> None:
        base = dict(labels or {})
        for bound, count in zip((*snapshot.bounds, math.inf), snapshot.cumulative, strict=True):
            self.sample(count, {**base, "le": _value(bound)}, suffix="_bucket")
        self.sample(snapshot.sum, base or None, suffix="_sum")
        self.sample(snapshot.cumulative[-1], base or None, suffix="_count")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


class HistogramSnapshot:
    def __init__(self, bounds: Sequence[float], counts: Sequence[int], total: float) -> None:
        self.bounds = tuple(bounds)
        running, self.cumulative = 0, []
        for count in counts:
            running += count
            self.cumulative.append(running)
        self.sum = total


class Histogram:
    """Counts of observations at or below each bound (and above the last)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds}")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(self.bounds, list(self._counts), self._sum)
