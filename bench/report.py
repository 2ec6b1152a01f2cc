"""The table every benchmark prints: metric, value, baseline, ratio or target."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass
class Row:
    metric: str
    value: str
    baseline: str = ""
    verdict: str = ""


def print_table(rows: list[Row], title: str, caption: str | None = None, *,
                width: int = 150) -> None:
    table = Table(title=title, caption=caption, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio / target", justify="right")
    for row in rows:
        table.add_row(row.metric, row.value, row.baseline, row.verdict)
    # Pipes and files have no width and rich would wrap the table at 80 columns.
    Console(width=None if sys.stdout.isatty() else width).print(table)
