"""`edgefleet rollout ...`: take a model version to a fleet in waves, and watch it go."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from contract import names
from contract.names import DEFAULT_VARIANT
from hub.cli.models import parse_ref
from hub.cli.output import (
    client,
    console,
    emit,
    emit_one,
    hub_options,
    json_option,
    parse_pairs,
    printable,
    safe,
    say,
    table,
)
from hub.cli.settings import settings_body, settings_options, settings_text
from hub.rollouts import states
from hub.rollouts.spec import OPTIONS
from hub.rollouts.states import RolloutState
from hub.validation import is_number

# `rollout watch` exit codes (documented in its help and in docs/architecture.md); 1 and
# 2 are click's own (an error talking to the hub, a usage error).
EXIT_COMPLETED = 0
EXIT_STOPPED = 3     # paused, failed, aborted or rolled back: it did not complete
EXIT_TIMED_OUT = 4   # --timeout passed first
STOPPED = ("paused", "failed", "aborted", "rolled_back")
# Columns of the progress table, in the order a device passes through them; "updating"
# gathers the agent's update states (assigned, downloading ... self_test).
COLUMNS = ("pending", "updating", "serving", "failed", "rolled back", "skipped")
UPDATING = tuple(sorted(s.value for s in states.UPDATING))
STYLES = {"serving": "green", "failed": "red", "rolled back": "yellow", "updating": "cyan"}


def _percent(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().removesuffix("%")
    if not is_number(text) or not 1 <= int(text) <= 99:
        raise click.BadParameter(f"{value!r}: give a share from 1% to 99%", param_hint="--traffic")
    return int(text)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    # JSON has no NaN or infinity: sent as they are, the request would not even be written.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value}: give a finite number", param=param)
    return value


def _target(text: str) -> dict[str, str]:
    return parse_pairs(names.comma_list(text), "--target")


def _option(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A `rollout create` option whose default and help are the spec's (hub/rollouts/spec.py)."""
    declared = OPTIONS[name]
    flag = "--" + name.replace("_", "-")
    if isinstance(declared.default, bool):
        return click.option(flag, is_flag=True, help=declared.help, **kwargs)
    if declared.default is None or declared.default == ():
        return click.option(flag, help=declared.help, **kwargs)
    return click.option(flag, default=declared.default, show_default=True, help=declared.help,
                        **kwargs)


@click.group()
def rollout() -> None:
    """Roll a model version out to devices in waves, with thresholds and rollback."""


@rollout.command()
@click.argument("ref")
@click.option("--target", required=True, help="Tag selector, e.g. 'site=berlin,arch=arm64'.")
@click.option("--deployment", help="Deployment name on the devices [default: the model name].")
@_option("variant")
@_option("waves")
@_option("max_failures")
@_option("soak")
@_option("device_timeout")
@_option("auto_rollback")
@_option("traffic", callback=lambda ctx, param, value: _percent(value))
@_option("shadow")
@_option("priority", type=int)
@_option("prefer")
@_option("max_error_rate", type=float, callback=_finite)
@_option("max_latency_ratio", type=float, callback=_finite)
@_option("max_latency_ms", type=float, metavar="P99", callback=_finite)
@settings_options
@hub_options
@json_option
def create(
    ref: str, target: str, deployment: str | None, variant: str, waves: str, max_failures: str,
    soak: str,
    device_timeout: str, auto_rollback: bool, traffic: int | None, shadow: bool, priority: int,
    prefer: str | None, max_error_rate: float, max_latency_ratio: float,
    max_latency_ms: float | None, cpus: str | None, memory: str | None, gpus: int | None,
    accelerators: tuple[str, ...],
    batch_size: int | None, batch_delay_ms: int | None, hub: str | None,
    token: str | None, as_json: bool,
) -> None:
    """Start rolling MODEL:VERSION out to the devices matching --target.

    \b
    Example:
      edgefleet rollout create diabetes:2 --target site=berlin \\
        --waves 5%,25%,100% --max-failures 5% --auto-rollback
    """
    name, version = parse_ref(ref)
    record = client(hub, token).post("/api/v1/rollouts", json={
        "model": name, "version": version, "variant": variant, "target": _target(target),
        "deployment": deployment, "waves": waves, "max_failures": max_failures, "soak": soak,
        "device_timeout": device_timeout, "auto_rollback": auto_rollback, "traffic": traffic,
        "shadow": shadow, "priority": priority, "max_error_rate": max_error_rate,
        "max_latency_ratio": max_latency_ratio, "max_latency_ms": max_latency_ms,
        "prefer": names.comma_list(prefer),
        **settings_body(cpus=cpus, memory=memory, gpus=gpus, accelerators=accelerators,
                        batch_size=batch_size, batch_delay_ms=batch_delay_ms),
    })
    if as_json:
        emit_one(record, as_json=True)
        return
    total = sum(w["devices"] for w in record["waves_progress"])
    shipped = f"{name}:{record['version']}{_variant(record)}"
    if total:
        sizes = ", ".join(str(w["devices"]) for w in record["waves_progress"])
        say("Rollout ", (record["id"], "bold"),
            f": {shipped} to {total} device(s) in waves of {sizes}")
    else:
        say("Rollout ", (record["id"], "bold"), f": {shipped}; no device "
            "matches the target yet: devices that join it get the version")
    say((f"Follow it with: edgefleet rollout watch {record['id']}", "dim"))


@rollout.command("list")
@click.option("--state", type=click.Choice([s.value for s in RolloutState]),
              help="Only this state.")
@hub_options
@json_option
def list_(state: str | None, hub: str | None, token: str | None, as_json: bool) -> None:
    """List rollouts, newest first.

    Example: edgefleet rollout list --state running
    """
    rows = client(hub, token).get("/api/v1/rollouts", params={"state": state} if state else None)
    emit(rows, ["id", "model", "version", "state", "current_wave", "devices", "serving", "failed",
                "created_at", "reason"], as_json=as_json)


def _counts(wave: dict[str, Any]) -> dict[str, int]:
    return {"pending": wave.get("pending", 0),
            "updating": sum(wave.get(state, 0) for state in UPDATING),
            "serving": wave.get("serving", 0), "failed": wave.get("failed", 0),
            "rolled back": wave.get("rolled_back", 0), "skipped": wave.get("skipped", 0)}


def _bar(done: int, total: int, width: int = 10) -> Text:
    filled = round(width * done / total) if total else 0
    return Text.assemble(("█" * filled, "green"), ("░" * (width - filled), "dim"))


def _progress(record: dict[str, Any]) -> Table:
    grid = Table(show_edge=False, header_style="bold")
    for title in ("wave", "devices", "", *COLUMNS):
        grid.add_column(title, justify="left" if title in ("wave", "") else "right",
                        no_wrap=True, min_width=max(len(title), 4))
    for wave in record["waves_progress"]:
        current = wave["wave"] == record["current_wave"] and record["state"] == "running"
        counts = _counts(wave)
        cells = [Text(str(n) if n else "·", style=STYLES.get(key, "") if n else "dim")
                 for key, n in counts.items()]
        grid.add_row(f"{'▶' if current else ' '} {wave['wave']}", str(wave["devices"]),
                     _bar(counts["serving"], wave["devices"]), *cells)
    return grid


def _variant(record: dict[str, Any]) -> str:
    """' (variant X)' for a rollout of a version's package variant X, else nothing."""
    variant = record.get("variant", DEFAULT_VARIANT)
    return "" if variant == DEFAULT_VARIANT else f" (variant {variant})"


def _header(record: dict[str, Any]) -> Text:
    color = {"completed": "green", "rolled_back": "yellow", "paused": "yellow",
             "aborted": "red", "failed": "red"}.get(record["state"], "cyan")
    text = Text.assemble(safe(record["id"], "bold"),
                         safe(f" {record['model']}:{record['version']}{_variant(record)} "),
                         safe(record["state"], color))
    if record.get("reason"):
        text.append_text(safe(f" — {record['reason']}"))
    return text


def _duration(seconds: int) -> str:
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else (
        f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s")


def _clock(stamp: str) -> str:
    """A hub timestamp as the local time of day (with the date when not today)."""
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).astimezone()
    today = moment.date() == datetime.now().astimezone().date()
    return moment.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S")


def _soak(record: dict[str, Any], *, countdown: bool = True) -> str | None:
    """The current wave's soak: time left and the next wave's start; None when none runs.
    Without COUNTDOWN only what changes when the rollout does (for one line per change)."""
    if record["state"] != "running" or not record.get("current_wave"):
        return None
    if record.get("soak_ends_at") is None:
        return f"wave {record['current_wave']}: waiting for its devices, then soak {record['soak']}"
    left = f"{_duration(record['soak_left_s'])} left, " if countdown else ""
    if record.get("next_wave_at"):
        return (f"wave {record['current_wave']} soaking: {left}next wave at "
                f"{_clock(record['next_wave_at'])}")
    return f"last wave soaking: {left}completes at {_clock(record['soak_ends_at'])}"


def _settings(record: dict[str, Any]) -> Text:
    target = ", ".join(f"{k}={v}" for k, v in record["target"].items()) or "every device"
    parts = [f"target {target}", f"deployment {record['deployment']}",
             f"waves {record['waves']}", f"max failures {record['max_failures']}",
             f"soak {record['soak']}", f"device timeout {record['device_timeout']}",
             f"auto-rollback {'on' if record['auto_rollback'] else 'off'}",
             f"priority {record['priority']}"]
    if record.get("traffic") is not None:
        parts.append(f"A/B {record['traffic']}%")
    if record.get("shadow"):
        parts.append("shadow")
    if record.get("prefer"):
        parts.append("prefer " + ",".join(record["prefer"]))
    if settings := settings_text(record):
        parts.append(settings)
    return safe(", ".join(parts))


def _failures(record: dict[str, Any]) -> Table | None:
    if not record["failed_devices"]:
        return None
    return table(["device", "wave", "state", "error"],
                 [[f["device_id"], f["wave"], f["state"], f["error"] or ""]
                  for f in record["failed_devices"]], header_style="bold red")


def _devices(record: dict[str, Any]) -> Table:
    return table(["device", "wave", "state", "previous", "assigned", "serving since", "error"],
                 [[d["device_id"], d["wave"], d["state"],
                   "" if d["previous_version"] is None else d["previous_version"],
                   d["assigned_at"] or "", d["serving_at"] or "", d["error"] or ""]
                  for d in record["devices"]])


@rollout.command()
@click.argument("rollout_id")
@click.option("--devices", "with_devices", is_flag=True,
              help="Also list every device of the rollout with its wave and state.")
@hub_options
@json_option
def show(rollout_id: str, with_devices: bool, hub: str | None, token: str | None,
         as_json: bool) -> None:
    """Show a rollout: settings, progress per wave, soak, failed devices.

    Failed and skipped devices are listed with their errors; --devices lists them all.

    Example: edgefleet rollout show r-7 --devices
    """
    record = client(hub, token).get(f"/api/v1/rollouts/{rollout_id}",
                                    params={"devices": "true"} if with_devices else None)
    if as_json:
        emit_one(record, as_json=True)
        return
    console.print(_header(record))
    console.print(_settings(record), highlight=False)
    soak = _soak(record)
    if soak:
        console.print(safe(soak))
    console.print(_progress(record))
    failures = _failures(record)
    if failures is not None:
        console.print(failures)
    if with_devices:
        console.print(_devices(record))


def _line(record: dict[str, Any]) -> str:
    """One plain line of a rollout's progress, for logs and CI."""
    counts: dict[str, int] = dict.fromkeys(COLUMNS, 0)
    for wave in record["waves_progress"]:
        for key, n in _counts(wave).items():
            counts[key] += n
    text = (f"{record['id']} {record['state']} wave {record['current_wave']}/"
            f"{len(record['waves_progress'])}: " + ", ".join(
                f"{n} {key}" for key, n in counts.items() if n or key in ("serving", "failed")))
    soak = _soak(record, countdown=False)
    if soak:
        text += f"; {soak}"
    if record.get("reason"):
        text += f" — {record['reason']}"
    return text


@rollout.command()
@click.argument("rollout_id")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--timeout", default=0.0, help="Give up after this many seconds (0: never).")
@hub_options
@json_option
def watch(rollout_id: str, interval: float, timeout: float, hub: str | None, token: str | None,
          as_json: bool) -> None:
    """Follow a rollout until it completes or stops.

    It stops at paused, failed, aborted or rolled back. On a terminal its progress is
    drawn live; otherwise (logs, CI) one plain line is printed per change.

    \b
    Exit codes:
      0  the rollout completed
      3  it stopped without completing: paused, failed, aborted or rolled back
      4  --timeout passed first
      1  the hub could not be asked (2: a usage error)
    With --json the final state is printed.

    Example: edgefleet rollout watch r-7 --timeout 3600
    """
    hub_client = client(hub, token)
    started = time.monotonic()

    def fetch() -> dict[str, Any]:
        return hub_client.get(f"/api/v1/rollouts/{rollout_id}")

    def over(record: dict[str, Any]) -> bool:
        return record["state"] in (*states.ENDED, *STOPPED) or bool(
            timeout and time.monotonic() - started > timeout)

    record = fetch()
    if console.is_terminal and not as_json:
        with Live(console=console, refresh_per_second=4) as live:
            while True:
                soak = _soak(record)
                live.update(Group(_header(record), *([safe(soak)] if soak else []),
                                  _progress(record)))
                if over(record):
                    break
                time.sleep(interval)
                record = fetch()
    else:
        last = None
        while True:
            line = _line(record)
            if line != last and not as_json:
                click.echo(f"{datetime.now().astimezone():%H:%M:%S} {printable(line)}")
                sys.stdout.flush()
                last = line
            if over(record):
                break
            time.sleep(interval)
            record = fetch()
    timed_out = record["state"] not in (*states.ENDED, *STOPPED)
    if as_json:
        emit_one(record, as_json=True)
    else:
        console.line()
        total = sum(w["devices"] for w in record["waves_progress"])
        serving = sum(w.get("serving", 0) for w in record["waves_progress"])
        failed = sum(w.get("failed", 0) for w in record["waves_progress"])
        say(f"Summary: {record['state']}; {serving}/{total} serving, {failed} failed, "
            f"{int(time.monotonic() - started)}s watched"
            + (f"; gave up after --timeout {timeout:g}s" if timed_out else ""))
        failures = _failures(record)
        if failures is not None:
            console.print(failures)
    if timed_out:
        raise SystemExit(EXIT_TIMED_OUT)
    raise SystemExit(EXIT_COMPLETED if record["state"] == "completed" else EXIT_STOPPED)


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


_action("pause", "Stop starting new waves; devices keep what they have.",
        "edgefleet rollout pause r-7")
_action("resume", "Carry on with a paused rollout, or a failed one whose cause is fixed.",
        "edgefleet rollout resume r-7")
_action("abort", "End a rollout where it is; pending devices never get the version.",
        "edgefleet rollout abort r-7")
_action("rollback", "Give every device that got the new version its previous one back.",
        "edgefleet rollout rollback r-7")
