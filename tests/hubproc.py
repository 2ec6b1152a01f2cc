"""Start a real `edgefleet hub serve` process on free loopback ports.

Used by the tests' fixtures and by the benchmarks, so both drive the hub the
way a user does: over HTTP, as a separate process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

# The composition root run by the interpreter running the tests: what the console
# script runs, without depending on where (or whether) the script is installed.
EDGEFLEET = [sys.executable, "-m", "edgefleet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HubProcess:
    data_dir: Path
    port: int
    mqtt_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        return stop_process(self.process, sig, timeout)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    """Send SIG and wait; kill what does not end within TIMEOUT. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def start_hub(data_dir: Path, *, extra_args: tuple[str, ...] = (), timeout: float = 30,
              port: int | None = None, mqtt_port: int | None = None) -> HubProcess:
    """Start a hub on free ports, or on PORT / MQTT_PORT (a restart where the last one ran)."""
    port, mqtt_port = port or free_port(), mqtt_port or free_port()
    log_path = data_dir.parent / f"{data_dir.name}-hub.log"
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [*EDGEFLEET, "hub", "serve", "--data-dir", str(data_dir), "--port", str(port),
             "--mqtt-port", str(mqtt_port), *extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    hub = HubProcess(data_dir, port, mqtt_port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"hub exited with {process.returncode}:\n{hub.log()}")
        try:
            if httpx.get(f"{hub.url}/api/v1/health", timeout=1).status_code == 200:
                return hub
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    hub.stop(signal.SIGKILL)
    raise RuntimeError(f"hub did not answer within {timeout}s:\n{hub.log()}")
