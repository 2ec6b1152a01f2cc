"""The managed broker: a Mosquitto process the hub configures, starts and keeps running.

Before every start `prepare` writes its files into `DATA/broker/`
(hub/broker_logins.py: configuration, ACL, logins of the devices that
exist). Device logins change while it runs by `reload` (SIGHUP), never by a
restart.

A supervisor thread starts the process and waits on it. A broker that dies
is logged and started again after a backoff; since it may have lost
retained desired states saved less than a minute before (its autosave),
`on_restart` is called first so the hub publishes every state again. The
broker's own log lines (stderr) go to the hub's log. The process gets
SIGTERM if the supervisor thread dies with the hub (PR_SET_PDEATHSIG), so a
killed hub leaves no broker holding its port. `stop` sends SIGTERM:
Mosquitto saves its state and exits.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agent.mqtt import BackoffPolicy
from contract.files import write_secret
from hub.broker_config import BrokerConfig

log = logging.getLogger("edgefleet.hub.broker")
_broker_log = logging.getLogger("edgefleet.broker")

INSTALL_HINT = ("Mosquitto 2 is needed for the hub's broker: install it with "
                "`apt-get install mosquitto` (Debian/Ubuntu), or run your own broker "
                "and give --mqtt-url")
_SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


# A broker that keeps dying is started again less and less often.
_RESTARTS = BackoffPolicy(initial=0.5, maximum=30, stable_after=60)


class BrokerError(RuntimeError):
    """The managed broker cannot run; the message says what to do."""


def find_mosquitto(given: str | None = None) -> Path:
    """GIVEN (--mosquitto), or `mosquitto` on PATH or where Debian puts it."""
    found = shutil.which(given) if given else shutil.which("mosquitto", path=os.pathsep.join(
        [os.environ.get("PATH", ""), *_SEARCH_PATH]))
    if found is None:
        raise BrokerError(f"no {given or 'mosquitto'} found. {INSTALL_HINT}")
    return Path(found)


def hub_secret(path: Path) -> str:
    """The hub's broker password: made once, mode 0600 from the first byte."""
    write_secret(path, secrets.token_urlsafe(32) + "\n", replace=False)
    return path.read_text().strip()


def _taken(host: str, port: int) -> bool:
    """Does something listen on HOST:PORT? Told by binding, not connecting: a connection
    that says nothing is an error in the log of a TLS listener."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto does
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedBroker:
    def __init__(
        self, config: BrokerConfig, *, prepare: Callable[[], None],
        on_restart: Callable[[], None], mosquitto: Path,
        backoff: BackoffPolicy = _RESTARTS,
    ) -> None:
        """PREPARE writes the broker's files before each start; ON_RESTART is
        called before the broker is started again after dying."""
        self.config = config
        self._prepare = prepare
        self._on_restart = on_restart
        self._mosquitto = mosquitto
        self._backoff = backoff
        self._stop = threading.Event()
        self._started = threading.Event()
        self._failure: str | None = None
        self._lock = threading.Lock()  # guards _process and the counters
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.restarts = 0
        self.lost_state = False  # true when it started without the retained messages it had

    @property
    def url(self) -> str:
        return self.config.url

    # --- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = 15) -> None:
        """Start the broker and return once it listens; BrokerError if it does not."""
        self.config.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.config.directory, 0o700)  # also a directory made before, by anyone
        self.lost_state = not (self.config.directory / "mosquitto.db").exists()
        self._thread = threading.Thread(target=self._supervise, name="broker-supervisor",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise BrokerError(f"mosquitto did not listen on {self.url} within {timeout:g} s")
        if self._failure is not None:
            self.stop()
            raise BrokerError(self._failure)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (Mosquitto saves its state), wait, then SIGKILL what is left."""
        self._stop.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("mosquitto did not stop within %g s after SIGTERM; killing it", timeout)
                process.kill()
        if self._thread is not None:
            self._thread.join(timeout)

    def reload(self) -> bool:
        """Make the running broker read its logins and ACL again; False if it is not running."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return False
            process.send_signal(signal.SIGHUP)
            return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            process = self._process
            running = process is not None and process.poll() is None
            return {"managed": True, "running": running,
                    "pid": process.pid if running and process else None,
                    "restarts": self.restarts}

    # --- the supervisor thread --------------------------------------------------

    def _supervise(self) -> None:
        attempt, first = 0, True
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                why = self._serve(self._spawn(), first)
            except Exception as exc:  # its files could not be written, or no exec
                log.exception("starting mosquitto failed")
                why = str(exc)
            if first and not self._started.is_set():
                self._failure = f"mosquitto could not start: {why}"
                self._started.set()
                return
            first = False
            if self._stop.is_set():
                return
            if time.monotonic() - began >= self._backoff.stable_after:
                attempt = 0
            delay = self._backoff.delay(attempt)
            attempt += 1
            log.error("mosquitto stopped (%s); starting it again in %.1f s", why, delay)
            if self._stop.wait(delay):
                return
            with self._lock:
                self.restarts += 1
            try:
                self._on_restart()
            except Exception:
                log.exception("preparing for the broker's restart failed")

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._prepare()
        process = subprocess.Popen(
            [str(self._mosquitto), "-c", str(self.config.directory / "mosquitto.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # Its own session: a Ctrl-C at the terminal is for the hub, which stops
            # the broker last, after the fleet link has finished its batch.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        with self._lock:
            self._process = process
        return process

    def _serve(self, process: subprocess.Popen[bytes], first: bool) -> str:
        """Forward its log until it exits; returns why it ended."""
        assert process.stderr is not None
        tail: list[str] = []
        reader = threading.Thread(target=self._forward, args=(process.stderr, tail),
                                  name="broker-log", daemon=True)
        reader.start()
        if self._wait_listening(process):
            if first:
                log.info("mosquitto (pid %d) listening on %s", process.pid, self.url)
            else:
                log.warning("mosquitto (pid %d) listening on %s again", process.pid, self.url)
            self._started.set()
        code = process.wait()
        reader.join(5)
        said = "; ".join(tail)
        return f"exit code {code}" + (f": {said}" if said else "")

    def _wait_listening(self, process: subprocess.Popen[bytes], timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _taken(self.config.host, self.config.port):
                return True
            time.sleep(0.02)
        if process.poll() is None:
            log.error("mosquitto is not listening on %s after %g s; stopping it", self.url,
                      timeout)
            process.terminate()
        return False

    @staticmethod
    def _forward(stream: IO[bytes], tail: list[str]) -> None:
        """Log each line of the broker's; TAIL keeps its last errors. Closes STREAM
        at its end (one pipe per start of the broker)."""
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                error = "rror" in line
                if error:
                    tail[:] = [*tail[-2:], line]
                _broker_log.log(logging.ERROR if error else logging.INFO, "%s", line)
