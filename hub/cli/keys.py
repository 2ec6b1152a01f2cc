"""`edgefleet keys ...`: key pairs for packages, and the hub's signing key and its rotation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hub.cli.output import client, emit, emit_one, hub_options, json_option, say

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec


@click.group()
def keys() -> None:
    """Signing keys: package key pairs, the hub's key and its rotation."""


@keys.command()
@click.option("--dir", "directory", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where to write the pair.")
@click.option("--root", "root", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead: make the hub's offline root key, write it to this file (mode "
                   "0600; keep it off the hub) and register its public half with the hub.")
@hub_options
def generate(directory: Path, root: Path | None, hub: str | None, token: str | None) -> None:
    """Make an ECDSA P-256 key pair: cosign.key (mode 0600) and cosign.pub; or, with
    --root, the hub's offline root key, which can sign a key rotation even when the hub's
    key is compromised. Devices enrolled after it know it.

    \b
    Example: edgefleet keys generate --dir ./keys
    Example: edgefleet keys generate --root /media/usb/edgefleet-root.key
    """
    from contract import signing

    if root is None:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            private, public = signing.generate_keypair(directory)
        except FileExistsError as exc:
            raise click.ClickException(str(exc)) from None
        say(f"Wrote {private} (mode 0600, keep it secret) and {public}")
        return
    if root.exists():
        raise click.ClickException(f"{root} already exists; move it away to make a new root key")
    key = signing.generate_private_key()
    signing.write_private_key(key, root)
    try:
        answer = client(hub, token).post("/api/v1/keys/root",
                                         json={"public_key": signing.public_key_pem(key)})
    except click.ClickException:
        root.unlink()  # the hub did not take it: a key no device will know is no use
        raise
    say(f"Wrote the root key {answer['root_key_id']} to {root} (mode 0600). Keep it offline: "
        "`keys rotate --root-key` needs it; devices enrolling from now on trust it.")


@keys.command("list")
@hub_options
@json_option
def list_keys(hub: str | None, token: str | None, as_json: bool) -> None:
    """The hub's signing keys, current and retired, and how many devices trust each.

    \b
    Example: edgefleet keys list
    """
    found = client(hub, token).get("/api/v1/keys")
    devices = found["devices"]
    rows = [{**k, "devices": devices.get(k["key_id"], 0)} for k in found["keys"]]
    if not as_json and devices.get("unknown"):
        say(f"{devices['unknown']} device(s) have not reported a key yet")
    emit(rows, ["key_id", "rotation", "state", "retired_at", "devices"], as_json=as_json)


@keys.command()
@hub_options
@json_option
def show(hub: str | None, token: str | None, as_json: bool) -> None:
    """The hub's current signing key (PEM), its root key and a rotation waiting to be signed.

    \b
    Example: edgefleet keys show --json
    """
    found = client(hub, token).get("/api/v1/keys")
    emit_one({k: found[k] for k in ("current", "rotations", "root_key_id", "pending",
                                    "public_key", "devices")}, as_json=as_json)


@keys.command()
@click.option("--root-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Sign the rotation with the offline root key (from `keys generate --root`) "
                   "instead of the hub's current key: for a key that may be compromised.")
@hub_options
@json_option
def rotate(root_key: Path | None, hub: str | None, token: str | None, as_json: bool) -> None:
    """Give the hub a new signing key. The old one signs a statement handing over to it (or
    the root key does); every device follows it with its next desired state, also after
    being offline. Packages are signed by the new key too; the old key is destroyed and
    anything signed by it is refused from then on.

    \b
    Example: edgefleet keys rotate
    Example: edgefleet keys rotate --root-key /media/usb/edgefleet-root.key
    """
    api = client(hub, token)
    body: dict[str, Any] = {}
    if root_key is not None:
        root = _load_root(root_key)  # before the hub makes a next key for nothing
        body["statement"] = _root_statement(api.post("/api/v1/keys/next"), root)
    if not as_json:
        say("Rotating: packages are signed by the new key, then every device's state...")
    answer = api.post("/api/v1/keys/rotate", json=body)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    say(("Rotated", "green"), f" to {answer['current']} (rotation {answer['rotation']}, signed "
        f"by {answer['signed_by']}); {answer['retired']} is retired. Devices follow with their "
        "next desired state: `edgefleet keys list` counts them.")


def _load_root(path: Path) -> ec.EllipticCurvePrivateKey:
    from contract import signing

    try:
        return signing.load_private_key(path)
    except (ValueError, signing.SignatureError) as exc:
        raise click.BadParameter(f"{path} is not a root key: {exc}",
                                 param_hint="--root-key") from None


def _root_statement(pending: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    from contract import keys as contract_keys

    return contract_keys.sign_rotation(
        sequence=pending["sequence"], previous=pending["previous"], key_pem=pending["key"],
        issued_at=datetime.now(UTC), signer=key)
