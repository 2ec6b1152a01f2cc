"""The `edgefleet` command: every component's command groups, loaded on first use.

This is the composition root: the only module that knows every component.
Lazy loading keeps `edgefleet agent run` on a device from importing hub-side
modules (and their dependencies) it does not have.
"""

from __future__ import annotations

import importlib

import click

COMMANDS: dict[str, tuple[str, str]] = {
    "login": ("hub.cli.admin", "login"),
    "token": ("hub.cli.admin", "token"),
    "audit": ("hub.cli.admin", "audit"),
    "hub": ("hub.cli.hub_serve", "hub"),
    "model": ("hub.cli.models", "model"),
    "device": ("hub.cli.devices", "device"),
    "deploy": ("hub.cli.deploy", "deploy"),
    "undeploy": ("hub.cli.deploy", "undeploy"),
    "package": ("hub.cli.packages", "package"),
    "keys": ("hub.cli.packages", "keys"),
    "serve": ("agent.serving.cli", "serve"),
    "agent": ("agent.cli", "agent"),
    "rollout": ("hub.cli.rollouts", "rollout"),
    "sim": ("agent.sim.cli", "sim"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="edgefleet")
def cli() -> None:
    """edgefleet: take trained models to fleets of edge devices.

    \b
    Example: edgefleet model register model.onnx --name diabetes
    """


def main() -> None:
    # The same name whether run as the console script or as `python -m edgefleet`.
    cli(prog_name="edgefleet")
