"""The `edgefleet` command: every component's command groups, loaded on first use.

This is the composition root: the only module that knows every component.
Lazy loading keeps `edgefleet agent run` on a device from importing hub-side
modules (and their dependencies) it does not have.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

COMMANDS: dict[str, tuple[str, str]] = {
    "login": ("hub.cli.admin", "login"),
    "token": ("hub.cli.admin", "token"),
    "audit": ("hub.cli.admin", "audit"),
    "events": ("hub.cli.events", "events"),
    "webhook": ("hub.cli.events", "webhook"),
    "hub": ("hub.cli.hub_serve", "hub"),
    "model": ("hub.cli.models", "model"),
    "device": ("hub.cli.devices", "device"),
    "deploy": ("hub.cli.deploy", "deploy"),
    "undeploy": ("hub.cli.deploy", "undeploy"),
    "package": ("hub.cli.packages", "package"),
    "keys": ("hub.cli.keys", "keys"),
    "serve": ("agent.serving.cli", "serve"),
    "agent": ("agent.cli", "agent"),
    "rollout": ("hub.cli.rollouts", "rollout"),
    "sim": ("agent.sim.cli", "sim"),
    "firmware": ("packager.firmware.cli", "firmware"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


def accuracy_runner(
    runtime: str, model_dir: Path, entrypoint: str, inputs: list[Any]
) -> list[Any]:
    """The packager's accuracy check runs models the way a device does: on the agent's runtimes.
    The packager may not import the agent, so this root hands it the runner."""
    from agent.runtimes import run_on_cpu

    return run_on_cpu(runtime, model_dir, entrypoint, inputs)


def batching_timer(
    runtime: str, model_dir: Path, entrypoint: str, inputs: list[Any], repeat: int
) -> list[float]:
    """The packager times a model for its batching default the way a device runs it."""
    from agent.runtimes import time_on_cpu

    return time_on_cpu(runtime, model_dir, entrypoint, inputs, repeat)


def model_profiler() -> Any:
    """`model profile` measures with the agent's runtimes, each in a child process, as a
    device runs the model (agent/profiling.py); the hub's CLI may not import the agent, so
    this root hands it the profiler."""
    from agent import profiling

    return profiling


@dataclass(frozen=True)
class Components:
    """What one component's commands need from another, wired here (ctx.obj of every command)."""

    accuracy_runner: Any = accuracy_runner
    batching_timer: Any = batching_timer
    model_profiler: Any = model_profiler


@click.group(cls=LazyGroup)
@click.version_option(package_name="edgefleet")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """edgefleet: take trained models to fleets of edge devices.

    \b
    Example: edgefleet model register model.onnx --name diabetes
    """
    ctx.obj = Components()


def main() -> None:
    # The same name whether run as the console script or as `python -m edgefleet`.
    cli(prog_name="edgefleet")
