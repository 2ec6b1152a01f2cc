"""`edgefleet device ...`: enrollment tokens, the device list, device tags, delete."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import click

from contract import enrollment
from contract.files import write_secret
from hub import validation
from hub.cli.output import client, emit, emit_one, hub_options, json_option, parse_pairs, say
from hub.cli.settings import settings_text


def parse_duration(text: str, option: str = "--expires") -> int:
    try:
        return validation.duration(text, option)
    except validation.InvalidName as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@click.group()
def device() -> None:
    """List devices, edit their tags, and make enrollment tokens."""


@device.group()
def token() -> None:
    """Enrollment tokens that let new devices join."""


@token.command("create")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE given to devices that enroll.")
@click.option("--expires", default="24h", show_default=True, help="Lifetime: 30m, 12h, 7d.")
@click.option("--max-uses", type=click.IntRange(min=1), help="How many devices may use it.")
@click.option("--image-config", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the enrollment file for device images (edgefleet firmware "
                   "enroll) or agent install here, mode 0600.")
@click.option("--device-hub", help="Hub URL the devices use in that file [default: --hub].")
@hub_options
@json_option
def token_create(
    tags: tuple[str, ...], expires: str, max_uses: int | None, image_config: Path | None,
    device_hub: str | None, hub: str | None, token: str | None, as_json: bool,
) -> None:
    """Create an enrollment token; it is shown only once.

    \b
    Example: edgefleet device token create --tag site=berlin --expires 7d --max-uses 50
    """
    api = client(hub, token)
    # Checked before the token exists: a bad URL must not cost a token no one sees.
    device_config = (_device_config(device_hub or api.connection.hub, api.connection.hub)
                     if image_config else None)
    record = api.post(
        "/api/v1/enrollment-tokens",
        json={"tags": parse_pairs(tags, "--tag"), "expires_in": parse_duration(expires),
              "max_uses": max_uses},
    )
    if image_config is not None and device_config is not None:
        write_secret(image_config, enrollment.render(replace(device_config,
                                                             token=record["token"])))
        say(f"Enrollment file for devices: {image_config} "
            f"(edgefleet firmware enroll IMAGE {image_config})")
    if as_json:
        emit_one(record, as_json=True)
        return
    say(f"Enrollment token {record['id']} (expires {record['expires_at']}):")
    click.echo(record["token"])
    say(("On the device: edgefleet agent run --hub URL --token <token>", "dim"))


def _device_config(hub_url: str, api_url: str) -> enrollment.EnrollmentConfig:
    try:
        config = enrollment.EnrollmentConfig(hub=hub_url.rstrip("/"))
    except enrollment.EnrollmentFileError as exc:
        raise click.UsageError(f"--device-hub: {exc}") from None
    # A hub's tokens pin its CA exactly when it runs TLS, and a pinned token needs https.
    if urlsplit(hub_url).scheme != urlsplit(api_url).scheme:
        raise click.UsageError(f"--device-hub: {hub_url} is {urlsplit(hub_url).scheme}, but "
                               f"the hub at {api_url} is {urlsplit(api_url).scheme}: use the "
                               "same scheme")
    return config


@token.command("list")
@hub_options
@json_option
def token_list(hub: str | None, token: str | None, as_json: bool) -> None:
    """List enrollment tokens (their secrets are not stored).

    \b
    Example: edgefleet device token list --json
    """
    rows = client(hub, token).get("/api/v1/enrollment-tokens")
    emit(rows, ["id", "tags", "uses", "max_uses", "expires_at", "revoked_at"], as_json=as_json)


@token.command("revoke")
@click.argument("token_id")
@hub_options
def token_revoke(token_id: str, hub: str | None, token: str | None) -> None:
    """Revoke an enrollment token; enrolled devices keep working.

    \b
    Example: edgefleet device token revoke enr-1a2b3c4d
    """
    client(hub, token).delete(f"/api/v1/enrollment-tokens/{token_id}")
    say(f"Revoked {token_id}")


@device.command("list")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE filter, repeatable.")
@hub_options
@json_option
def list_(tags: tuple[str, ...], hub: str | None, token: str | None, as_json: bool) -> None:
    """List enrolled devices.

    \b
    Example: edgefleet device list --tag site=berlin
    """
    rows = client(hub, token).get("/api/v1/devices", params={"tag": list(tags)})
    emit(rows, ["id", "name", "status", "platform", "tags", "last_seen"], as_json=as_json)


@device.command()
@click.argument("device_id")
@hub_options
@json_option
def show(device_id: str, hub: str | None, token: str | None, as_json: bool) -> None:
    """Show one device: tags, platform, inventory, and its deployments, desired vs reported.

    \b
    Example: edgefleet device show dev-0a1b2c3d4e5f
    """
    hub_client = client(hub, token)
    record = hub_client.get(f"/api/v1/devices/{device_id}")
    deployed = hub_client.get(f"/api/v1/devices/{device_id}/deployments")
    if as_json:
        emit_one({**record, "deployments": {"desired": deployed["desired"],
                                            "reported": deployed["reported"]}}, as_json=True)
        return
    reported = record.pop("reported")
    emit_one(record, as_json=False)
    emit(_deployment_rows(deployed), ["deployment", "desired", "settings", "reported", "error"],
         as_json=False)
    for refusal in current_refusals(reported, record.get("applied_generation")):
        say((f"refused generation {refusal['generation']}", "yellow"),
            f" at {refusal['at']}: {refusal['reason']}: {refusal['message']}")


@device.command()
@click.argument("device_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@hub_options
@json_option
def delete(device_id: str, yes: bool, hub: str | None, token: str | None,
           as_json: bool) -> None:
    """Delete (decommission) a device: its credentials and broker login stop working at
    once, its deployments and desired state are cleared; audited. It must enroll again to
    come back.

    \b
    Example: edgefleet device delete dev-0a1b2c3d4e5f --yes
    """
    hub_client = client(hub, token)
    record = hub_client.get(f"/api/v1/devices/{device_id}")  # a wrong id fails before asking
    if not yes:
        if as_json:
            raise click.UsageError("--json cannot ask for confirmation; add --yes")
        click.confirm(f"Delete device {device_id} ({record['name']})?", abort=True)
    hub_client.delete(f"/api/v1/devices/{device_id}")
    if as_json:
        emit_one({"id": device_id, "name": record["name"], "deleted": True}, as_json=True)
        return
    say(f"Deleted device {device_id} ({record['name']})")


def current_refusals(reported: dict, applied: int | None) -> list[dict]:
    """The refusals that still matter: desired states newer than the generation the device
    has applied since (a later one it took makes an older refusal history), and refused
    commands and documents that named no generation."""
    return [r for r in reported.get("refusals", [])
            if applied is None or r.get("generation") is None or r["generation"] > applied]


def _deployment_rows(deployed: dict) -> list[dict[str, str]]:
    """One row per deployment name: what the hub wants next to what the device says."""
    desired = {d["name"]: d for d in deployed["desired"]}
    reported: dict[str, list[dict]] = {}
    for r in deployed["reported"]:
        reported.setdefault(r["name"], []).append(r)
    rows = []
    for name in sorted(desired.keys() | reported.keys()):
        wanted = ""
        if (d := desired.get(name)) is not None:
            wanted = f"{d['model']}:{d['version']}"
            if (c := d["candidate"]) is not None:
                kind = "shadow" if c["shadow"] else "split"
                wanted += f" + {c['version']} ({kind} {c['traffic']}%)"
        states = reported.get(name, [])
        rows.append({
            "deployment": name,
            "desired": wanted or "(removed)",
            "settings": settings_text(d) if d is not None else "",
            "reported": ", ".join(
                f"{r['version']} {r['state']}" + (f" on {r['runtime']}:{r['device']}"
                                                  if r["runtime"] else "")
                for r in states) or "(nothing yet)",
            "error": "; ".join(f"{r['version']}: {r['error']}" for r in states if r["error"]),
        })
    return rows


@device.command()
@click.argument("device_id")
@click.argument("changes", nargs=-1, required=True)
@hub_options
@json_option
def tag(
    device_id: str, changes: tuple[str, ...], hub: str | None, token: str | None, as_json: bool
) -> None:
    """Set tags with KEY=VALUE, remove them with KEY-.

    \b
    Example: edgefleet device tag dev-0a1b2c3d4e5f site=berlin stage- arch=arm64
    """
    remove = [c[:-1] for c in changes if c.endswith("-") and "=" not in c]
    to_set = parse_pairs([c for c in changes if not (c.endswith("-") and "=" not in c)], "CHANGES")
    record = client(hub, token).patch(
        f"/api/v1/devices/{device_id}/tags", json={"set": to_set, "remove": remove}
    )
    if as_json:
        emit_one(record, as_json=True)
    else:
        say(f"{device_id} tags: ", record["tags"])


_RESOLUTIONS = {"raw": "raw points", "minute": "per-minute rollups",
                "hour": "per-hour rollups"}


@device.command()
@click.argument("device_id")
@click.option("--since", default="1h", show_default=True, help="How far back: 30m, 12h, 7d.")
@click.option("--kind", type=click.Choice(["system", "inference"]), help="Only this kind of point.")
@click.option("--resolution", type=click.Choice(["auto", "raw", "minute", "hour"]),
              default="auto", show_default=True,
              help="auto: raw points up to 6 h back, minute rollups up to 3 days, else hour "
              "rollups (older raw points and minute rollups are deleted by the hub).")
@click.option("--limit", default=1000, show_default=True, help="Newest points to show.")
@hub_options
@json_option
def telemetry(
    device_id: str, since: str, kind: str | None, resolution: str, limit: int,
    hub: str | None, token: str | None, as_json: bool,
) -> None:
    """Show a device's telemetry, oldest first: raw points or rollups (mean/p95/max).

    \b
    Example: edgefleet device telemetry dev-0a1b2c3d4e5f --since 30m --kind inference
    Example: edgefleet device telemetry dev-0a1b2c3d4e5f --since 7d
    """
    start = datetime.now(UTC) - timedelta(seconds=parse_duration(since, "--since"))
    with client(hub, token) as hub_client:
        answer = hub_client.request(
            "GET", f"/api/v1/devices/{device_id}/telemetry",
            params={"since": start.isoformat(), "kind": kind, "limit": limit,
                    "resolution": resolution})
    rows = answer.json()
    if as_json:
        emit(rows, [], as_json=True)
        return
    chosen = answer.headers.get("x-edgefleet-resolution", "raw")
    say((f"{_RESOLUTIONS.get(chosen, chosen)} since {start:%Y-%m-%d %H:%M:%S}Z", "dim"))
    if chosen == "raw":
        emit([{**r, "values": json.dumps(r["values"], separators=(",", ":"))} for r in rows],
             ["seq", "at", "kind", "values"], as_json=False)
        return
    emit([{"start": r["start"], "kind": r["kind"], "points": r["points"],
           "series": f"{r['deployment']} v{r['version']}" if "deployment" in r else "",
           "values (mean/p95/max)": " ".join(
               f"{name}={_num(v['mean'])}/{_num(v['p95'])}/{_num(v['max'])}"
               for name, v in sorted(r["values"].items()))} for r in rows],
         ["start", "kind", "series", "points", "values (mean/p95/max)"], as_json=False)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
