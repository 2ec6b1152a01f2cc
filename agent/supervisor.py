"""The serving process, as the agent runs it: start, watch, restart, and talk to it.

The agent starts `python -m agent.serving` as a child that dies with it
(PR_SET_PDEATHSIG), records its pid so a restarted agent can end one left
behind by a kill -9, and talks to it over the control socket. When the
child dies, `check` notices, starts a new one and calls back so the agent
loads its good versions into it again.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import options as o
from agent.serving.body import DeploymentBody, build

log = logging.getLogger("edgefleet.agent")
PR_SET_PDEATHSIG = 1


class ServingError(Exception):
    """The serving process refused or failed a control request."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the control socket. The stdlib client, not httpx: the agent
    stays small (httpx with its imports costs ~14 MB the daemon need not hold)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("serving", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: no imports, no locks.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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


class ControlClient:
    """The control API of a serving process at SOCKET: the agent's own child, or the one
    inside a container (container mode)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket = socket_path

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        connection = _UnixConnection(self.socket, timeout=120.0)
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

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        self._end_leftover()
        o = self.options
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.serving", "--host", o.host, "--port", str(o.port),
                 "--control-socket", str(self.socket), "--api-key-file", str(o.api_key_file),
                 "--max-concurrency", str(o.max_concurrency), "--max-queue", str(o.max_queue),
                 "--max-wait-ms", str(o.max_wait_ms), "--max-body-bytes", str(o.max_body_bytes),
                 *(() if o.grpc_port is None else ("--grpc-port", str(o.grpc_port)))],
                stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(
                    f"the serving process exited with {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            try:
                self.state()
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

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> None:
        self.restarts += 1
        log.warning("the serving process died (exit %s); starting it again",
                    self.process.returncode if self.process else None)
        self.start()
