"""Render the CLI reference (docs/cli.md) from the commands' own --help.

Regenerate with: .venv/bin/python -m edgefleet.reference > docs/cli.md
A test fails when docs/cli.md no longer matches, so the docs cannot go stale.
"""

from __future__ import annotations

from collections.abc import Iterator

import click

from edgefleet.cli import cli


def _walk(command: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1])
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, [*path, name])


def render() -> str:
    parts = [
        "# CLI reference\n",
        "Generated from `--help` by `python -m edgefleet.reference`; do not edit by hand.\n",
    ]
    for path, command in _walk(cli, ["edgefleet"]):
        parent = None
        for name in path[:-1]:
            parent = click.Context(click.Group(name), info_name=name, parent=parent)
        ctx = click.Context(command, info_name=path[-1], parent=parent, terminal_width=100)
        parts.append(f"## {' '.join(path)}\n\n```\n{command.get_help(ctx)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
