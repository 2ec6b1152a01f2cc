"""Real processes for benchmarks, tests and the demo: a hub, an agent, a Mosquitto broker.

Each is started the way a user starts it (`edgefleet hub serve`, `edgefleet agent
run`, `mosquitto -c`), on free loopback ports, in a directory of the caller's.
Benchmarks import it as `harness` (it sits beside them); tests and examples as
`bench.harness`, with the repository root on sys.path.

Hubs run with TLS, as by default, unless started with `tls=False` (then
`--insecure`). Each hub's CA is `HubProcess.ca_path`; the harness verifies
with it, and agents pin it through their enrollment tokens. A CA directory
named by `EDGEFLEET_HARNESS_CA` (ca.key, ca.pem) is copied into each new hub's
data dir before its first start, so one test run trusts one CA for every hub
(tests/conftest.py makes it and points SSL_CERT_FILE at it for their plain
httpx calls and CLI processes); `EDGEFLEET_HARNESS_INSECURE=1` makes `tls=False`
the default (for a test module about plain-text logins). `address` starts a
hub on another address of this machine than loopback (container engines skip
TLS checks for registries on loopback).
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import psycopg

from contract import protocol

# The composition root run by the interpreter running the tests: what the console
# script runs, without depending on where (or whether) the script is installed.
EDGEFLEET = [sys.executable, "-m", "edgefleet"]


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768 and up), so that no outgoing
    connection made meanwhile (the hub's own to its broker, say) can take it before the
    process it is meant for binds it."""
    for _ in range(1000):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


@dataclass
class HubProcess:
    data_dir: Path
    port: int
    mqtt_port: int
    process: subprocess.Popen
    log_path: Path
    tls: bool = True
    address: str = "127.0.0.1"  # what the hub and its broker listen on

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.port}"

    @property
    def mqtt_url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.address}:{self.mqtt_port}"

    @property
    def ca_path(self) -> Path:
        """What the hub's TLS chains to (it exists once the hub has started): its own CA,
        or with --tls-cert the trust anchor it wrote from that file."""
        trust = self.data_dir / "tls" / "trust.pem"
        return trust if trust.exists() else self.data_dir / "tls" / "ca.pem"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client verifies this hub with."""
        return ssl.create_default_context(cafile=str(self.ca_path)) if self.tls else True

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
              port: int | None = None, mqtt_port: int | None = None,
              tls: bool | None = None, address: str = "127.0.0.1") -> HubProcess:
    """Start a hub on free ports, or on PORT / MQTT_PORT (a restart where the last one ran),
    listening on ADDRESS; TLS False runs it with --insecure (default: see the module's
    docstring)."""
    if tls is None:
        tls = os.environ.get("EDGEFLEET_HARNESS_INSECURE") != "1"
    port, mqtt_port = port or free_port(), mqtt_port or free_port()
    shared = os.environ.get("EDGEFLEET_HARNESS_CA")
    if tls and shared and not (data_dir / "tls" / "ca.key").exists():
        (data_dir / "tls").mkdir(parents=True, mode=0o700)
        for name in ("ca.key", "ca.pem"):
            shutil.copy2(Path(shared) / name, data_dir / "tls" / name)
    if not tls:
        extra_args = ("--insecure", *extra_args)
    log_path = data_dir.parent / f"{data_dir.name}-hub.log"
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [*EDGEFLEET, "hub", "serve", "--data-dir", str(data_dir), "--host", address,
             "--port", str(port), "--mqtt-port", str(mqtt_port), *extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    hub = HubProcess(data_dir, port, mqtt_port, process, log_path, tls, address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"hub exited with {process.returncode}:\n{hub.log()}")
        try:
            if (not tls or hub.ca_path.exists()) and httpx.get(
                    f"{hub.url}/api/v1/health", timeout=1, verify=hub.verify).status_code == 200:
                return hub
        except (httpx.TransportError, ssl.SSLError):
            pass
        time.sleep(0.1)
    hub.stop(signal.SIGKILL)
    raise RuntimeError(f"hub did not answer within {timeout}s:\n{hub.log()}")


T = TypeVar("T")


def timed(work: Callable[[], object], repeat: int) -> float:
    """Median seconds of WORK over REPEAT runs."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def wait_for(check: Callable[[], T | None], *, timeout: float = 30, what: str = "it") -> T:
    """Poll CHECK until it returns something truthy; fail naming WHAT after TIMEOUT."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def enrollment_token(hub: HubProcess, **body: object) -> str:
    answer = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json=body,
                        headers={"Authorization": f"Bearer {hub.admin_token}"},
                        verify=hub.verify)
    answer.raise_for_status()
    return answer.json()["token"]


@dataclass
class AgentProcess:
    data_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def device_id(self) -> str:
        return json.loads((self.data_dir / "identity.json").read_text())["device_id"]

    @property
    def api_key(self) -> str:
        return (self.data_dir / "serving-api-key").read_text().strip()

    def state(self) -> dict:
        """The agent's saved state; empty until it has saved one (a fresh agent saves its
        first when something happens)."""
        path = self.data_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.process, sig, timeout)


def start_agent(
    hub: HubProcess, data_dir: Path, *, port: int | None = None, token: str | None = None,
    env: dict[str, str] | None = None, telemetry_interval: float = 1.0,
    extra_args: tuple[str, ...] = (),
) -> AgentProcess:
    """Start (and on a first start, enroll) an agent; returns once its scoring API answers."""
    port = port or free_port()
    log_path = data_dir.parent / f"{data_dir.name}-agent.log"
    args = [*EDGEFLEET, "agent", "run", "--data-dir", str(data_dir), "--serve-port", str(port),
            "--telemetry-interval", str(telemetry_interval), *extra_args]
    secret = None
    if not (data_dir / "identity.json").exists() and "--enrollment-file" not in extra_args:
        # On stdin, as the README says: a token in argv is in every local user's `ps`.
        secret = token or enrollment_token(hub)
        args += ["--hub", hub.url, "--token-file", "-"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.PIPE if secret else subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if secret is not None and process.stdin is not None:
        process.stdin.write(secret.encode())
        process.stdin.close()
    agent = AgentProcess(data_dir, port, process, log_path)

    def live() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"agent exited with {process.returncode}:\n{agent.log()}")
        try:
            return httpx.get(f"{agent.url}/v2/health/live", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(live, timeout=60, what="the agent's scoring API")
    return agent


def publish_version(
    hub: HubProcess, name: str, model: Path, *, extra: tuple[str, ...] = ()
) -> int:
    """Register MODEL as the next version of NAME and push its signed package; returns the
    version."""
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers, timeout=60, verify=hub.verify) as c:
        digest = c.post("/api/v1/blobs", content=model.read_bytes()).json()["digest"]
        answer = c.post(f"/api/v1/models/{name}/versions",
                        json={"files": [{"path": model.name, "digest": digest}]})
        answer.raise_for_status()
    version = answer.json()["version"]
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
           **({"EDGEFLEET_CA": str(hub.ca_path)} if hub.tls else {})}
    done = subprocess.run([*EDGEFLEET, "package", "build", f"{name}:{version}", "--no-deps",
                           "--quiet", *extra], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"package build failed:\n{done.stderr}")
    return version


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


def bridge_config(name: str, central: int) -> str:
    """The lines that make a broker a leaf of the one on port CENTRAL: what devices send
    goes up to it (the hub subscribes there), what the hub publishes for devices comes
    down, retained flags kept. One broker here tops out under the machine's open-file
    limit (20,000), so a fleet larger than that spreads over leaves (bench/rollout.py
    --brokers). The leaf's session at the centre persists: nothing is lost while the
    bridge reconnects."""
    def every_device(topic: Callable[[str], str]) -> str:
        return topic("ID").replace("/ID/", "/+/", 1)
    return "\n".join([
        f"connection {name}", f"address 127.0.0.1:{central}", f"remote_clientid {name}",
        "cleansession false", "bridge_protocol_version mqttv311",
        *(f"topic {every_device(t)} in 1" for t in (protocol.desired_topic,
                                                     protocol.commands_topic)),
        *(f"topic {t} out 1" for t in protocol.HUB_SUBSCRIPTIONS),
        ""])


@dataclass
class Mosquitto:
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    bridge_to: int | None = None  # a leaf of the broker on this port (bridge_config)

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
        bridge = "" if self.bridge_to is None else bridge_config(
            f"leaf-{self.port}", self.bridge_to)
        self.config_path.write_text(CONFIG.format(port=self.port, directory=self.directory,
                                                  user=user) + bridge)
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
        stop_process(self.process, timeout=timeout)
        self.process = None

    def restart(self, *, fresh: bool = False) -> None:
        self.stop()
        self.start(fresh=fresh)


def start_mosquitto(directory: Path, *, bridge_to: int | None = None) -> Mosquitto:
    broker = Mosquitto(directory, bridge_to=bridge_to)
    broker.start()
    return broker


# Debian's postgresql package (.ci/install): its newest major version's programs.
POSTGRES_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"),
                   key=lambda p: int(p.parent.name), default=Path("/usr/lib/postgresql/15/bin"))


class PostgresServer:
    """A private PostgreSQL server: initdb into a temp dir, `postgres` on a free port of
    127.0.0.1, as the postgres user when run as root (PostgreSQL refuses root). Unless
    DURABLE (a benchmark's, which compares it with SQLite's durable commits), fsync is
    off: a test's database need not survive a crash of the machine."""

    def __init__(self, *, durable: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.port = free_port()
        self._names = itertools.count()
        as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            # setpriv execs: the server is our child, and our signals reach it.
            as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                       "--init-groups", "--"]
        data = self.dir / "data"
        subprocess.run([*as_user, POSTGRES_BIN / "initdb", "-D", data, "-U", "postgres",
                        "--auth=trust", "--no-sync", "-E", "UTF8"], check=True,
                       capture_output=True)
        settings = ["max_connections=300", *([] if durable else ["fsync=off"])]
        with open(self.dir / "log", "wb") as log:
            self.process = subprocess.Popen(
                [*as_user, POSTGRES_BIN / "postgres", "-D", data, "-k", self.dir,
                 "-p", str(self.port), "-h", "127.0.0.1",
                 *(arg for setting in settings for arg in ("-c", setting))],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url("postgres")).close()
                break
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.dir / "log").read_text()) from None
                time.sleep(0.1)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # fast shutdown: open sessions are ended
        self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)
