"""The serving process: the scoring API on TCP and the control API on a unix socket, one loop.

Both listening sockets are opened before the loop starts, so a busy port or
a live control socket fails at once with a clear message, and port 0 can be
reported as the port really bound. SIGTERM/SIGINT stop both servers
gracefully (in-flight requests finish), then the worker pools and the
runtimes are closed and the process exits 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
import uvloop
from starlette.types import ASGIApp

from agent import options as o
from agent.serving import app as scoring_app
from agent.serving import control
from agent.serving.autoload import Autoload, AutoloadError
from agent.serving.errors import ServingError
from agent.serving.front import FrontProtocol
from agent.serving.limits import Limiter
from agent.serving.scoring import Scorer
from agent.serving.shadow import Shadow
from agent.serving.sockets import tcp_listener
from agent.serving.table import ModelTable
from agent.serving.telemetry import Telemetry

log = logging.getLogger("edgefleet.serving")


class ServeError(Exception):
    """The server cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class ServeOptions:
    control_socket: Path
    api_key: str | None  # None: no key needed (trusted networks only)
    host: str = o.SERVE_HOST.default
    port: int = o.SERVE_PORT.default
    max_concurrency: int = o.MAX_CONCURRENCY.default
    max_queue: int = o.MAX_QUEUE.default
    max_body_bytes: int = o.MAX_BODY_BYTES.default
    max_wait_ms: int = o.MAX_WAIT_MS.default  # 0: no wait budget
    grpc_port: int | None = None  # None: no gRPC API; 0: any free port
    shadow_concurrency: int = o.SHADOW_CONCURRENCY.default
    graceful_seconds: float = 30.0  # how long shutdown waits for in-flight requests
    seed: int | None = None  # of the split and shadow sampling; tests make it repeatable
    autoload: Autoload | None = None  # load this image's package at start (Kubernetes mode)
    listen_fd: int | None = None  # the scoring port, already listening (the agent's)


def listen_tcp(host: str, port: int) -> socket.socket:
    try:
        return tcp_listener(host, port)
    except OSError as e:
        raise ServeError(
            f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None


def listen_unix(path: Path) -> socket.socket:
    """A unix socket at PATH that only this user can connect to (the control API has no key)."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ServeError(f"{path} exists and is not a socket; choose another --control-socket")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()  # left behind by a server that died
            else:
                raise ServeError(f"another server is listening on {path}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = socket.socket(socket.AF_UNIX)
    # Created 0600 from the start: there is no moment when others could connect.
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot create the control socket {path}: {e.strerror}") from None
    finally:
        os.umask(previous)
    sock.listen()
    return sock


class _Server(uvicorn.Server):
    """uvicorn installs its own signal handlers and re-raises a caught SIGTERM after
    shutdown, so the process would end "killed by signal"; _serve_all handles
    signals once for both servers instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_all(apps: list[tuple[ASGIApp, socket.socket]], graceful_seconds: float) -> None:
    servers = [
        _Server(uvicorn.Config(
            app, http=FrontProtocol, lifespan="off", access_log=False, log_level="warning",
            proxy_headers=False,  # nothing here reads the client's address
            timeout_graceful_shutdown=int(graceful_seconds),
        ))
        for app, _ in apps
    ]

    def stop() -> None:
        for server in servers:
            server.force_exit = server.should_exit  # a second signal: stop now
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(s.serve(sockets=[sock]))
             for s, (_, sock) in zip(servers, apps, strict=True)]
    try:
        # Either server stopping (a signal, or a failure) stops the other.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(options: ServeOptions, api_socket: socket.socket,
               control_socket: socket.socket, say: Callable[[str], None]) -> None:
    table = ModelTable(random.Random(options.seed))
    limiter = Limiter(max_concurrency=options.max_concurrency, max_queue=options.max_queue,
                      max_wait=options.max_wait_ms / 1000 or None)
    telemetry = Telemetry(table, limiter)
    shadow = Shadow(table, limiter, telemetry, concurrency=options.shadow_concurrency)
    scorer = Scorer(table, limiter, telemetry, shadow)
    # Containers (upstream versions) take the same key as the device's scoring address.
    controller = control.Controller(scorer, options.api_key)
    apps: list[tuple[ASGIApp, socket.socket]] = [
        (scoring_app.create_app(scorer, api_key=options.api_key,
                                max_body_bytes=options.max_body_bytes), api_socket),
        (control.create_app(controller), control_socket),
    ]
    grpc_server = None
    if options.grpc_port is not None:
        # Imported here: grpcio is optional, and costs memory a REST-only device need not spend.
        try:
            from agent.serving.oip import service
        except ImportError as e:
            raise ServeError(f"--grpc-port needs grpcio ({e}): pip install 'edgefleet[grpc]'"
                             ) from None
        try:
            grpc_server, port = service.create_server(scorer, options.api_key, options.host,
                                                      options.grpc_port)
        except service.BindError as e:
            raise ServeError(f"{e}; choose another --grpc-port") from None
        await grpc_server.start()
        say(f"gRPC API (Open Inference Protocol) on {options.host}:{port}")
    try:
        if options.autoload is not None:
            # Before the servers start: the readiness probe gets no answer until the
            # model is loaded and its self-test passed (see agent/serving/autoload.py).
            await _autoload(controller, options.autoload)
        # What start-up made (modules, apps, FastAPI's models: most of the heap) lives as
        # long as the process: out of the collector's sight, a full collection walks only
        # what requests left, instead of pausing every request in flight for all of it.
        gc.freeze()
        await _serve_all(apps, options.graceful_seconds)
    finally:
        if grpc_server is not None:
            await grpc_server.stop(options.graceful_seconds)

        def close() -> None:
            scorer.close()
            shadow.close()
            table.close_all(timeout=options.graceful_seconds)

        await asyncio.to_thread(close)


async def _autoload(controller: control.Controller, autoload: Autoload) -> None:
    try:
        answer = await controller.put(autoload.name, autoload.body())
    except (ServingError, AutoloadError) as exc:
        raise ServeError(f"could not load {autoload.name}:{autoload.version}: {exc}") from None
    tests = answer["self_test"].get(autoload.version)
    log.info("loaded %s:%s%s", autoload.name, autoload.version,
             f", self-test passed in {tests['milliseconds']['total']} ms" if tests else
             " (the package has no sample request to self-test with)")


def serve(options: ServeOptions, say: Callable[[str], None] = print) -> None:
    """Run until SIGTERM/SIGINT; ServeError if the server cannot start."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    api_socket = (listen_tcp(options.host, options.port) if options.listen_fd is None
                  else socket.socket(fileno=options.listen_fd))
    try:
        control_socket = listen_unix(options.control_socket)
    except ServeError:
        api_socket.close()
        raise
    host, port = api_socket.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    auth = "API key required" if options.api_key else "no API key: --no-auth"
    say(f"Scoring API (Open Inference Protocol) on {url} ({auth})")
    say(f"Control API on unix socket {options.control_socket}")
    budget = f" or an estimated wait over {options.max_wait_ms} ms" if options.max_wait_ms else ""
    say(
        f"At most {options.max_concurrency} inferences at once,"
        f" {options.max_queue} waiting; more{budget} get 503"
    )
    try:
        # uvloop: the event loop, its transports and timers in C (libuv). Profiled with 32
        # clients on a small model, it cut the server's CPU per request by ~10-15 %
        # (uvicorn's keep-alive timer and the loop's handles were ~10 % of asyncio's time).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run(options, api_socket, control_socket, say))
    finally:
        with contextlib.suppress(FileNotFoundError):
            options.control_socket.unlink()
