"""The serving process, as the agent runs it: start, watch, restart, and talk to it.

The agent holds the scoring port's listening socket (`open`) and starts
`python -m agent.serving` on it only when there is something to serve: at
start-up if versions are deployed, else at the first deployment, or at the
first scoring request other than a health check (agent/idle_front.py
answers the port until then). The child dies with the agent
(PR_SET_PDEATHSIG); its pid is recorded so a restarted agent can end one
left behind by a kill -9; the agent talks to it over the control socket.
When a started child dies, the agent's supervision (`crashed`) starts a new
one and loads its good versions into it again. `stop` ends the child and
the idle front answers again; the port stays bound throughout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from agent import options as o
from agent.idle_front import IdleFront
from agent.serving.body import DeploymentBody, build
from agent.serving.sockets import tcp_listener

log = logging.getLogger("edgefleet.agent")
PR_SET_PDEATHSIG = 1


class ServingError(Exception):
    """The serving process refused or failed a control request."""


def _die_with_parent() -> Callable[[], object]:
    """What the child runs between fork and exec (no imports, no locks there): prctl,
    looked up here. ctypes is imported only now: the idle daemon need not hold it."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return partial(libc.prctl, PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class ServingOptions:
    host: str
    port: int
    api_key_file: Path
    max_concurrency: int = o.MAX_CONCURRENCY.default
    max_queue: int = o.MAX_QUEUE.default
    max_wait_ms: int = o.MAX_WAIT_MS.default
    grpc_port: int | None = o.SERVE_GRPC_PORT.default
    max_body_bytes: int = o.MAX_BODY_BYTES.default
    start_timeout: float = o.SERVE_START_TIMEOUT.default


class ControlClient:
    """The control API of a serving process at SOCKET: the agent's own child, or the one
    inside a container (container mode)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket = socket_path

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        from agent.unix_http import UnixConnection  # not at idle: see its module

        connection = UnixConnection(self.socket, timeout=120.0)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            connection.close()
        if response.status >= 400:
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text
            raise ServingError(message)
        return json.loads(text)

    def put(self, name: str, body: DeploymentBody) -> Any:
        return self._call("PUT", f"/control/deployments/{name}", build(body))

    def delete(self, name: str) -> Any:
        return self._call("DELETE", f"/control/deployments/{name}")

    def self_test(self, name: str, version: str, sample: Mapping[str, Any]) -> Any:
        return self._call("POST", f"/control/deployments/{name}/versions/{version}/self-test",
                          sample)

    def state(self) -> Any:
        return self._call("GET", "/control/state")

    def stats(self) -> Any:
        return self._call("GET", "/control/stats")


class ServingProcess(ControlClient):
    def __init__(self, data_dir: Path, options: ServingOptions) -> None:
        super().__init__(data_dir / "control.sock")
        self.options = options
        self.pid_file = data_dir / "serving.pid"
        self.log_path = data_dir / "serving.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.wanted = False  # started, and not stopped since: a death is a crash
        self._answered = False  # the running process answered its control socket
        # gRPC binds a port of its own in the serving process: started at once, kept.
        self.on_demand = options.grpc_port is None
        self._listener: socket.socket | None = None
        self._front: IdleFront | None = None
        self._lock = threading.RLock()  # the idle front starts it from its own thread
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the
        # process: every spawn happens in this one thread, which lives as long as the
        # agent (the idle front's threads end with their connections).
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="serving spawner")

    # -- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Take the scoring port; the idle front answers it until `start`."""
        listener = self._listen()
        self._front = IdleFront(listener, self._start_on_demand)
        if self.on_demand:
            self._front.resume()
        else:
            self.start()

    def _listen(self) -> socket.socket:
        if self._listener is None:
            self._end_leftover()
            host, port = self.options.host, self.options.port
            try:
                self._listener = tcp_listener(host, port)
            except OSError as e:
                raise ServingError(f"cannot listen on {host}:{port}: {e.strerror}; "
                                   "choose another --serve-port") from None
        return self._listener

    def _start_on_demand(self) -> None:
        """Started if it is not (a crash is the supervision's to handle: it reloads), and
        answering once a `warm` start is."""
        with self._lock:
            if not self.wanted or (self.alive() and not self._answered):
                self.start()

    def start(self) -> None:
        """Start the serving process, if it is not running, and wait until it answers."""
        with self._lock:
            self.warm()
            if not self._answered:
                self._wait_ready(self.options.start_timeout)

    def warm(self) -> None:
        """Start the serving process if it is not running, without waiting for it: a
        desired state with something to serve does this first, so the start overlaps
        the download and the verification."""
        with self._lock:
            if self.alive():
                return
            listener = self._listen()
            if self._front is not None:
                self._front.pause()
            self.wanted = True
            self._spawner.submit(self._spawn, listener.fileno()).result()

    def _spawn(self, listen_fd: int) -> None:
        o = self.options
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.serving", "--host", o.host, "--port", str(o.port),
                 "--listen-fd", str(listen_fd),
                 "--control-socket", str(self.socket), "--api-key-file", str(o.api_key_file),
                 "--max-concurrency", str(o.max_concurrency), "--max-queue", str(o.max_queue),
                 "--max-wait-ms", str(o.max_wait_ms), "--max-body-bytes", str(o.max_body_bytes),
                 *(() if o.grpc_port is None else ("--grpc-port", str(o.grpc_port)))],
                stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent(),
                pass_fds=(listen_fd,), env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.pid_file.write_text(str(self.process.pid))
        self._answered = False

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(
                    f"the serving process exited with {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            try:
                self.state()
                self._answered = True
                return
            except (OSError, ServingError):
                time.sleep(0.05)
        raise ServingError(f"the serving process did not answer within {timeout:g}s")

    def _end_leftover(self) -> None:
        """Stop a serving process a killed agent left behind (it holds the port)."""
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"agent.serving" not in cmdline:
            return  # the pid was reused by something else
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def crashed(self) -> bool:
        """Started and not stopped, yet not running: the supervision restarts it."""
        return self.wanted and not self.alive()

    def stop(self, timeout: float = 30.0) -> None:
        """End the serving process; the idle front answers the port again."""
        with self._lock:
            self.wanted = False
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
            self.pid_file.unlink(missing_ok=True)
            if self._front is not None:
                self._front.resume()

    def close(self) -> None:
        """Stop, and give up the scoring port (the agent is shutting down)."""
        self.stop()
        if self._front is not None:
            self._front.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._spawner.shutdown()

    def restart(self) -> None:
        self.restarts += 1
        log.warning("the serving process died (exit %s); starting it again",
                    self.process.returncode if self.process else None)
        self.start()

    # -- control: what loads a version starts the process first -------------------

    def put(self, name: str, body: DeploymentBody) -> Any:
        self._start_on_demand()
        return super().put(name, body)

    def self_test(self, name: str, version: str, sample: Mapping[str, Any]) -> Any:
        self._start_on_demand()
        return super().self_test(name, version, sample)
