"""The hub's CA where the container engine reads it, so the engine's own pull trusts the hub.

In container mode the engine, not the agent, fetches the image layers from
the hub's registry over TLS, so it must trust the CA the agent pinned at
enrollment. Both engines read a per-registry CA at every pull from
`CERTS_DIR/HOST:PORT/ca.crt`: podman (containers/image) from
/etc/containers/certs.d, dockerd from /etc/docker/certs.d. The agent writes
its pinned CA there before each pull (only when it changed), so a hub's CA
needs no hand step on the device. The engine is always local (the agent
takes only a unix socket), so the agent's /etc is the engine's.

`--engine-certs-dir` chooses: `auto` (the engine's own directory), a
directory of the same layout, or `off` (the operator makes the engine trust
the hub). A directory the agent cannot write is one line naming the path.
"""

from __future__ import annotations

from pathlib import Path

from contract.files import write_atomic

AUTO = "auto"
OFF = "off"
CERTS_DIRS = {"podman": Path("/etc/containers/certs.d"), "docker": Path("/etc/docker/certs.d")}
CA_NAME = "ca.crt"


class TrustError(Exception):
    """The CA could not be put where the engine reads it; the message names the path."""


def check_setting(value: str) -> str:
    """VALUE of --engine-certs-dir if it is usable: auto, off or an absolute directory."""
    if value in (AUTO, OFF) or Path(value).is_absolute():
        return value
    raise ValueError(f"give {AUTO}, {OFF} or an absolute directory, not {value!r}")


class RegistryTrust:
    """The pinned CA file CA_FILE installed for the engine's pulls from REGISTRY (host:port)."""

    def __init__(self, ca_file: Path, registry: str, setting: str = AUTO) -> None:
        self.ca_file = ca_file
        self.registry = registry
        self.setting = check_setting(setting)

    def path(self, engine: str) -> Path | None:
        """Where ENGINE (podman or docker) reads the registry's CA; None when off."""
        if self.setting == OFF:
            return None
        root = CERTS_DIRS[engine] if self.setting == AUTO else Path(self.setting)
        return root / self.registry / CA_NAME

    def install(self, engine: str) -> Path | None:
        """The CA written for ENGINE (an unchanged file is left alone), or TrustError."""
        target = self.path(engine)
        if target is None:
            return None
        try:
            ca = self.ca_file.read_bytes()
            if target.is_file() and target.read_bytes() == ca:
                return target
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            write_atomic(target, ca, mode=0o644)
        except OSError as exc:
            raise TrustError(
                f"cannot install the hub's CA for {engine} at {target}: "
                f"{exc.strerror or exc} (run the agent as root, or give --engine-certs-dir "
                f"{OFF} and put {self.ca_file} there by hand)") from None
        return target
