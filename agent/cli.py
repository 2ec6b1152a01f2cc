"""`edgefleet agent run`: the device daemon."""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any

import click

from agent import options as o
from agent.kube.options import kube_options


def _pause_in(value: str | None) -> tuple[str, float] | None:
    """EDGEFLEET_AGENT_PAUSE_IN=state:seconds, fault injection for crash tests."""
    if not value:
        return None
    state, _, seconds = value.partition(":")
    return state, float(seconds or 30)


def _check_serve_port(host: str, port: int) -> None:
    """One line naming --serve-port when HOST:PORT is taken (another agent on this machine),
    said before enrolling: a device that enrolled and then could not serve would be left
    behind at the hub."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the scoring server does
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise click.ClickException(f"cannot serve on {host}:{port} ({exc.strerror}); "
                                           "choose another --serve-host") from None
            raise click.ClickException(
                f"port {port} on {host} is taken (another agent on this machine?); stop what "
                "uses it, or choose another with --serve-port") from None


@click.group()
def agent() -> None:
    """Run the device agent."""


@agent.command()
@click.option("--hub", "hub_url", envvar="EDGEFLEET_HUB",
              help="Hub URL; needed on the first start only [env EDGEFLEET_HUB].")
@click.option("--token", envvar="EDGEFLEET_ENROLL_TOKEN",
              help="Enrollment token; needed on the first start only [env EDGEFLEET_ENROLL_TOKEN].")
@click.option("--data-dir", default="./edgefleet-agent", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Identity, state, packages and the telemetry queue live here.")
@click.option("--name", help="Device name shown in the hub [default: the host name].")
@click.option("--mqtt-url", help="Broker to use instead of the one the hub names at enrollment.")
@click.option("--serve-host", default=o.SERVE_HOST.default, show_default=True,
              help=o.SERVE_HOST.help)
@click.option("--serve-port", default=o.SERVE_PORT.default, show_default=True,
              type=click.IntRange(1, 65535), help=o.SERVE_PORT.help)
@click.option("--telemetry-interval", default=o.TELEMETRY_INTERVAL.default, show_default=True,
              type=click.FloatRange(0.1), help=o.TELEMETRY_INTERVAL.help)
@click.option("--max-concurrency", default=o.MAX_CONCURRENCY.default, show_default=True,
              type=click.IntRange(1), help=o.MAX_CONCURRENCY.help)
@click.option("--max-queue", default=o.MAX_QUEUE.default, show_default=True,
              type=click.IntRange(0), help=o.MAX_QUEUE.help)
@click.option("--max-wait-ms", default=o.MAX_WAIT_MS.default, show_default=True,
              type=click.IntRange(0, 3_600_000), help=o.MAX_WAIT_MS.help)
@click.option("--serve-grpc-port", type=click.IntRange(1, 65535), help=o.SERVE_GRPC_PORT.help)
@click.option("--mode", type=click.Choice(["native", "container", "kubernetes"]),
              default=o.MODE.default, show_default=True, envvar="EDGEFLEET_AGENT_MODE",
              help=o.MODE.help)
@click.option("--docker-host", envvar="DOCKER_HOST", help=o.DOCKER_HOST.help)
@click.option("--container-cpus", type=click.FloatRange(0.01), help=o.CONTAINER_CPUS.help)
@click.option("--container-memory-mb", type=click.IntRange(6), help=o.CONTAINER_MEMORY_MB.help)
@click.option("--verbose", is_flag=True, help="Log debug messages.")
@kube_options
def run(
    hub_url: str | None, token: str | None, data_dir: Path, name: str | None,
    mqtt_url: str | None, serve_host: str, serve_port: int, telemetry_interval: float,
    max_concurrency: int, max_queue: int, max_wait_ms: int, serve_grpc_port: int | None,
    mode: str, docker_host: str | None, container_cpus: float | None,
    container_memory_mb: int | None, verbose: bool, **kube: Any,
) -> None:
    """Enroll on first start, then keep this device on what the hub assigns it.

    The scoring API's key is in DATA_DIR/serving-api-key. Stops cleanly on
    SIGTERM or SIGINT. With --mode container each version runs as a container
    of its package image (built with `package build --image`) on the engine at
    --docker-host; the scoring API stays at --serve-host:--serve-port.

    \b
    Example: edgefleet agent run --hub http://hub:8080 --token efe_... --data-dir /var/lib/edgefleet
    Example: edgefleet agent run --mode container --docker-host unix:///run/podman/podman.sock
    """
    from agent import identity as identities
    from agent.daemon import AgentOptions
    from agent.identity import EnrollmentError
    from agent.inventory import oci_platform

    if mode == "kubernetes":
        from agent.kube.cli import run_kubernetes

        run_kubernetes(hub_url=hub_url, token=token, data_dir=data_dir, name=name,
                       mqtt_url=mqtt_url, telemetry_interval=telemetry_interval,
                       verbose=verbose, pause_in=_pause_in(os.environ.get(
                           "EDGEFLEET_AGENT_PAUSE_IN")), **kube)
        return
    if mode == "container" and docker_host and not docker_host.startswith("unix://"):
        raise click.BadParameter("give the engine's unix socket as unix:///PATH",
                                 param_hint="--docker-host")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = identities.load(data_dir)
    if identity is None:
        if not hub_url or not token:
            raise click.UsageError(
                f"{data_dir} holds no identity yet: give --hub and --token to enroll this device"
            )
        _check_serve_port(serve_host, serve_port)
        try:
            identity = identities.enroll(data_dir, hub_url=hub_url, token=token, name=name,
                                         platform=oci_platform(), mqtt_url=mqtt_url)
        except EnrollmentError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"Enrolled as {identity.device_id} ({identity.name})")
    options = AgentOptions(
        data_dir=data_dir.absolute(), mqtt_url=mqtt_url, serve_host=serve_host,
        serve_port=serve_port, telemetry_interval=telemetry_interval,
        max_concurrency=max_concurrency, max_queue=max_queue, max_wait_ms=max_wait_ms,
        serve_grpc_port=serve_grpc_port, verbose=verbose,
        pause_in=_pause_in(os.environ.get("EDGEFLEET_AGENT_PAUSE_IN")), mode=mode,
        docker_host=docker_host if mode == "container" else None,
        container_cpus=container_cpus, container_memory_mb=container_memory_mb,
    )

    click.echo(f"Device {identity.device_id}: scoring API on http://{serve_host}:{serve_port}, "
               f"hub {identity.hub_url}, broker {mqtt_url or identity.mqtt_url}")
    sys.stdout.flush()
    sys.stderr.flush()
    # The daemon runs for months: it starts afresh in the same process (same pid, so
    # supervisors and signals are unaffected) without click, httpx and the enrollment's
    # memory. See agent/__main__.py.
    os.execv(sys.executable, [sys.executable, "-m", "agent", options.to_json()])
