"""Where the CLI finds the hub and its token: flag, then env, then config file.

`edgefleet login` writes the config file (mode 0600) so later commands need
neither flag nor environment.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import click

from contract import tls
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
        raise click.ClickException(
            f"cannot read {path}: {exc}; run `edgefleet login` again") from None
    return data if isinstance(data, dict) else {}


def write_config(values: dict[str, str]) -> Path:
    path = config_path()
    write_secret(path, json.dumps(values, indent=2))
    return path


def hub_url(text: str) -> str:
    """TEXT checked to be a hub's base URL (scheme, host, port, no path), without a final /.

    The CLI adds /api/v1/... and the registry's /v2/... itself; a URL without a scheme or
    with a path would otherwise fail later with a misleading error.
    """
    url = text.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise click.BadParameter(
            f"{text!r} has no scheme; did you mean http://{url}?", param_hint="--hub")
    if scheme not in ("http", "https") or not rest:
        raise click.BadParameter(
            f"{text!r} is not an http:// or https:// URL, e.g. {DEFAULT_HUB}", param_hint="--hub")
    host, slash, path = rest.partition("/")
    if slash:
        raise click.BadParameter(
            f"{text!r} has a path (/{path}); give the hub's base URL: {scheme}://{host}",
            param_hint="--hub")
    return url


@dataclass(frozen=True)
class Connection:
    hub: str
    token: str | None
    ca: str | None = None  # the CA file an https:// hub is verified with (None: the system's)

    def verify(self) -> ssl.SSLContext | bool:
        if self.hub.startswith("http://"):
            # No TLS is spoken (clients do not follow redirects); loading the system's CA
            # bundle for nothing costs every command 30-80 ms.
            return False
        return tls.client_context(Path(self.ca)) if self.ca else True


def resolve(hub: str | None, token: str | None) -> Connection:
    """Flags win; click already folded EDGEFLEET_HUB/EDGEFLEET_TOKEN into them. The CA is
    EDGEFLEET_CA, else the one saved by `edgefleet login` for that hub."""
    saved = read_config()
    url = hub_url(hub or saved.get("hub") or DEFAULT_HUB)
    saved_ca = saved.get("ca") if url == saved.get("hub") else None
    return Connection(hub=url, token=token or saved.get("token"),
                      ca=os.environ.get("EDGEFLEET_CA") or saved_ca)
