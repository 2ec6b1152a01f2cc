"""`edgefleet login`, `edgefleet token ...` and `edgefleet audit`."""

from __future__ import annotations

from pathlib import Path

import click

from contract.names import InvalidName, duration
from hub.cli.client import HubClient
from hub.cli.config import Connection, hub_url, write_config
from hub.cli.output import client, emit, emit_one, hub_options, json_option, say


@click.command()
@click.option("--hub", required=True, envvar="EDGEFLEET_HUB", help="Hub URL, e.g. http://hub:8080.")
@click.option("--token", envvar="EDGEFLEET_TOKEN", help="API token.")
@click.option(
    "--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the token from this file (e.g. the hub's admin-token).",
)
@click.option(
    "--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="EDGEFLEET_CA",
    help="Verify the hub with this CA certificate (the hub prints it: DATA/tls/ca.pem) "
    "[env EDGEFLEET_CA].",
)
def login(hub: str, token: str | None, token_file: Path | None, ca: Path | None) -> None:
    """Check a hub URL and token, then save them for later commands.

    \b
    Example: edgefleet login --hub https://hub:8080 --token-file d/admin-token --ca d/tls/ca.pem
    """
    if token_file is not None:
        token = token_file.read_text().strip()
    if not token:
        raise click.UsageError("give --token or --token-file")
    connection = Connection(hub_url(hub), token, str(ca.absolute()) if ca else None)
    me = HubClient(connection).get("/api/v1/whoami")
    path = write_config({"hub": connection.hub, "token": token,
                         **({"ca": connection.ca} if connection.ca else {})})
    say(f"Logged in to {connection.hub} as {me['name']} ({me['role']}); saved to {path}")


@click.group()
def token() -> None:
    """API tokens for people and scripts (admin only)."""


@token.command("create")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["viewer", "operator", "admin"]), default="viewer",
    show_default=True,
    help="viewer reads; operator also changes models and devices; admin also manages tokens.",
)
@click.option("--expires", metavar="DURATION",
              help="Stop working after this long (30m, 12h, 90d); default: until revoked.")
@hub_options
@json_option
def token_create(name: str, role: str, expires: str | None, hub: str | None, token: str | None,
                 as_json: bool) -> None:
    """Create an API token; it is shown only once.

    \b
    Example: edgefleet token create ci-pipeline --role operator --expires 90d
    """
    body: dict[str, object] = {"name": name, "role": role}
    if expires is not None:
        try:
            body["expires_in"] = duration(expires, "--expires")
        except InvalidName as exc:
            raise click.BadParameter(str(exc), param_hint="--expires") from None
    record = client(hub, token).post("/api/v1/tokens", json=body)
    if as_json:
        emit_one(record, as_json=True)
        return
    until = f", expires {record['expires_at']}" if record.get("expires_at") else ""
    say(f"API token {record['id']} ({record['name']}, {record['role']}{until}):")
    click.echo(record["token"])


@token.command("list")
@hub_options
@json_option
def token_list(hub: str | None, token: str | None, as_json: bool) -> None:
    """List API tokens.

    \b
    Example: edgefleet token list
    """
    rows = client(hub, token).get("/api/v1/tokens")
    emit(rows, ["id", "name", "role", "created_at", "created_by", "expires_at", "revoked_at"],
         as_json=as_json)


@token.command("revoke")
@click.argument("token_id")
@hub_options
@json_option
def token_revoke(token_id: str, hub: str | None, token: str | None, as_json: bool) -> None:
    """Revoke an API token at once.

    \b
    Example: edgefleet token revoke tok-1a2b3c4d
    """
    record = client(hub, token).delete(f"/api/v1/tokens/{token_id}").json()
    if as_json:
        emit_one(record, as_json=True)
    else:
        say(f"Revoked {token_id} ({record['name']})")


@click.command()
@click.option("--limit", default=50, show_default=True, help="Newest entries to show.")
@click.option("--actor", help="Only this token name.")
@click.option("--action", help="Only actions starting with this, e.g. model.")
@hub_options
@json_option
def audit(
    limit: int, actor: str | None, action: str | None, hub: str | None, token: str | None,
    as_json: bool,
) -> None:
    """Show the audit log: who did what, when, and the result.

    \b
    Example: edgefleet audit --action model. --limit 20
    """
    rows = client(hub, token).get(
        "/api/v1/audit", params={"limit": limit, "actor": actor, "action": action}
    )
    emit(rows, ["at", "actor", "action", "target", "result", "status", "detail"], as_json=as_json)
