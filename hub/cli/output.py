"""Shared output flags and printing: a table for people, --json for scripts.

Every string the CLI prints for people goes through `safe` here: names, tags,
errors and file names come from devices, models and other users, so they are
printed as text (never read as Rich markup such as `[/]` or `[link=...]`) and
their control and format characters (terminal escapes, bidi overrides, line
breaks) are shown escaped, e.g. `\\x1b`, instead of acting on the terminal.
Print with `say`, `emit` and `emit_one`, never with markup in an f-string.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.table import Column, Table
from rich.text import Text

from hub.cli.config import resolve

if TYPE_CHECKING:
    from hub.cli.client import HubClient

# Emoji codes (":x:") in names would be replaced too; nothing of ours uses them.
console = Console(emoji=False)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def _unprintable(char: str) -> bool:
    # C*: controls (ESC, CR, BEL...), format characters (bidi overrides, zero widths),
    # surrogates, private use, unassigned; Z[lp]: line and paragraph separators.
    return unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def printable(text: str) -> str:
    """TEXT with its control and format characters written as escapes; for one-line errors."""
    if text.isprintable():  # the common case, and cheap
        return text
    return "".join(_escape(c) if _unprintable(c) else c for c in text)


def _display(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_display(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_display(v) for v in value)
    return str(value)


def safe(value: Any, style: str = "") -> Text:
    """VALUE (a string, number, list or dict) as Text for a table cell or a line.

    Never parsed as markup; control and format characters are shown escaped, in
    reverse video so that they cannot pass for the same characters typed literally.
    """
    text = Text(style=style)
    plain = _display(value)
    if plain.isprintable():
        text.append(plain)
        return text
    for char in plain:
        if _unprintable(char):
            text.append(_escape(char), style="reverse")
        else:
            text.append(char)
    return text


def say(*parts: Any) -> None:
    """Print one line made of PARTS: values, or (value, style) pairs; all of them escaped."""
    line = Text()
    for part in parts:
        line.append_text(safe(*part) if isinstance(part, tuple) else safe(part))
    console.print(line)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], **options: Any) -> Table:
    """A table whose every cell is `safe`; OPTIONS go to rich's Table (e.g. header_style)."""
    options = {"show_edge": False, "header_style": "bold", **options}
    grid = Table(*(Column(header=safe(c)) for c in columns), **options)
    for row in rows:
        grid.add_row(*(cell if isinstance(cell, Text) else safe(cell) for cell in row))
    return grid


class TextColumn(ProgressColumn):
    """A progress bar's description, escaped: it often names a file of a model."""

    def render(self, task: Task) -> Text:
        return safe(task.description)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def hub_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--hub and --token for every command that talks to the hub."""
    fn = click.option(
        "--token", envvar="EDGEFLEET_TOKEN", help="API token [env EDGEFLEET_TOKEN]."
    )(fn)
    return click.option(
        "--hub", envvar="EDGEFLEET_HUB", help="Hub URL [env EDGEFLEET_HUB; default from login]."
    )(fn)


def client(hub: str | None, token: str | None) -> HubClient:
    from hub.cli.client import HubClient  # it reports its errors with `printable`

    return HubClient(resolve(hub, token))


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), indent=2))
        return
    if not rows:
        console.print(Text("(none)", style="dim"))
        return
    console.print(table(columns, [[row.get(c) for c in columns] for row in rows]))


def emit_one(record: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        nested = value.values() if isinstance(value, dict) else value
        if isinstance(value, list | dict) and value and not all(
            isinstance(v, str | int | float) for v in nested
        ):
            say((key, "bold"), ":")
            # JSON escapes every control character itself (and markup means nothing to it).
            console.print_json(json.dumps(value))
        else:
            say((key, "bold"), ": ", value)


def parse_pairs(values: Sequence[str], what: str) -> dict[str, str]:
    """Turn repeated KEY=VALUE options into a dict, or fail naming the bad one."""
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} should look like key=value", param_hint=what)
        pairs[key.strip()] = value.strip()
    return pairs
