"""A real Mosquitto broker on a free loopback port, for tests and benchmarks.

    from mosquitto import mosquitto  # noqa: F401  (the fixture)

    def test_x(mosquitto: Mosquitto) -> None:
        ... mosquitto.url ...
        mosquitto.stop(); mosquitto.start()   # "broker gone, then back"

The broker writes its config, persistence file and log into its own
directory. It keeps retained messages, persistent sessions and their queued
messages across stop()/start() (it saves them when SIGTERM stops it), unless
`start(fresh=True)` asks for a broker that has forgotten everything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MOSQUITTO = "/usr/sbin/mosquitto"

CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {directory}
log_dest file {directory}/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
{user}
# Mosquitto's default max_queued_messages is 1000: a QoS 1 subscriber that
# falls further behind (or is offline longer) silently loses every message
# beyond that, with only a log line on the broker. The agent's consumer
# acknowledges as it takes messages, so a backlog waits here, in the broker.
max_queued_messages 100000
# How many unacknowledged QoS 1 messages the broker has out to one MQTT 3.1.1
# client at a time (MQTT 5 clients say their own Receive Maximum).
max_inflight_messages 100
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Mosquitto:
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, *, fresh: bool = False, timeout: float = 10) -> None:
        """Start on the same port; FRESH drops the saved retained messages and sessions."""
        if self.process is not None:
            raise RuntimeError("mosquitto is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        if fresh:
            (self.directory / "mosquitto.db").unlink(missing_ok=True)
        # As root, Mosquitto would switch to the "mosquitto" user, which cannot
        # write into a test's private temp directory.
        user = "user root" if os.geteuid() == 0 else ""
        self.config_path.write_text(CONFIG.format(port=self.port, directory=self.directory,
                                                  user=user))
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"mosquitto exited with {code}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} in {timeout} s")

    def stop(self, timeout: float = 10) -> None:
        """Stop gracefully (SIGTERM: Mosquitto saves its state first)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self, *, fresh: bool = False) -> None:
        self.stop()
        self.start(fresh=fresh)


def start_mosquitto(directory: Path) -> Mosquitto:
    broker = Mosquitto(directory)
    broker.start()
    return broker


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()
