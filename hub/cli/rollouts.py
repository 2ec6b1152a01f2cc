"""`edgefleet rollout ...`: take a model version to a fleet in waves, and watch it go."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hub.cli.models import parse_ref
from hub.cli.output import client, console, emit, emit_one, hub_options, json_option, parse_pairs

DONE = ("completed", "aborted", "rolled_back")
# Columns of the progress table, in the order a device passes through them; "updating"
# gathers the agent's update states (assigned, downloading ... self_test).
COLUMNS = ("pending", "updating", "serving", "failed", "rolled back", "skipped")
UPDATING = ("assigned", "downloading", "verifying", "staged", "starting", "self_test")
STYLES = {"serving": "green", "failed": "red", "rolled back": "yellow", "updating": "cyan"}


def _percent(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().rstrip("%")
    if not text.isdigit() or not 1 <= int(text) <= 99:
        raise click.BadParameter(f"{value!r}: give a share from 1% to 99%", param_hint="--traffic")
    return int(text)


def _target(text: str) -> dict[str, str]:
    return parse_pairs([p for p in text.split(",") if p.strip()], "--target")


@click.group()
def rollout() -> None:
    """Roll a model version out to devices in waves, with thresholds and rollback."""


@rollout.command()
@click.argument("ref")
@click.option("--target", required=True, help="Tag selector, e.g. 'site=berlin,arch=arm64'.")
@click.option("--deployment", help="Deployment name on the devices [default: the model name].")
@click.option("--waves", default="100%", show_default=True,
              help="Cumulative waves: 5%,25%,100% or 10,100,all.")
@click.option("--max-failures", default="0", show_default=True,
              help="Failures allowed before the rollout pauses: 5% of the target, or a count.")
@click.option("--soak", default="0s", show_default=True,
              help="How long a wave must serve healthily before the next one starts.")
@click.option("--device-timeout", default="15m", show_default=True,
              help="A device that has not answered by then counts as failed.")
@click.option("--auto-rollback", is_flag=True,
              help="When failures cross the threshold, give every device its old version back.")
@click.option("--traffic", callback=lambda ctx, param, value: _percent(value),
              help="A/B: the new version takes this share of requests beside the old one (10%).")
@click.option("--shadow", is_flag=True,
              help="The new version sees a copy of the traffic; only the old one answers.")
@click.option("--priority", default=0, show_default=True,
              help="Wins over lower-priority rollouts of the same deployment on a device.")
@click.option("--prefer", help="Accelerator preferences, e.g. openvino:NPU,onnxruntime:CPU.")
@click.option("--max-error-rate", default=0.05, show_default=True,
              help="A device whose new version errs more than this (telemetry) counts as failed.")
@hub_options
@json_option
def create(
    ref: str, target: str, deployment: str | None, waves: str, max_failures: str, soak: str,
    device_timeout: str, auto_rollback: bool, traffic: int | None, shadow: bool, priority: int,
    prefer: str | None, max_error_rate: float, hub: str | None, token: str | None, as_json: bool,
) -> None:
    """Start rolling MODEL:VERSION out to the devices matching --target.

    Example: edgefleet rollout create diabetes:2 --target site=berlin --waves 5%,25%,100% --max-failures 5% --auto-rollback
    """
    name, version = parse_ref(ref)
    record = client(hub, token).post("/api/v1/rollouts", json={
        "model": name, "version": version, "target": _target(target), "deployment": deployment,
        "waves": waves, "max_failures": max_failures, "soak": soak,
        "device_timeout": device_timeout, "auto_rollback": auto_rollback, "traffic": traffic,
        "shadow": shadow, "priority": priority, "max_error_rate": max_error_rate,
        "prefer": [p.strip() for p in prefer.split(",")] if prefer else [],
    })
    if as_json:
        emit_one(record, as_json=True)
        return
    sizes = ", ".join(str(w["devices"]) for w in record["waves_progress"])
    console.print(f"Rollout [bold]{record['id']}[/bold]: {name}:{record['version']} to "
                  f"{sum(w['devices'] for w in record['waves_progress'])} device(s) in waves of {sizes}")
    console.print(f"[dim]Follow it with: edgefleet rollout watch {record['id']}[/dim]")


@rollout.command("list")
@click.option("--state", type=click.Choice(["created", "running", "paused", "completed",
                                            "aborted", "rolled_back"]), help="Only this state.")
@hub_options
@json_option
def list_(state: str | None, hub: str | None, token: str | None, as_json: bool) -> None:
    """List rollouts, newest first.

    Example: edgefleet rollout list --state running
    """
    rows = client(hub, token).get("/api/v1/rollouts", params={"state": state})
    emit(rows, ["id", "model", "version", "state", "current_wave", "devices", "serving", "failed",
                "created_at"], as_json=as_json)


def _counts(wave: dict[str, Any]) -> dict[str, int]:
    return {"pending": wave.get("pending", 0),
            "updating": sum(wave.get(state, 0) for state in UPDATING),
            "serving": wave.get("serving", 0), "failed": wave.get("failed", 0),
            "rolled back": wave.get("rolled_back", 0), "skipped": wave.get("skipped", 0)}


def _bar(done: int, total: int, width: int = 10) -> Text:
    filled = round(width * done / total) if total else 0
    return Text.assemble(("█" * filled, "green"), ("░" * (width - filled), "dim"))


def _progress(record: dict[str, Any]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for title in ("wave", "devices", "", *COLUMNS):
        table.add_column(title, justify="left" if title in ("wave", "") else "right",
                         no_wrap=True, min_width=max(len(title), 4))
    for wave in record["waves_progress"]:
        current = wave["wave"] == record["current_wave"] and record["state"] == "running"
        counts = _counts(wave)
        cells = [Text(str(n) if n else "·", style=STYLES.get(key, "") if n else "dim")
                 for key, n in counts.items()]
        table.add_row(f"{'▶' if current else ' '} {wave['wave']}", str(wave["devices"]),
                      _bar(counts["serving"], wave["devices"]), *cells)
    return table


def _header(record: dict[str, Any]) -> Text:
    color = {"completed": "green", "rolled_back": "yellow", "paused": "yellow",
             "aborted": "red"}.get(record["state"], "cyan")
    text = Text.assemble((record["id"], "bold"), f" {record['model']}:{record['version']} ",
                         (record["state"], color))
    if record.get("reason"):
        text.append(f" — {record['reason']}")
    return text


def _failures(record: dict[str, Any]) -> Table | None:
    if not record["failed_devices"]:
        return None
    table = Table("device", "wave", "state", "error", show_edge=False, header_style="bold red")
    for f in record["failed_devices"]:
        table.add_row(f["device_id"], str(f["wave"]), f["state"], f["error"] or "")
    return table


def _devices(record: dict[str, Any]) -> Table:
    table = Table("device", "wave", "state", "previous", "assigned", "serving since", "error",
                  show_edge=False, header_style="bold")
    for d in record["devices"]:
        table.add_row(d["device_id"], str(d["wave"]), d["state"],
                      "" if d["previous_version"] is None else str(d["previous_version"]),
                      d["assigned_at"] or "", d["serving_at"] or "", d["error"] or "")
    return table


@rollout.command()
@click.argument("rollout_id")
@click.option("--devices", "with_devices", is_flag=True,
              help="Also list every device of the rollout with its wave and state.")
@hub_options
@json_option
def show(rollout_id: str, with_devices: bool, hub: str | None, token: str | None,
         as_json: bool) -> None:
    """Show a rollout: its settings, progress per wave, and failed devices with their errors.

    Example: edgefleet rollout show r-7 --devices
    """
    record = client(hub, token).get(f"/api/v1/rollouts/{rollout_id}",
                                    params={"devices": "true"} if with_devices else None)
    if as_json:
        emit_one(record, as_json=True)
        return
    console.print(_header(record))
    console.print(f"target {record['target']}, waves {record['waves']}, max failures "
                  f"{record['max_failures']}, soak {record['soak']}, device timeout "
                  f"{record['device_timeout']}, auto-rollback {record['auto_rollback']}")
    console.print(_progress(record))
    failures = _failures(record)
    if failures is not None:
        console.print(failures)
    if with_devices:
        console.print(_devices(record))


@rollout.command()
@click.argument("rollout_id")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--timeout", default=0.0, help="Give up after this many seconds (0: never).")
@hub_options
@json_option
def watch(rollout_id: str, interval: float, timeout: float, hub: str | None, token: str | None,
          as_json: bool) -> None:
    """Draw a rollout's progress live until it completes, pauses, aborts or rolls back.

    Exits 0 when the rollout completed, 1 otherwise; --json prints the final state.

    Example: edgefleet rollout watch r-7
    """
    hub_client = client(hub, token)
    started = time.monotonic()

    def fetch() -> dict[str, Any]:
        return hub_client.get(f"/api/v1/rollouts/{rollout_id}")

    record = fetch()
    with Live(console=console, refresh_per_second=4, transient=as_json) as live:
        while True:
            parts: list[Any] = [_header(record), _progress(record)]
            live.update(Group(*parts))
            if record["state"] in (*DONE, "paused"):
                break
            if timeout and time.monotonic() - started > timeout:
                break
            time.sleep(interval)
            record = fetch()
    if as_json:
        emit_one(record, as_json=True)
    else:
        console.line()
        total = sum(w["devices"] for w in record["waves_progress"])
        serving = sum(w.get("serving", 0) for w in record["waves_progress"])
        failed = sum(w.get("failed", 0) for w in record["waves_progress"])
        console.print(f"Summary: {record['state']}; {serving}/{total} serving, {failed} failed, "
                      f"{int(time.monotonic() - started)}s watched")
        failures = _failures(record)
        if failures is not None:
            console.print(failures)
    raise SystemExit(0 if record["state"] == "completed" else 1)


def _action(name: str, verb: str, example: str) -> click.Command:
    @hub_options
    @json_option
    def command(rollout_id: str, hub: str | None, token: str | None, as_json: bool) -> None:
        record = client(hub, token).post(f"/api/v1/rollouts/{rollout_id}/{name}")
        if as_json:
            emit_one(record, as_json=True)
        else:
            console.print(_header(record))

    command.__doc__ = f"{verb}\n\n    Example: {example}\n    "
    return rollout.command(name)(click.argument("rollout_id")(command))


_action("pause", "Stop starting new waves; devices keep what they have.", "edgefleet rollout pause r-7")
_action("resume", "Carry on with a paused rollout.", "edgefleet rollout resume r-7")
_action("abort", "End a rollout where it is; pending devices never get the version.",
        "edgefleet rollout abort r-7")
_action("rollback", "Give every device that got the new version its previous one back.",
        "edgefleet rollout rollback r-7")
