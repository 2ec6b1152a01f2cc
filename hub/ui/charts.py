"""Line charts as plain geometry for an inline SVG (templates/_chart.html draws them).

No chart library: a chart is a few polylines, axis ticks and a legend, and the
numbers are computed here so the template only places them. Gaps in the data
(a device offline for a while) break the line instead of bridging it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from hub.ui.queries import Series

# Narrow enough that a phone scales the ticks' text down only a little.
WIDTH, HEIGHT = 480, 200
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 10, 24
MAX_SERIES = 8  # colours and dash patterns in ui.css


@dataclass(frozen=True)
class Line:
    label: str
    path: str      # SVG path data
    style: int     # 0..MAX_SERIES-1: colour and dash pattern (never colour alone)
    last: str      # the newest value, for the legend


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    lines: list[Line]
    y_ticks: list[tuple[float, str]]  # (pixel y, label)
    x_ticks: list[tuple[float, str]]  # (pixel x, label)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    @property
    def empty(self) -> bool:
        return not self.lines


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 4, 5 x 10^n at or above VALUE: an axis's top whose
    quarters (the grid lines) are short numbers too."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 4, 5, 10):
        if value <= step * power + 1e-12:
            return step * power
    return 10 * power


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def line_chart(title: str, unit: str, series: Sequence[Series], *, start: float, end: float,
               gap: float, y_max: float | None = None) -> Chart:
    """SERIES (unix seconds, value) drawn over START..END; two points further apart than
    GAP seconds are not joined. Y runs from 0 to Y_MAX, or to a round number over the data."""
    if end <= start:
        raise ValueError(f"a chart needs start < end, got {start} and {end}")
    drawn = [s for s in series if s.points][:MAX_SERIES]
    top = y_max if y_max is not None else nice_ceiling(
        max((v for s in drawn for _, v in s.points), default=0.0) * 1.05)
    bottom_px, top_px = HEIGHT - BOTTOM, TOP

    def px(t: float, v: float) -> tuple[float, float]:
        x = LEFT + (t - start) / (end - start) * (WIDTH - RIGHT - LEFT)
        y = bottom_px - min(max(v, 0.0), top) / top * (bottom_px - top_px)
        return round(x, 1), round(y, 1)

    lines = []
    for style, s in enumerate(drawn):
        parts, previous = [], None
        for t, v in sorted(s.points):
            x, y = px(t, v)
            parts.append(f"{'L' if previous is not None and t - previous <= gap else 'M'}{x},{y}")
            previous = t
        lines.append(Line(s.label, " ".join(parts), style, _number(sorted(s.points)[-1][1])))
    y_ticks = [(px(start, top * i / 4)[1], _number(top * i / 4)) for i in range(5)]
    span = end - start
    fmt = "%H:%M" if span <= 2 * 86400 else "%d %b"
    x_ticks = [(px(start + span * i / 4, 0)[0],
                datetime.fromtimestamp(start + span * i / 4, UTC).strftime(fmt))
               for i in range(5)]
    return Chart(title, unit, lines, y_ticks, x_ticks)
