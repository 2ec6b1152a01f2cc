"""Shared output flags and printing: a table for people, --json for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hub.cli.config import resolve
from hub.cli.client import HubClient

console = Console()


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
    return HubClient(resolve(hub, token))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), indent=2))
        return
    if not rows:
        console.print("[dim](none)[/dim]")
        return
    table = Table(*columns, show_edge=False, header_style="bold")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def emit_one(record: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        if isinstance(value, list | dict) and value and not all(
            isinstance(v, str | int | float) for v in (value.values() if isinstance(value, dict) else value)
        ):
            console.print(f"[bold]{key}[/bold]:")
            console.print_json(json.dumps(value))
        else:
            console.print(f"[bold]{key}[/bold]: {_cell(value)}")


def parse_pairs(values: Sequence[str], what: str) -> dict[str, str]:
    """Turn repeated KEY=VALUE options into a dict, or fail naming the bad one."""
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} should look like key=value", param_hint=what)
        pairs[key.strip()] = value.strip()
    return pairs
