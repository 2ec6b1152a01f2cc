"""`edgefleet sim`: a fleet of simulated devices in one process or several, from the
command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agent.identity import EnrollmentError
from agent.options import TELEMETRY_INTERVAL
from agent.sim.fleet import Fleet, unenrolled
from agent.sim.options import PerVersion, SimOptions, parse_drift, parse_version
from agent.sim.processes import ProcessFleet
from contract import names, tls


def _tags(values: tuple[str, ...]) -> dict[str, str]:
    tags = {}
    for text in values:
        key, equals, value = text.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = value
    return tags


def _enrollment_token(hub_url: str, api_token: str, tags: dict[str, str]) -> str:
    """A new enrollment token carrying TAGS, made with the user's API token (an https
    hub verified with EDGEFLEET_CA, as the CLI does, else the system's roots)."""
    ca = os.environ.get("EDGEFLEET_CA")
    try:
        answer = httpx.post(f"{hub_url.rstrip('/')}/api/v1/enrollment-tokens",
                            json={"tags": tags}, timeout=30,
                            headers={"Authorization": f"Bearer {api_token}"},
                            verify=tls.client_context(Path(ca)) if ca else True)
    except httpx.TransportError as exc:
        raise click.ClickException(f"cannot reach the hub at {hub_url}: {exc}") from None
    if answer.status_code != 201:
        raise click.ClickException(
            f"the hub did not make an enrollment token ({answer.status_code}): {answer.text}; "
            "the API token needs the operator role")
    return str(answer.json()["token"])


@click.command()
@click.option("--devices", "count", required=True, type=click.IntRange(1, 100_000),
              help="How many devices to simulate.")
@click.option("--hub", "hub_url", envvar="EDGEFLEET_HUB",
              help="Hub URL; needed while devices still have to enroll [env EDGEFLEET_HUB].")
@click.option("--token", envvar="EDGEFLEET_ENROLL_TOKEN",
              help="Enrollment token for the devices not enrolled yet "
                   "[env EDGEFLEET_ENROLL_TOKEN].")
@click.option("--api-token", envvar="EDGEFLEET_TOKEN",
              help="Your hub API token (operator). Without --token, the sim makes an "
                   "enrollment token with it, carrying the --tag tags [env EDGEFLEET_TOKEN].")
@click.option("--mqtt-url", "mqtt_urls", multiple=True, metavar="URL",
              help="Broker to use instead of the one the hub names at enrollment. Repeat it "
                   "to spread the devices over several (bridged) brokers: device N uses the "
                   "(N mod count)-th.")
@click.option("--data-dir", default="./edgefleet-sim", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Device identities and saved state: a restarted sim is the same devices.")
@click.option("--name-prefix", default="sim-", show_default=True,
              help="Device names are this plus a number: sim-00000, sim-00001, ...")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Tag for newly enrolled devices (may repeat). Devices cannot choose their "
                   "tags: they come from the enrollment token, so this needs --api-token "
                   "instead of --token.")
@click.option("--platform", default="linux/arm64", show_default=True,
              help="Platform the devices report.")
@click.option("--telemetry-interval", default=TELEMETRY_INTERVAL.default, show_default=True,
              type=click.FloatRange(0.01), help=TELEMETRY_INTERVAL.help)
@click.option("--rps", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Simulated scoring requests per second per device.")
@click.option("--step-latency", default=0.05, show_default=True, type=click.FloatRange(0),
              help="Seconds each update state takes (+-50 %).")
@click.option("--fail-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of updates that fail their self-test and roll back.")
@click.option("--fail-versions", "fail_versions", multiple=True, metavar="MODEL:VERSION",
              help="A version whose self-test always fails, e.g. diabetes:3 (may repeat, or "
                   "comma-separated).")
@click.option("--offline-rate", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Ungraceful drops per device per minute (the broker publishes the will).")
@click.option("--offline-seconds", default=30.0, show_default=True, type=click.FloatRange(0.01),
              help="How long a drop lasts (+-50 %).")
@click.option("--error-rate", "error_rates", multiple=True, metavar="RATE|MODEL:VERSION=RATE",
              help="Fraction of simulated requests that fail: for every version, or one "
                   "(diabetes:3=0.2). May repeat. Default 0.")
@click.option("--latency-ms", "latencies", multiple=True, metavar="MS|MODEL:VERSION=MS",
              help="Mean simulated scoring latency: for every version, or one "
                   "(diabetes:3=80). May repeat. Default 20.")
@click.option("--drift", "drifts", multiple=True, metavar="FEATURE=SHIFT",
              help="Add SHIFT to a feature's simulated values (x[0]=1.5), for versions "
                   "with a drift baseline. May repeat.")
@click.option("--connect-concurrency", default=50, show_default=True, type=click.IntRange(1),
              help="Connection attempts under way at once (also after a broker restart).")
@click.option("--duration", type=click.FloatRange(0, min_open=True),
              help="Stop after this many seconds [default: run until SIGINT or SIGTERM].")
@click.option("--json-status-every", type=click.FloatRange(0.05), metavar="SECONDS",
              help="Print the fleet's counters as one JSON line this often.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1),
              help="Run the devices in this many processes, each a disjoint range of "
                   "them with its own connections: one process holds ~10,000 busy devices.")
@click.option("--verbose", is_flag=True, help="Log what each device does.")
def sim(count: int, hub_url: str | None, token: str | None, api_token: str | None,
        mqtt_urls: tuple[str, ...], data_dir: Path, name_prefix: str, tags: tuple[str, ...],
        platform: str, telemetry_interval: float, rps: float, step_latency: float,
        fail_rate: float, fail_versions: tuple[str, ...], offline_rate: float,
        offline_seconds: float, error_rates: tuple[str, ...], latencies: tuple[str, ...],
        drifts: tuple[str, ...], connect_concurrency: int, duration: float | None,
        json_status_every: float | None, processes: int, verbose: bool) -> None:
    """Simulate a fleet of devices that speak the real protocol.

    Each device enrolls once (its identity stays in --data-dir), keeps its own
    MQTT session with a last will, checks every desired state against the hub
    key it pinned, reports its update states and refusals, and sends
    telemetry. Downloads, model loads and scoring are simulated. Progress goes
    to stderr, --json-status-every lines to stdout. SIGINT or SIGTERM: every
    device says "offline" and disconnects; the exit code is 0. With
    --processes, child processes run the devices and die with this one; the
    counters are their sum, and a child that dies stops the sim (exit code 1).

    Example: edgefleet sim --devices 1000 --hub http://hub:8080 --token efe_...
    --fail-versions diabetes:3 --json-status-every 5
    """
    if processes > count:
        raise click.BadParameter(f"{processes} processes for {count} devices: give at most "
                                 "one process per device", param_hint="--processes")
    log_level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        options = SimOptions(
            data_dir=data_dir, name_prefix=name_prefix, mqtt_urls=mqtt_urls, platform=platform,
            telemetry_interval=telemetry_interval, requests_per_second=rps,
            step_latency=step_latency, fail_rate=fail_rate,
            fail_versions=frozenset(parse_version(v) for text in fail_versions
                                    for v in names.comma_list(text)),
            offline_rate=offline_rate, offline_seconds=offline_seconds,
            error_rate=PerVersion.parse(error_rates, default=0.0),
            latency_ms=PerVersion.parse(latencies, default=20.0),
            drift=parse_drift(drifts), connect_concurrency=connect_concurrency,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console = Console(stderr=True)
    missing = unenrolled(options, count)
    if tags and token:
        raise click.UsageError(
            "devices cannot choose their tags: they come from the enrollment token. Create one "
            "with the tags (edgefleet device token create --tag KEY=VALUE), or give --api-token "
            "instead of --token and the sim creates it")
    if tags and not missing:
        console.print("[yellow]--tag applies to new devices only; these are all enrolled")
    if missing and not token and api_token and hub_url:
        token = _enrollment_token(hub_url, api_token, _tags(tags))
    elif missing and tags:
        raise click.UsageError("--tag needs --hub and --api-token (an operator's) to make an "
                               "enrollment token with those tags")
    fleet = (Fleet(hub_url, token, count, options) if processes == 1 else
             ProcessFleet(hub_url, token, count, options, processes,
                          status_every=json_status_every, log_level=log_level))
    try:
        asyncio.run(_run(fleet, console, duration=duration, json_every=json_status_every))
    except (EnrollmentError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    if isinstance(fleet, ProcessFleet) and fleet.lost:
        raise click.ClickException(fleet.lost)


async def _run(fleet: Fleet | ProcessFleet, console: Console, *, duration: float | None,
               json_every: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if isinstance(fleet, ProcessFleet):
        fleet.on_lost = lambda: loop.call_soon_threadsafe(stop.set)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        enrolling = progress.add_task("enrolled ", total=fleet.count)
        starting = asyncio.create_task(fleet.start())
        while not starting.done() and not stop.is_set():
            progress.update(enrolling, completed=fleet.enrolled)
            await asyncio.wait([starting], timeout=0.2)
        if not starting.done():  # stopped while enrolling: the enrolled ones are kept
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        starting.result()
        progress.update(enrolling, completed=fleet.enrolled)
        connecting = progress.add_task("connected", total=fleet.count)
        while fleet.connected < fleet.count and not stop.is_set():
            progress.update(connecting, completed=fleet.connected)
            await asyncio.sleep(0.2)
        progress.update(connecting, completed=fleet.connected)
    begun = time.monotonic()
    ends = begun + duration if duration is not None else None
    try:
        while not stop.is_set():
            now = time.monotonic()
            timeout = min(t for t in (json_every, ends and ends - now, 3600.0) if t is not None)
            try:
                await asyncio.wait_for(stop.wait(), max(timeout, 0))
            except TimeoutError:
                pass
            if json_every is not None:
                status = {"t": round(time.monotonic() - begun, 3), **fleet.status()}
                print(json.dumps(status), flush=True)
            if ends is not None and time.monotonic() >= ends:
                break
    finally:
        await fleet.stop()
    final = fleet.status()
    console.print(f"stopped: {fleet.count} devices, {final['sent']} messages sent, "
                  f"{final['received']} received")
