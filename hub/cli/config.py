"""Where the CLI finds the hub and its token: flag, then env, then config file.

`edgefleet login` writes the config file (mode 0600) so later commands need
neither flag nor environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import click

from contract.files import write_secret

DEFAULT_HUB = "http://127.0.0.1:8080"


def config_path() -> Path:
    if "EDGEFLEET_CONFIG" in os.environ:
        return Path(os.environ["EDGEFLEET_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "edgefleet" / "config.json"


def read_config() -> dict[str, str]:
    path = config_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}; run `edgefleet login` again")
    return data if isinstance(data, dict) else {}


def write_config(values: dict[str, str]) -> Path:
    path = config_path()
    write_secret(path, json.dumps(values, indent=2))
    return path


@dataclass(frozen=True)
class Connection:
    hub: str
    token: str | None


def resolve(hub: str | None, token: str | None) -> Connection:
    """Flags win; click already folded EDGEFLEET_HUB/EDGEFLEET_TOKEN into them."""
    saved = read_config()
    return Connection(
        hub=(hub or saved.get("hub") or DEFAULT_HUB).rstrip("/"),
        token=token or saved.get("token"),
    )
