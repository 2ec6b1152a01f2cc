"""Docs that cannot go stale: the CLI reference is generated and checked here."""

from __future__ import annotations

from pathlib import Path

from edgefleet.cli import cli
from edgefleet.reference import _walk, render

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current() -> None:
    assert (ROOT / "docs/cli.md").read_text() == render(), (
        "docs/cli.md is stale: run `.venv/bin/python -m edgefleet.reference > docs/cli.md`"
    )


def test_every_command_has_an_example() -> None:
    leaves = [(p, c) for p, c in _walk(cli, ["edgefleet"]) if not hasattr(c, "commands")]
    missing = [" ".join(p) for p, c in leaves if "Example:" not in (c.help or "")]
    assert not missing, f"commands without an Example: line in their help: {missing}"


def test_readme_names_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash examples/demo.sh" in readme and "bash .ci/run" in readme
