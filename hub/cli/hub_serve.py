"""`edgefleet hub ...`: run the hub. Its options come from hub.settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from hub.settings import HubSettings


def _settings_options(fn: Any) -> Any:
    for f in reversed(dataclasses.fields(HubSettings)):
        default = f.default
        fn = click.option(
            "--" + f.name.replace("_", "-"),
            default=str(default) if isinstance(default, Path) else default,
            type=int if f.type == "int" else None,
            is_flag=f.type == "bool",
            show_default=default is not None,
            envvar="EDGEFLEET_" + f.name.upper(),
            help=f.metadata["help"],
        )(fn)
    return fn


@click.group()
def hub() -> None:
    """Run the hub."""


@hub.command()
@_settings_options
def serve(**options: Any) -> None:
    """Start the REST API and, unless --mqtt-url is given, a managed Mosquitto broker.

    On first start this creates the data directory, the hub's signing key and an
    admin API token, and prints where they are.

    \b
    Example: edgefleet hub serve --data-dir ./hub-data --port 8080
    """
    from hub.server import serve as run

    try:
        settings = HubSettings(**options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    run(settings, say=click.echo)
