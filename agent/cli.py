"""`edgefleet agent run`: the device daemon."""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from agent import options as o
from agent.kube.options import kube_options
from contract import enrollment

if TYPE_CHECKING:
    from agent.identity import Identity


def _notify_ready() -> None:
    """Tell systemd (Type=notify) the device has an identity: its ExecStartPost then takes
    the token out of the enrollment file. Without NOTIFY_SOCKET this does nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")


def _read_enrollment_file(path: Path) -> enrollment.EnrollmentConfig:
    try:
        return enrollment.parse(path.read_text())
    except FileNotFoundError:
        raise click.ClickException(f"enrollment file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"enrollment file {path} unreadable: {exc}") from None
    except enrollment.EnrollmentFileError as exc:
        raise click.ClickException(f"enrollment file {path}: {exc}") from None


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


def _enroll(
    data_dir: Path, hub_url: str, token: str, name: str | None, mqtt_url: str | None,
    *, retry: bool,
) -> Identity:
    """Enroll; with RETRY (a service, from an enrollment file) a hub that cannot be reached
    is tried again with backoff, since at first boot the network may come up late. A refusal,
    or an unreachable hub without RETRY (someone at a terminal), ends the command."""
    from agent import identity as identities
    from agent.inventory import oci_platform
    from agent.mqtt import BackoffPolicy

    backoff = BackoffPolicy(initial=2.0, maximum=120.0)
    attempt = 0
    while True:
        try:
            return identities.enroll(data_dir, hub_url=hub_url, token=token, name=name,
                                     platform=oci_platform(), mqtt_url=mqtt_url)
        except identities.HubUnreachable as exc:
            if not retry:
                raise click.ClickException(str(exc)) from None
            wait = backoff.delay(attempt)
            click.echo(f"{exc}; trying again in {wait:.0f} s", err=True)
            time.sleep(wait)
            attempt += 1
        except identities.EnrollmentError as exc:
            raise click.ClickException(str(exc)) from None


def _token(ctx: click.Context, token: str | None, token_file: TextIO | None) -> str | None:
    """The enrollment token from --token-file, else --token / EDGEFLEET_ENROLL_TOKEN; a token
    typed on the command line is readable by every local user in `ps` until the exec."""
    if token_file is not None:
        if token is not None and ctx.get_parameter_source("token") is \
                click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("give the token once: --token or --token-file")
        read = token_file.read().strip()
        if not read:
            raise click.BadParameter("the file holds no token", param_hint="--token-file")
        return read
    if token is not None and ctx.get_parameter_source("token") is \
            click.core.ParameterSource.COMMANDLINE:
        click.echo("warning: --token shows in the process list of this machine; use "
                   "--token-file FILE (or '-' for stdin) or EDGEFLEET_ENROLL_TOKEN", err=True)
    return token


@click.group()
def agent() -> None:
    """Run the device agent."""


@agent.command()
@click.option("--hub", "hub_url", envvar="EDGEFLEET_HUB",
              help="Hub URL; needed on the first start only [env EDGEFLEET_HUB].")
@click.option("--token", envvar="EDGEFLEET_ENROLL_TOKEN",
              help="Enrollment token; needed on the first start only [env EDGEFLEET_ENROLL_TOKEN]."
                   " On the command line it shows in the process list: prefer --token-file or "
                   "the environment variable.")
@click.option("--token-file", type=click.File("r"),
              help="File holding the enrollment token ('-': read it from stdin); keeps the token "
                   "out of the process list.")
@click.option("--enrollment-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read hub, token and name from this file (see `agent install`) instead; "
                   "keeps the token out of the process list.")
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
@click.option("--max-body-bytes", default=o.MAX_BODY_BYTES.default, show_default=True,
              type=click.IntRange(1024, 1 << 34), help=o.MAX_BODY_BYTES.help)
@click.option("--serve-grpc-port", type=click.IntRange(1, 65535), help=o.SERVE_GRPC_PORT.help)
@click.option("--serve-start-timeout", default=o.SERVE_START_TIMEOUT.default, show_default=True,
              type=click.FloatRange(1), help=o.SERVE_START_TIMEOUT.help)
@click.option("--mode", type=click.Choice(["native", "container", "kubernetes"]),
              default=o.MODE.default, show_default=True, envvar="EDGEFLEET_AGENT_MODE",
              help=o.MODE.help)
@click.option("--docker-host", envvar="DOCKER_HOST", help=o.DOCKER_HOST.help)
@click.option("--engine-certs-dir", default=o.ENGINE_CERTS_DIR.default, show_default=True,
              metavar="auto|off|DIR", help=o.ENGINE_CERTS_DIR.help)
@click.option("--container-cpus", type=click.FloatRange(0.01), help=o.CONTAINER_CPUS.help)
@click.option("--container-memory-mb", type=click.IntRange(6), help=o.CONTAINER_MEMORY_MB.help)
@click.option("--verbose", is_flag=True, help="Log debug messages.")
@kube_options
@click.pass_context
def run(
    ctx: click.Context, hub_url: str | None, token: str | None, token_file: TextIO | None,
    enrollment_file: Path | None, data_dir: Path,
    name: str | None,
    mqtt_url: str | None, serve_host: str, serve_port: int, telemetry_interval: float,
    max_concurrency: int, max_queue: int, max_wait_ms: int, max_body_bytes: int,
    serve_grpc_port: int | None, serve_start_timeout: float, mode: str,
    docker_host: str | None, engine_certs_dir: str,
    container_cpus: float | None, container_memory_mb: int | None, verbose: bool, **kube: Any,
) -> None:
    """Enroll on first start, then keep this device on what the hub assigns it.

    The scoring API's key is in DATA_DIR/serving-api-key. Stops cleanly on
    SIGTERM or SIGINT. With --mode container each version runs as a container
    of its package image (built with `package build --image`) on the engine at
    --docker-host; the scoring API stays at --serve-host:--serve-port.

    \b
    Example: edgefleet agent run --hub http://hub:8080 --token-file token.txt --data-dir ./d
    Example: edgefleet agent run --mode container --docker-host unix:///run/podman/podman.sock
    """
    from agent import identity as identities
    from agent.container.trust import check_setting as check_certs_dir
    from agent.daemon import AgentOptions

    token = _token(ctx, token, token_file)
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
    try:
        check_certs_dir(engine_certs_dir)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--engine-certs-dir") from None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = identities.load(data_dir)
    if identity is None:
        if enrollment_file is not None:
            config = _read_enrollment_file(enrollment_file)
            hub_url, token, name = config.hub, config.token, name or config.name
            if config.serving_api_key:
                from contract.files import write_secret

                write_secret(data_dir / "serving-api-key", config.serving_api_key,
                             replace=False)
            if token is None:
                raise click.ClickException(
                    f"enrollment file {enrollment_file} holds no token and {data_dir} no "
                    "identity: write a new token into it (edgefleet device token create)")
        if not hub_url or not token:
            raise click.UsageError(
                f"{data_dir} holds no identity yet: give --hub and --token-file (or --token) to "
                "enroll this device"
            )
        _check_serve_port(serve_host, serve_port)
        identity = _enroll(data_dir, hub_url, token, name, mqtt_url,
                           retry=enrollment_file is not None)
        click.echo(f"Enrolled as {identity.device_id} ({identity.name})")
    _notify_ready()
    options = AgentOptions(
        data_dir=data_dir.absolute(), mqtt_url=mqtt_url, serve_host=serve_host,
        serve_port=serve_port, telemetry_interval=telemetry_interval,
        max_concurrency=max_concurrency, max_queue=max_queue, max_wait_ms=max_wait_ms,
        serve_grpc_port=serve_grpc_port, max_body_bytes=max_body_bytes,
        serve_start_timeout=serve_start_timeout, verbose=verbose,
        pause_in=_pause_in(os.environ.get("EDGEFLEET_AGENT_PAUSE_IN")), mode=mode,
        docker_host=docker_host if mode == "container" else None,
        engine_certs_dir=engine_certs_dir,
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


@agent.command("forget-token", hidden=True)
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def forget_token(config_path: Path, data_dir: Path) -> None:
    """Take the token out of CONFIG once DATA_DIR holds an identity (the unit's
    ExecStartPost, as root): an enrollment token is of no more use to this device."""
    from agent import identity as identities
    from contract.files import write_secret

    if identities.load(data_dir) is None or not config_path.exists():
        return
    config = _read_enrollment_file(config_path)
    if config.token is not None:
        write_secret(config_path, enrollment.render(config.without_token()))
        click.echo(f"enrolled: the token is removed from {config_path}")


@agent.command()
@click.option("--hub", "hub_url", help="Hub URL, e.g. https://hub.example.com:8080.")
@click.option("--token-file", type=click.File("r"),
              help="File holding the enrollment token ('-': read it from stdin), whole: for "
                   "an https hub it pins the hub's CA. The token is never taken as an "
                   "argument: arguments are visible to every user.")
@click.option("--name", help="Device name shown in the hub [default: the host name].")
@click.option("--serve-host", default=o.SERVE_HOST.default, show_default=True,
              help=o.SERVE_HOST.help)
@click.option("--serve-port", default=o.SERVE_PORT.default, show_default=True,
              type=click.IntRange(1, 65535), help=o.SERVE_PORT.help)
@click.option("--no-start", is_flag=True, help="Enable the service but do not start it now.")
@click.option("--python", default=sys.executable, show_default="this Python", hidden=True,
              help="The interpreter the service runs (a device image's, when building one).")
@click.option("--first-boot-file", type=click.Path(dir_okay=False, path_type=Path), hidden=True,
              help="Device images: no token now; at first boot the enrollment file is taken "
                   "from this path (on the boot partition).")
@click.option("--uninstall", is_flag=True, help="Stop, disable and remove what install wrote.")
@click.option("--purge", is_flag=True,
              help="With --uninstall: also remove /var/lib/edgefleet (the device's identity).")
@click.option("--root", default="/", hidden=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Install into this directory tree instead (images, tests).")
@click.option("--systemctl", default="systemctl", hidden=True,
              help="The systemctl command to run (tests).")
def install(
    hub_url: str | None, token_file: TextIO | None,
    name: str | None, serve_host: str, serve_port: int, no_start: bool, python: str,
    first_boot_file: Path | None, uninstall: bool, purge: bool, root: Path, systemctl: str,
) -> None:
    """Install the agent as a systemd service of this machine, enrolled on its first start.

    \b
    Writes /etc/edgefleet/enrollment.conf (root only), the `edgefleet` system user and
    edgefleet-agent.service (state in /var/lib/edgefleet), then enables and starts it.
    The service runs this Python's edgefleet, so install edgefleet in a venv outside
    home directories first.

    Example: sudo edgefleet agent install --hub https://hub:8080 --token-file token.txt
    """
    import shlex

    from agent import install as installer

    root = root.absolute()
    if root == Path("/") and os.geteuid() != 0:
        raise click.ClickException("installing a service needs root: run it with sudo")
    try:
        if uninstall:
            done = installer.uninstall(root, systemctl=shlex.split(systemctl), purge=purge)
        else:
            if purge:
                raise click.UsageError("--purge goes with --uninstall")
            settings = installer.UnitSettings(python=python, serve_host=serve_host,
                                              serve_port=serve_port,
                                              first_boot_file=first_boot_file)
            config = None if first_boot_file else _install_config(hub_url, token_file, name)
            done = installer.install(root, config, settings, systemctl=shlex.split(systemctl),
                                     start=not no_start)
    except installer.InstallError as exc:
        raise click.ClickException(str(exc)) from None
    for line in done:
        click.echo(line)


def _install_config(
    hub_url: str | None, token_file: TextIO | None, name: str | None,
) -> enrollment.EnrollmentConfig:
    if not hub_url:
        raise click.UsageError("--hub is needed")
    if token_file is None:
        raise click.UsageError("--token-file is needed ('-' reads the token from stdin)")
    try:
        return enrollment.EnrollmentConfig(
            hub=hub_url.rstrip("/"), token=token_file.read().strip(), name=name)
    except enrollment.EnrollmentFileError as exc:
        raise click.UsageError(str(exc)) from None


@agent.command("take-enrollment", hidden=True)
@click.option("--from", "source", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "target", required=True, type=click.Path(dir_okay=False, path_type=Path))
def take_enrollment(source: Path, target: Path) -> None:
    """First boot of a device image (as root): check the enrollment file on the boot partition,
    move it to the root-only TARGET, and delete it there (a FAT partition has no owners)."""
    from contract.files import write_secret

    config = _read_enrollment_file(source)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret(target, enrollment.render(config))
    source.unlink()
    click.echo(f"edgefleet: enrollment for {config.hub} taken from {source}")
