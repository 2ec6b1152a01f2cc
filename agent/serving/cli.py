"""`edgefleet serve`: start the device's scoring server."""

from __future__ import annotations

import os
from pathlib import Path

import click

from agent import options as o


def _api_key(api_key: str | None, api_key_file: Path | None, no_auth: bool) -> str | None:
    given = [flag for flag, value in
             (("--api-key", api_key), ("--api-key-file", api_key_file), ("--no-auth", no_auth))
             if value]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} exclude each other; give one")
    if no_auth:
        return None
    if api_key_file is not None:
        api_key = api_key_file.read_text().strip()
        if not api_key:
            raise click.BadParameter(f"{api_key_file} is empty", param_hint="--api-key-file")
    if not api_key:
        raise click.UsageError(
            "the scoring API needs a key: give --api-key-file PATH (or --api-key /"
            " EDGEFLEET_SERVE_API_KEY), or --no-auth on a network you trust"
        )
    return api_key


@click.command()
@click.option("--host", default=o.SERVE_HOST.default, show_default=True, help=o.SERVE_HOST.help)
@click.option("--port", default=o.SERVE_PORT.default, show_default=True,
              type=click.IntRange(0, 65535), help=f"{o.SERVE_PORT.help} 0 picks a free one.")
@click.option("--control-socket", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Unix socket for the agent's control API (created mode 0600).")
@click.option("--api-key", envvar="EDGEFLEET_SERVE_API_KEY",
              help="Key clients must send (Authorization: Bearer KEY or X-API-Key).")
@click.option("--api-key-file", envvar="EDGEFLEET_SERVE_API_KEY_FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the key from this file (keeps it out of the process list).")
@click.option("--no-auth", is_flag=True, help="Serve without a key; only on a network you trust.")
@click.option("--max-concurrency", default=o.MAX_CONCURRENCY.default, show_default=True,
              type=click.IntRange(1), help=o.MAX_CONCURRENCY.help)
@click.option("--max-queue", default=o.MAX_QUEUE.default, show_default=True,
              type=click.IntRange(0), help=o.MAX_QUEUE.help)
@click.option("--max-body-bytes", default=o.MAX_BODY_BYTES.default, show_default=True,
              type=click.IntRange(1024, 1 << 34), help=o.MAX_BODY_BYTES.help)
@click.option("--max-wait-ms", default=o.MAX_WAIT_MS.default, show_default=True,
              type=click.IntRange(0, 3_600_000), help=o.MAX_WAIT_MS.help)
@click.option("--grpc-port", type=click.IntRange(0, 65535),
              help="Also serve the Open Inference Protocol over gRPC on this port (0 picks a"
              " free one); off unless given. Needs the grpc extra.")
@click.option("--listen-fd", type=int, hidden=True,
              help="Serve the scoring API on this listening socket (the agent's) instead of"
              " binding --host/--port.")
@click.option("--seed", type=int, hidden=True,
              help="Seed of the traffic split and shadow sampling, for repeatable tests.")
@click.option("--load", "load", envvar="EDGEFLEET_SERVE_LOAD", metavar="NAME:VERSION",
              help="Load the package this image carries (serving.json at $EDGEFLEET_SERVING) "
                   "as NAME:VERSION and self-test it before answering; no agent needed "
                   "[env EDGEFLEET_SERVE_LOAD].")
@click.option("--batching", envvar="EDGEFLEET_SERVE_BATCHING", metavar="SIZE[:DELAY_MS]|off",
              help="With --load: adaptive batching of up to SIZE rows per runtime call, a "
                   "batch's first request waiting up to DELAY_MS for more; 'off' turns off the "
                   "package's default [env EDGEFLEET_SERVE_BATCHING].")
@click.option("--sketch", envvar="EDGEFLEET_SERVE_SKETCH", metavar="JSON",
              help="With --load: the version's drift bins (the desired state's sketch spec); "
                   "what it answers is counted into them, read at /metrics/sketches "
                   "[env EDGEFLEET_SERVE_SKETCH].")
def serve(
    host: str,
    port: int,
    control_socket: Path,
    api_key: str | None,
    api_key_file: Path | None,
    no_auth: bool,
    max_concurrency: int,
    max_queue: int,
    max_body_bytes: int,
    max_wait_ms: int,
    grpc_port: int | None,
    listen_fd: int | None,
    seed: int | None,
    load: str | None,
    batching: str | None,
    sketch: str | None,
) -> None:
    """Serve loaded models over the Open Inference Protocol (KServe V2) REST API
    (and gRPC with --grpc-port).

    The agent starts this process and tells it what to load through the
    control socket. Health endpoints (/v2/health/*) are open; everything
    else, /metrics included, needs the API key. SIGTERM or Ctrl-C finish
    in-flight requests and exit 0.

    Example: edgefleet serve --control-socket /run/edgefleet/serve.sock
    --api-key-file /etc/edgefleet/serve.key --host 0.0.0.0
    """
    from agent.serving.autoload import DEFAULT_SERVING, SERVING_ENV, Autoload, AutoloadError
    from agent.serving.server import ServeError, ServeOptions
    from agent.serving.server import serve as run

    autoload = None
    for given, flag in ((batching, "--batching"), (sketch, "--sketch")):
        if given is not None and not load:
            raise click.UsageError(f"{flag} is about the model --load names; the agent sets "
                                   "it through the control socket otherwise")
    if load:
        try:
            autoload = Autoload.parse(load, Path(os.environ.get(SERVING_ENV, DEFAULT_SERVING)),
                                      batching, sketch)
        except AutoloadError as e:
            raise click.BadParameter(str(e), param_hint="--load") from None

    options = ServeOptions(
        control_socket=control_socket.absolute(),
        api_key=_api_key(api_key, api_key_file, no_auth),
        host=host,
        port=port,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_wait_ms=max_wait_ms,
        grpc_port=grpc_port,
        seed=seed,
        autoload=autoload,
        listen_fd=listen_fd,
    )
    try:
        run(options, say=click.echo)
    except ServeError as e:
        raise click.ClickException(str(e)) from None
