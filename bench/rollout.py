"""Benchmark rollouts and telemetry at fleet scale: a real hub, a real Mosquitto, simulated devices.

Run from the repository root (about 3.5 minutes on 2 cores; --quick about 45 s):

    .venv/bin/python bench/rollout.py                      # 100, 1,000 and as many as one sim holds
    .venv/bin/python bench/rollout.py --quick              # smoke run: 50 and 200 devices
    .venv/bin/python bench/rollout.py --sizes 100,1000     # chosen sizes ("max" is the step-up)
    .venv/bin/python bench/rollout.py --sizes 20000 --sim-processes 2   # a sim of 2 processes
    .venv/bin/python bench/rollout.py --sizes 100000 --sim-processes 10 --brokers 6
    .venv/bin/python bench/rollout.py --sizes 10000 --sim-processes 2 --no-telemetry
    .venv/bin/python bench/rollout.py --sizes 10000 --sim-processes 2 --database postgresql

Everything runs on loopback in a temporary directory that is removed at the
end: a real Mosquitto (bench/harness.py), a real `edgefleet hub serve`
using it (`--mqtt-url`, bench/harness.py), the tiny ONNX model
published as versions 1 and 2 with signed packages, and the devices as one
`edgefleet sim` (--sim-processes N: `edgefleet sim --processes N`, N child
processes with disjoint device ranges; --brokers N: the devices spread over N leaf
Mosquittos bridged to the hub's, as one Mosquitto here holds under 20,000 connections,
the machine's open-file limit; --database postgresql: the hub on a private
PostgreSQL server the bench starts, with fsync on, its processes sampled as
"postgresql", whose RSS sums every backend's and so counts the shared buffers
once per backend) (agent/sim/: real MQTT sessions, real desired-state
checks, reported states and telemetry; simulated downloads and model loads,
each update state taking --step-latency 0.01 s +-50 %, so that the times are
the system's, not the devices'). Each fleet size gets a fresh hub, broker
and simulator. The tables go to stdout, progress to stderr.

This script enrolls the devices itself (POST /api/v1/enroll on one
keep-alive connection, ~400 devices/s) and writes the identity files the
simulator loads. The simulator could enroll them, but `agent.identity.enroll`
makes a new httpx client, and so a new SSL context, for every device: half
of the simulator's time while enrolling (py-spy), ~18 devices/s, 9 minutes
for 10,000.

What is measured, and how to read it:

* rollout time, per fleet size (first table). The devices connect ("connect"
  is the simulator's start, identities loaded, until every device holds an
  MQTT session), a rollout takes all of them to version 1, and then the timed
  rollout (POST /api/v1/rollouts, one wave at 100 %) takes them to version 2.
  The clock starts when the POST is sent; GET /api/v1/rollouts/{id} and GET
  /api/v1/fleet/status are polled every 0.2 s, and the simulator prints its
  counters every 0.2 s (0.5 s above 1,000 devices). The headline is POST ->
  the rollout API showing every device `serving`; target: 1,000 devices in
  under 10 s, i.e. 100 devices/s, which the other sizes are held against.
  The indented rows put the milestones on the same clock: the wave assigned
  (the hub's own `assigned_at`), every desired state signed and published
  (the publisher's counter), every device holding it and serving version 2
  (the simulator's counters), the hub showing that (the rollout API), and
  the rollout `completed`; then the reported states the hub ingested per
  device, and the longest gap between the simulator's status lines: far over
  its period means its event loop was saturated, so the devices, not the
  hub, set the pace.
* "max" steps the fleet up (2,000, 5,000, 10,000 devices) on one hub and
  broker, restarting the simulator with more devices each time, until
  connecting every device takes over 60 s or fails; the rollouts and the
  telemetry runs use the largest fleet that connected. Its row says how far
  the step-up went and what stopped it.
* telemetry (second table), on the largest fleet. Each device measures every
  interval: one system point and one inference point per serving version,
  2 points a message. "realistic" is the whole fleet every 10 s for 20 s.
  It offers only devices x 2 / 10 points/s (2,000 for 10,000 devices), far
  under the 20,000 points/s target, so "overload" restarts the simulator with
  2,000 devices (or the fleet, if smaller) measuring often enough to offer
  4,000 messages/s, 8,000 points/s, for 15 s. Each run starts and ends by
  freezing the simulator (SIGSTOP) and waiting until the hub stores nothing
  more: what it stored after the freeze is its backlog (in Mosquitto's queue
  and the hub's inbox), an exact count where subtracting the live counters
  of two processes is off by what moved between the two reads. Points/s is
  the hub's own counter (GET /api/v1/fleet/status) over the run; the
  simulator's count of messages the broker acknowledged is beside the hub's
  count of messages stored; the hub "kept up" when its backlog grew by at
  most 2 % of the messages offered, or by at most 100 (Mosquitto's in-flight
  window to the hub: in transit, not behind). "ceiling" measures the hub
  alone: it is paused (SIGSTOP) for 15 s while the overload goes on, so a
  backlog of ~50,000 messages builds up in Mosquitto; then the simulator is
  frozen, the hub resumed, and the rate is points stored / time until its
  counters stop moving. Target: 20,000 points/s (issue 20; it was 5,000).
  The last row checks the hub's counter against the rows of its SQLite
  `telemetry` table, opened read-only.
* processes: peak RSS, mean CPU and the busiest 1 s of CPU (psutil, every
  0.1 s; 100 % is one core; the simulator's --processes count together) of
  the hub, the simulator and Mosquitto over each
  timed rollout and each telemetry run. The hub's baseline is its RSS after
  start-up and the two publishes.

Hub, Mosquitto and the simulator share the machine's CPUs, as does anything
else running on it: the caption gives the load average before the run.

Where the time goes, measured on the 2-core build machine over five default
and partial runs (ranges are run to run; the profiles are py-spy --gil, which
samples the thread holding the GIL, and py-spy --idle on the hub's ingest
thread):

* 1,000 devices: 2.3-2.4 s (target 10 s). The publisher thread signs and
  publishes the 1,000 desired states by 0.4-0.9 s (batches of 500: sign
  each, put the batch in flight, wait for every PUBACK; hub/desired.py; since
  measured, the next batch is signed while one waits, see bench/README.md). By
  0.8-1.4 s Mosquitto has handed every device its state and the simulator
  has checked the signatures; by 1.6-2.1 s every device serves version 2.
  The update itself is 5 states x 0.01 s per device; the rest is the
  simulator's one event loop building and publishing 6 reported states per
  device (6,000 in all) while the hub ingests them, on the same 2 cores (hub
  and simulator each 50-75 % CPU). The last 0.2-0.8 s is the rollout engine,
  which copies reports into the rollout once a second (hub/rollout_engine.py,
  interval 1.0 s): the hub shows a device serving up to a second after its
  report. With 100 devices that tick is the whole rollout: 1.0-1.1 s, though
  every device served within 0.4 s.
* 10,000 devices: 23-30 s, 340-430 devices/s, 3.4-4.3x the target's rate
  (40 s when other work loaded the machine). The publisher needs 7.5-10 s
  for the 10,000 states (~1,000-1,300/s: it shares the GIL with the ingest of
  ~50,000 reported states and the engine's ticks). The simulator sets the
  pace: its status lines, due every 0.5 s, came 7-8 s apart, and it held the
  GIL in 80 % of the samples, half of them building and sending reported
  states (contract.protocol.build_reported re-parses every payload it builds:
  14 %) and 9 % building telemetry; its devices held their states after
  9-14 s and all served after 21-27 s. The hub held the GIL in 59 % of the
  samples: ingest 49 % (parsing reported states 17 %), its MQTT network
  thread 20 %, the rollout engine's ticks 20 % (7 % of it `_seconds_since`
  in hub/rollouts.py `_refresh_devices`: a strptime of `assigned_at` for
  every device still updating, every tick), the publisher 9 %. It showed
  every device serving 0.2-3 s after the simulator had them all serving.
  Connecting is no limit: 10,000 devices connect in 7-15 s.
* Telemetry: the realistic 10,000-device fleet (2,000 points/s) takes ~20 %
  of a core of the hub. In the overload run the hub keeps up with all one
  simulator offers on the shared cores (3,750-3,850 messages/s, 7,500-7,700
  points/s). The ceiling is 8,100-10,900 points/s (4,000-5,400 messages/s,
  lower when other work loads the machine), with the hub at 96-98 % of one
  core: its single ingest thread (hub/ingest.py, `Ingest._run` ->
  `write_batch`) is the bottleneck, busy ~96 % of the drain: parsing with
  contract.protocol's strict reader 25 %, `hub.telemetry.ingest` 26 % (per
  message a savepoint, an executemany of 2 rows and json.dumps of each
  point's values), the commit 12 %, the `last_seen` updates 8 %,
  `format_time` 4 %. The cost is per message, not per point: with 2-point
  messages the point rate is twice the message rate, and
  docs/architecture.md measured ~20,000 points/s with 50-point messages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from subprocess import PIPE, Popen
from typing import Any, Self

import httpx
import psutil
import psycopg
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
# Ahead of this directory, whose agent.py would shadow the agent package.
sys.path.insert(0, str(ROOT))
from agent.identity import IDENTITY_FILE, Identity  # noqa: E402
from contract import signing  # noqa: E402
from harness import (  # noqa: E402
    EDGEFLEET,
    HubProcess,
    Mosquitto,
    PostgresServer,
    publish_version,
    start_hub,
    start_mosquitto,
    stop_process,
)
from packager.samples import make_onnx  # noqa: E402
from report import Row, print_table  # noqa: E402

MB = 1_000_000
MODEL = "tiny"
PLATFORM = "linux/arm64"
MAX_STEPS = (2000, 5000, 10000)
STEP_LATENCY_S = 0.01
TELEMETRY_INTERVAL_S = 10.0
# The overload run: this many devices (or the whole fleet, if smaller), measuring
# often enough to offer this many messages a second between them.
OVERLOAD_DEVICES = 2000
OVERLOAD_MESSAGES = 4000
# Simulated scoring requests per measurement: enough that every measurement
# has an inference point, at any interval.
REQUESTS_PER_MEASUREMENT = 10
ROLLOUT_TARGET_DEVICES = 1000
ROLLOUT_TARGET_S = 10.0
INGEST_TARGET = 20000.0         # points/s
CONNECT_LIMIT_S = 60.0
ROLLOUT_LIMIT_S = 240.0        # or 10 ms a device, if more (rollout_limit)
KEPT_UP_SHARE = 0.02            # backlog growth allowed, as a share of the messages offered,
KEPT_UP_SLACK = 100             # or this many: Mosquitto's in-flight window to the hub
POLL_S = 0.2
DRAIN_QUIET_S = 1.0             # no new messages stored for this long: the backlog is gone
DRAIN_LIMIT_S = 120.0
SAMPLE_EVERY_S = 0.1
ENROLL_THREADS = 4

console = Console(stderr=True)


def meets(ok: bool) -> str:
    return "ok" if ok else "MISSES"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


# ---- process usage -------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float
    pid: int
    rss: int
    cpu: float  # user + system seconds so far


@dataclass(frozen=True)
class Usage:
    peak_rss: int
    mean_cpu: float   # percent of one core over the phase
    peak_cpu: float   # percent of one core in the busiest second

    def text(self) -> str:
        return f"{self.peak_rss / MB:.0f} MB / {self.mean_cpu:.0f} % / {self.peak_cpu:.0f} %"


class Sampler:
    """RSS and CPU time of named processes (the simulator with its children: its
    --processes) every SAMPLE_EVERY_S, in a thread. A name may move to a new process
    (the simulator is restarted per fleet size)."""

    def __init__(self) -> None:
        self._processes: dict[str, list[psutil.Process]] = {}
        self._samples: dict[str, list[Sample]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, *pids: int) -> None:
        """NAME is PIDS together (the leaf brokers of --brokers), summed."""
        with self._lock:
            self._processes[name] = [psutil.Process(pid) for pid in pids]
            self._samples.setdefault(name, [])

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            with self._lock:
                watched = list(self._processes.items())
            for name, processes in watched:
                try:
                    rss, cpu = 0, 0.0
                    # Listing children reads every process's /proc entry: only the
                    # simulator (--processes) and PostgreSQL (a backend per connection)
                    # have any.
                    for member in (family(processes[0]) if name in ("sim", "postgresql")
                                   else processes):
                        with member.oneshot():
                            times = member.cpu_times()
                            rss += member.memory_info().rss
                            cpu += times.user + times.system
                    sample = Sample(time.monotonic(), processes[0].pid, rss, cpu)
                except psutil.NoSuchProcess:
                    continue
                with self._lock:
                    self._samples[name].append(sample)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def usage(self, name: str, start: float, end: float) -> Usage | None:
        with self._lock:
            samples = [s for s in self._samples.get(name, []) if start <= s.at <= end]
        if len(samples) < 2:
            return None
        busy, peak, j = 0.0, 0.0, 0
        for i, sample in enumerate(samples):
            if i and samples[i - 1].pid == sample.pid:
                busy += sample.cpu - samples[i - 1].cpu
            j = max(j, i)
            while j < len(samples) - 1 and samples[j].at - sample.at < 1.0:
                j += 1
            later = samples[j]
            if later.pid == sample.pid and later.at - sample.at >= 0.9:
                peak = max(peak, (later.cpu - sample.cpu) / (later.at - sample.at))
        return Usage(max(s.rss for s in samples), 100 * busy / (end - start), 100 * peak)


def family(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def usage_rows(sampler: Sampler, start: float, end: float, hub_idle_rss: int) -> list[Row]:
    rows = []
    for name in ("hub", "sim", "mosquitto", "leaf brokers", "postgresql"):
        usage = sampler.usage(name, start, end)
        if usage is not None:
            baseline = f"idle {hub_idle_rss / MB:.0f} MB" if name == "hub" else ""
            rows.append(Row(f"  {name}: peak RSS / mean CPU / busiest 1 s", usage.text(),
                            baseline))
    return rows


# ---- the simulator -----------------------------------------------------------


class SimFailed(Exception):
    """The simulator exited, or did not get there in time."""


class Simulator:
    """An `edgefleet sim` process and the JSON status lines it prints, stamped on arrival."""

    def __init__(self, devices: int, process: Popen[str], log_path: Path) -> None:
        self.devices = devices
        self.process = process
        self.log_path = log_path
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            status = json.loads(line)
            with self._arrived:
                self.lines.append((time.monotonic(), status))
                self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def latest(self) -> dict[str, Any]:
        with self._arrived:
            return self.lines[-1][1]

    def next_line(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """The first status line that arrives from now on."""
        with self._arrived:
            seen = len(self.lines)
            if not self._arrived.wait_for(
                    lambda: len(self.lines) > seen or self.process.poll() is not None, timeout):
                raise SimFailed(f"no status line from the simulator in {timeout:.0f} s")
            if len(self.lines) == seen:
                raise SimFailed(f"the simulator exited with {self.process.returncode}:\n"
                                f"{self.log_tail()}")
            return self.lines[seen]

    def first(self, predicate: Callable[[dict[str, Any]], bool], since: float,
              timeout: float) -> float:
        """When the first status line after SINCE that meets PREDICATE arrived."""
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            with self._arrived:
                lines = self.lines[index:]
                index += len(lines)
            for at, status in lines:
                if at >= since and predicate(status):
                    return at
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimFailed(f"the simulator did not get there in {timeout:.0f} s; "
                                f"now {self.latest()}")
            self.next_line(left)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        stop_process(self.process, timeout=120)
        self._reader.join(10)


# ---- one hub, one broker, one simulated fleet ---------------------------------------


def fleet_tag(size: int) -> str:
    return f"fleet-{size}"


def status_every(devices: int) -> float:
    """How often the simulator prints its counters: computing them costs with many devices."""
    return 0.2 if devices <= 1000 else 0.5


def parse_stamp(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


@dataclass
class Stack:
    root: Path
    broker: Mosquitto
    leaves: list[Mosquitto]  # --brokers: the devices connect to these, bridged to BROKER
    hub: HubProcess
    client: httpx.Client
    sampler: Sampler
    versions: tuple[int, int]
    hub_idle_rss: int
    database_url: str | None  # the hub's PostgreSQL database; None: SQLite in its data dir
    enrolled: int = 0
    sim: Simulator | None = None
    sim_processes: int = 1
    connect_limit: float = CONNECT_LIMIT_S

    @property
    def sim_dir(self) -> Path:
        return self.root / "sim"

    def get(self, path: str, **params: Any) -> Any:
        answer = self.client.get(path, params=params)
        answer.raise_for_status()
        return answer.json()

    def fleet_status(self) -> dict[str, Any]:
        return dict(self.get("/api/v1/fleet/status"))

    def enroll(self, upto: int, sizes: Sequence[int]) -> None:
        """Enroll devices up to number UPTO, each tagged fleet-S=yes for every S in SIZES
        that includes it, so that a rollout can target any one of those fleets."""
        tags = {fleet_tag(s): "yes" for s in sizes if s >= upto}
        answer = self.client.post("/api/v1/enrollment-tokens", json={"tags": tags})
        answer.raise_for_status()
        token = answer.json()["token"]
        names = [f"sim-{i:05d}" for i in range(self.enrolled, upto)]
        with ThreadPoolExecutor(ENROLL_THREADS) as pool:
            list(pool.map(lambda name: self._enroll_one(token, name), names))
        self.enrolled = upto

    def _enroll_one(self, token: str, name: str) -> None:
        public_key = signing.public_key_pem(signing.generate_private_key())
        answer = self.client.post("/api/v1/enroll", json={
            "token": token, "public_key": public_key, "name": name, "platform": PLATFORM})
        answer.raise_for_status()
        body = answer.json()
        identity = Identity(
            device_id=body["device"]["id"], name=name, hub_url=self.hub.url,
            device_token=body["device_token"], mqtt_url=body["mqtt"]["url"],
            mqtt_username=body["mqtt"]["username"], mqtt_password=body["mqtt"]["password"],
            hub_public_key=body["hub_public_key"])
        directory = self.sim_dir / "devices" / name
        directory.mkdir(parents=True)
        # Plain writes: agent.files fsyncs every file, 20,000 fsyncs for 10,000 devices.
        path = directory / IDENTITY_FILE
        path.write_text(json.dumps(asdict(identity)))
        path.chmod(0o600)

    def start_sim(self, devices: int, interval: float) -> float:
        """(Re)start the simulator with DEVICES devices; returns the seconds until every
        one was connected (SimFailed if that takes over its connect limit)."""
        self.stop_sim()
        log_path = self.root / f"sim-{devices}.log"
        with open(log_path, "ab") as log:
            process = Popen(
                [*EDGEFLEET, "sim", "--devices", str(devices), "--data-dir", str(self.sim_dir),
                 *(arg for broker in self.leaves or [self.broker]
                   for arg in ("--mqtt-url", broker.url)),
                 "--step-latency", str(STEP_LATENCY_S),
                 "--telemetry-interval", str(interval),
                 "--rps", str(REQUESTS_PER_MEASUREMENT / interval),
                 "--json-status-every", str(status_every(devices)),
                 "--processes", str(self.sim_processes)],
                stdout=PIPE, stderr=log, text=True)
        started = time.monotonic()
        self.sim = Simulator(devices, process, log_path)
        self.sampler.watch("sim", process.pid)
        # The first status line comes once every device is connected.
        at, _ = self.sim.next_line(self.connect_limit)
        return at - started

    def stop_sim(self) -> None:
        if self.sim is not None:
            self.sim.stop()
            self.sim = None


@contextmanager
def hub_database(database: str, sampler: Sampler) -> Iterator[str | None]:
    """The hub's database URL for DATABASE: None for SQLite in its data dir, or a new
    database on a private PostgreSQL server (durable, as SQLite's commits are), sampled
    meanwhile."""
    if database == "sqlite":
        yield None
        return
    server = PostgresServer(durable=True)
    try:
        sampler.watch("postgresql", server.process.pid)
        yield server.new_database()
    finally:
        server.stop()


@contextmanager
def open_stack(root: Path, sampler: Sampler, brokers: int, database: str) -> Iterator[Stack]:
    with ExitStack() as cleanup:  # stopped in reverse: simulator, hub, database, brokers
        broker = start_mosquitto(root / "mosquitto")
        cleanup.callback(broker.stop)
        leaves: list[Mosquitto] = []
        for i in range(brokers if brokers > 1 else 0):
            leaves.append(start_mosquitto(root / f"leaf-{i}", bridge_to=broker.port))
            cleanup.callback(leaves[-1].stop)
        if leaves:
            sampler.watch("leaf brokers", *(leaf.process.pid for leaf in leaves
                                            if leaf.process is not None))
        database_url = cleanup.enter_context(hub_database(database, sampler))
        database_args = ("--database-url", database_url) if database_url else ()
        hub = start_hub(root / "hub", extra_args=("--mqtt-url", broker.url, *database_args),
                        tls=False)  # bench/tls.py measures TLS
        cleanup.callback(hub.stop)
        model = make_onnx(root / "model" / "model.onnx")
        versions = (publish_version(hub, MODEL, model), publish_version(hub, MODEL, model))
        assert broker.process is not None
        sampler.watch("hub", hub.process.pid)
        sampler.watch("mosquitto", broker.process.pid)
        client = httpx.Client(base_url=hub.url, timeout=60,
                              headers={"Authorization": f"Bearer {hub.admin_token}"},
                              limits=httpx.Limits(max_connections=ENROLL_THREADS + 1))
        cleanup.callback(client.close)
        idle = psutil.Process(hub.process.pid).memory_info().rss
        stack = Stack(root, broker, leaves, hub, client, sampler, versions, idle, database_url)
        cleanup.callback(stack.stop_sim)
        yield stack


# ---- rollouts --------------------------------------------------------------------


def rollout_limit(devices: int) -> float:
    return max(ROLLOUT_LIMIT_S, devices / 100)


@dataclass
class RolloutRun:
    """Seconds from sending the POST to each milestone."""

    devices: int
    posted: float
    assigned: float
    published: float | None  # None: the publisher's counter never grew by a whole fleet
    received: float
    sim_serving: float
    hub_serving: float
    completed: float
    sim_stall: float         # longest gap between the simulator's status lines
    reports: int             # reported states the hub ingested meanwhile
    usage: list[Row]


@dataclass
class Progress:
    """What polling the hub saw, in seconds after the POST."""

    published: float | None = None
    hub_serving: float | None = None
    completed: float | None = None


def follow(stack: Stack, rollout_id: str, devices: int, start: float,
           published_before: int) -> Progress:
    """Poll the rollout and the publisher's counter until the rollout has completed."""
    seen = Progress()
    while seen.completed is None:
        time.sleep(POLL_S)
        published = stack.fleet_status()["desired"]["published"] - published_before
        shown = stack.get(f"/api/v1/rollouts/{rollout_id}")
        now = time.monotonic() - start
        if seen.published is None and published >= devices:
            seen.published = now
        if seen.hub_serving is None and devices == sum(
                wave.get("serving", 0) for wave in shown["waves_progress"]):
            seen.hub_serving = now
        if shown["state"] == "completed":
            seen.completed = now
        # "created" until the engine's first tick, which a loaded machine may delay.
        elif shown["state"] not in ("created", "running") or now > rollout_limit(devices):
            raise RuntimeError(f"rollout {rollout_id} is {shown['state']} after {now:.0f} s: "
                               f"{shown['reason']}; {shown['waves_progress']}")
    return seen


def longest_gap(sim: Simulator, start: float, end: float) -> float:
    stamps = [start] + [at for at, _ in sim.lines if start < at <= end] + [end]
    return max(b - a for a, b in pairwise(stamps))


def run_rollout(stack: Stack, version: int, devices: int) -> RolloutRun:
    """Roll VERSION out to the fleet of DEVICES devices in one wave; wait until completed."""
    sim = stack.sim
    assert sim is not None
    key = f"{MODEL}:{version}"
    before, received_before = stack.fleet_status(), sim.latest()["received"]
    wall, start = time.time(), time.monotonic()
    answer = stack.client.post("/api/v1/rollouts", json={
        "model": MODEL, "version": version, "target": {fleet_tag(devices): "yes"},
        "waves": "100%"})
    answer.raise_for_status()
    posted = time.monotonic() - start
    rollout_id = answer.json()["id"]
    seen = follow(stack, rollout_id, devices, start, before["desired"]["published"])
    end = time.monotonic()
    assert seen.hub_serving is not None and seen.completed is not None
    received = sim.first(lambda s: s["received"] - received_before >= devices, start, 30)
    serving = sim.first(lambda s: s["serving"].get(key, 0) == devices, start, 30)
    detail = stack.get(f"/api/v1/rollouts/{rollout_id}", devices=True)
    assigned = max(parse_stamp(d["assigned_at"]) for d in detail["devices"]) - wall
    reports = (stack.fleet_status()["ingest"]["ingested"].get("reported", 0)
               - before["ingest"]["ingested"].get("reported", 0))
    return RolloutRun(devices, posted, assigned, seen.published, received - start,
                      serving - start, seen.hub_serving, seen.completed,
                      longest_gap(sim, start, end), reports,
                      usage_rows(stack.sampler, start, end, stack.hub_idle_rss))


def rollout_rows(run: RolloutRun, connect_s: float) -> list[Row]:
    n, total = run.devices, run.hub_serving
    rate = n / total
    target_rate = ROLLOUT_TARGET_DEVICES / ROLLOUT_TARGET_S
    if n == ROLLOUT_TARGET_DEVICES:
        verdict = f"target < {ROLLOUT_TARGET_S:.0f} s: {meets(total < ROLLOUT_TARGET_S)}"
    else:
        verdict = f"{rate / target_rate:.2f}x the target's rate"
    milestones = [
        ("POST answered", run.posted),
        ("wave assigned (hub's assigned_at)", run.assigned),
        ("every desired state published (hub)", run.published),
        ("every device holds it (simulator)", run.received),
        ("every device serving v2 (simulator)", run.sim_serving),
        ("hub shows every device serving", run.hub_serving),
        ("rollout completed", run.completed),
    ]
    rows = [
        Row(f"{n:,} devices: connect (sim start -> all online)", seconds(connect_s),
            verdict=f"{n / connect_s:.0f} devices/s"),
        Row(f"{n:,} devices: POST -> every device serving v2", seconds(total),
            f"{ROLLOUT_TARGET_DEVICES:,} in {ROLLOUT_TARGET_S:.0f} s",
            f"{rate:.0f} devices/s; {verdict}"),
    ]
    rows += [Row(f"  {label}", seconds(at)) for label, at in milestones]
    rows += [
        Row("  reported states ingested per device", f"{run.reports / n:.1f}"),
        Row("  simulator: longest gap between status lines", seconds(run.sim_stall),
            f"one every {status_every(n):g} s", "its event loop was busy" if
            run.sim_stall > 4 * status_every(n) else ""),
    ]
    return rows + run.usage


# ---- telemetry -------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """The hub's ingest counters (GET /api/v1/fleet/status)."""

    stored: int      # messages written or dropped
    points: int      # telemetry points stored
    batches: int     # telemetry messages stored

    @classmethod
    def of(cls, stack: Stack) -> Counts:
        ingest = stack.fleet_status()["ingest"]
        dropped = sum(sum(reasons.values()) for reasons in ingest["dropped"].values())
        return cls(sum(ingest["ingested"].values()) + dropped, ingest["telemetry_points"],
                   ingest["ingested"].get("telemetry", 0))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.stored - other.stored, self.points - other.points,
                      self.batches - other.batches)


@dataclass(frozen=True)
class Drained:
    frozen: Counts    # the hub's counts when the simulator was frozen
    counts: Counts    # once the hub stored nothing more for DRAIN_QUIET_S
    seconds: float    # from the start of the wait to the last message stored

    @property
    def backlog(self) -> int:
        """Messages the simulator had sent that the hub had not stored yet."""
        return self.counts.stored - self.frozen.stored


def wait_drained(stack: Stack, frozen: Counts) -> Drained:
    """Poll the hub's counters until they stop moving (the simulator must be frozen)."""
    start = time.monotonic()
    last, changed = frozen, start
    while time.monotonic() - changed < DRAIN_QUIET_S:
        if time.monotonic() - start > DRAIN_LIMIT_S:
            raise RuntimeError(f"the hub was still storing after {DRAIN_LIMIT_S:.0f} s")
        time.sleep(POLL_S / 2)
        counts = Counts.of(stack)
        if counts != last:
            last, changed = counts, time.monotonic()
    return Drained(frozen, last, changed - start)


def freeze(stack: Stack) -> Drained:
    """Freeze the simulator (SIGSTOP) and wait for the hub to store what it had sent: an
    exact count of how far behind the hub is, where comparing live counters of two
    processes is off by whatever moved between the two reads."""
    assert stack.sim is not None
    for process in family(psutil.Process(stack.sim.process.pid)):
        process.suspend()
    return wait_drained(stack, Counts.of(stack))


def thaw(stack: Stack) -> float:
    assert stack.sim is not None
    for process in family(psutil.Process(stack.sim.process.pid)):
        process.resume()
    return time.monotonic()


@dataclass
class IngestRun:
    label: str
    devices: int
    interval: float
    seconds: float      # the simulator ran this long between two freezes
    stored: Counts      # what the hub stored meanwhile, up to the second freeze
    before: Drained     # the backlog at the start ...
    after: Drained      # ... and at the end
    sent_per_s: float   # messages acknowledged to the simulator, from its own counter
    usage: list[Row]

    @property
    def points_per_s(self) -> float:
        return self.stored.points / self.seconds

    @property
    def points_per_message(self) -> float:
        return self.stored.points / max(1, self.stored.batches)

    @property
    def growth(self) -> int:
        return self.after.backlog - self.before.backlog

    @property
    def offered_points_per_s(self) -> float:
        return self.points_per_s + self.growth * self.points_per_message / self.seconds

    @property
    def kept_up(self) -> bool:
        return self.growth <= max(KEPT_UP_SHARE * (self.stored.stored + self.growth),
                                  KEPT_UP_SLACK)


def sent_per_s(sim: Simulator, start: float, end: float) -> float:
    lines = [(at, status["sent"]) for at, status in sim.lines if start <= at <= end]
    if len(lines) < 2:
        return math.nan
    (t0, sent0), (t1, sent1) = lines[0], lines[-1]
    return (sent1 - sent0) / (t1 - t0)


def measure_ingest(stack: Stack, label: str, interval: float, duration: float) -> IngestRun:
    """Freeze, let the simulator send for DURATION seconds, freeze again; the simulator
    is left frozen."""
    assert stack.sim is not None
    before = freeze(stack)
    resumed = thaw(stack)
    time.sleep(duration)
    frozen_at = time.monotonic()
    after = freeze(stack)
    return IngestRun(label, stack.sim.devices, interval, frozen_at - resumed,
                     after.frozen - before.counts, before, after,
                     sent_per_s(stack.sim, resumed, frozen_at),
                     usage_rows(stack.sampler, resumed, frozen_at, stack.hub_idle_rss))


def ingest_rows(run: IngestRun) -> list[Row]:
    nominal = run.devices * run.points_per_message / run.interval
    return [
        Row(f"{run.label}: {run.devices:,} devices every {run.interval:g} s, {run.seconds:.0f} s",
            f"{run.points_per_s:,.0f} points/s", f"fleet offers {nominal:,.0f}",
            "kept up" if run.kept_up else "FELL BEHIND"),
        Row("  messages acknowledged to the sim / stored by the hub",
            f"{run.sent_per_s:,.0f} / {run.stored.stored / run.seconds:,.0f} per s",
            f"{run.points_per_message:.1f} points a message"),
        Row("  backlog when frozen: at the start -> at the end",
            f"{run.before.backlog:,} -> {run.after.backlog:,} messages",
            f"{run.growth * run.points_per_message / run.seconds:+,.0f} points/s",
            f"allowed: {KEPT_UP_SHARE:.0%} of offered, at least {KEPT_UP_SLACK}"),
    ] + run.usage


@dataclass
class DrainRun:
    paused: float
    drained: Drained
    usage: list[Row]

    @property
    def points_per_s(self) -> float:
        return (self.drained.counts.points - self.drained.frozen.points) / self.drained.seconds


def measure_drain(stack: Stack, pause: float) -> DrainRun:
    """Pause the hub (SIGSTOP) for PAUSE seconds while the simulator sends on, so that a
    backlog builds up in Mosquitto; then freeze the simulator, resume the hub, and time
    how fast the hub stores the backlog, with the CPUs to itself and Mosquitto."""
    assert stack.sim is not None
    hub = psutil.Process(stack.hub.process.pid)
    before = Counts.of(stack)
    thaw(stack)
    hub.suspend()
    try:
        time.sleep(pause)
        for process in family(psutil.Process(stack.sim.process.pid)):
            process.suspend()
    finally:
        hub.resume()
    resumed = time.monotonic()
    drained = wait_drained(stack, before)
    return DrainRun(pause, drained, usage_rows(stack.sampler, resumed,
                                               resumed + drained.seconds, stack.hub_idle_rss))


def drain_rows(run: DrainRun) -> list[Row]:
    rate = run.points_per_s
    messages = run.drained.backlog
    return [
        Row(f"ceiling: hub drains a {run.paused:.0f} s backlog ({messages:,} messages)",
            f"{rate:,.0f} points/s",
            f"{messages / run.drained.seconds:,.0f} messages/s in {run.drained.seconds:.1f} s",
            f"target >= {INGEST_TARGET:,.0f}: {meets(rate >= INGEST_TARGET)}"),
    ] + run.usage


def stored_rows(stack: Stack) -> list[Row]:
    """The hub's counter against its table, read-only; the hub must have caught up."""
    count = "SELECT COUNT(*) FROM telemetry"
    if stack.database_url is not None:
        with psycopg.connect(stack.database_url) as conn:
            rows = conn.execute(count).fetchone()[0]  # type: ignore[index]
        where = "the PostgreSQL database"
    else:
        db = sqlite3.connect(f"file:{stack.hub.data_dir / 'hub.db'}?mode=ro", uri=True)
        try:
            rows = db.execute(count).fetchone()[0]
        finally:
            db.close()
        where = "hub.db (read-only)"
    counted = stack.fleet_status()["ingest"]["telemetry_points"]
    return [Row(f"telemetry rows in {where} / hub's counter", f"{rows:,}",
                f"{counted:,}", "equal" if rows == counted else "DIFFER")]


# ---- stages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    realistic: float   # seconds measured at the 10 s interval
    overload: float    # seconds measured with the short interval
    pause: float       # seconds the hub is paused before it drains the backlog


@dataclass
class Stage:
    sizes: list[int]                          # fleet sizes tried, in order
    connects: dict[int, float] = field(default_factory=dict)
    stopped_by: str = ""                      # why the step-up ended, if it did early
    rollouts: list[tuple[RolloutRun, float]] = field(default_factory=list)
    ingest: list[IngestRun] = field(default_factory=list)
    drain: DrainRun | None = None
    stored: list[Row] = field(default_factory=list)
    failed: str = ""                          # what ended the stage before its end

    @property
    def largest(self) -> int | None:
        return max(self.connects, default=None)


def step_up(stack: Stack, stage: Stage) -> int | None:
    """Connect ever larger fleets; the largest that connected is left running."""
    for size in stage.sizes:
        console.log(f"enrolling up to {size:,} devices, connecting them")
        stack.enroll(size, stage.sizes)
        try:
            stage.connects[size] = stack.start_sim(size, TELEMETRY_INTERVAL_S)
        except SimFailed as failed:
            stage.stopped_by = f"{size:,} devices: {str(failed).splitlines()[0]}"
            if stack.sim is not None:
                console.log(f"[red]{size:,} devices did not connect: {failed}; the "
                            f"simulator's log ends:\n{stack.sim.log_tail()}")
            stack.stop_sim()
            break
    largest = stage.largest
    if largest is not None and (stack.sim is None or stack.sim.devices != largest):
        stack.start_sim(largest, TELEMETRY_INTERVAL_S)
    return largest


def measure_telemetry(stack: Stack, stage: Stage, size: int, windows: Windows) -> None:
    console.log(f"telemetry every {TELEMETRY_INTERVAL_S:g} s for {windows.realistic:.0f} s")
    stage.ingest.append(measure_ingest(stack, "realistic", TELEMETRY_INTERVAL_S,
                                       windows.realistic))
    devices = min(size, OVERLOAD_DEVICES)
    interval = devices / OVERLOAD_MESSAGES
    console.log(f"overload: {devices:,} devices every {interval:g} s for {windows.overload:.0f} s")
    stack.start_sim(devices, interval)
    stage.ingest.append(measure_ingest(stack, "overload", interval, windows.overload))
    console.log(f"ceiling: hub paused {windows.pause:.0f} s, then draining the backlog")
    stage.drain = measure_drain(stack, windows.pause)
    stack.stop_sim()  # its devices send what they measured since the freeze
    wait_drained(stack, Counts.of(stack))
    stage.stored = stored_rows(stack)


def run_stage(root: Path, sampler: Sampler, stage: Stage, windows: Windows | None,
              sim_processes: int, brokers: int, connect_limit: float, database: str) -> None:
    """Connect, roll out twice, and with WINDOWS measure telemetry too. A failure ends
    the stage, not the run: the other stages' numbers are still worth printing."""
    with open_stack(root, sampler, brokers, database) as stack:
        stack.sim_processes, stack.connect_limit = sim_processes, connect_limit
        try:
            size = step_up(stack, stage)
            if size is None:  # a fleet of one size only says why in the summary
                stage.failed = stage.stopped_by
                return
            v1, v2 = stack.versions
            console.log(f"{size:,} devices: rollout to v{v1}, then the timed one to v{v2}")
            run_rollout(stack, v1, size)
            stage.rollouts.append((run_rollout(stack, v2, size), stage.connects[size]))
            if windows is not None:
                measure_telemetry(stack, stage, size, windows)
        except (SimFailed, RuntimeError, httpx.HTTPError) as exc:
            stage.failed = str(exc).splitlines()[0]
            console.log(f"[red]stage {stage.sizes} failed: {exc}")


# ---- output ----------------------------------------------------------------------


def reach_row(stage: Stage) -> Row:
    largest = stage.largest or 0
    why = stage.stopped_by or f"all steps connected; {MAX_STEPS[-1]:,} is this bench's cap"
    return Row("largest fleet one simulator held (step-up " + ", ".join(
        f"{s:,}" for s in stage.sizes) + ")", f"{largest:,} devices",
        f"{largest / MAX_STEPS[-1]:.0%} of {MAX_STEPS[-1]:,}", why)


def reach_rows(stage: Stage) -> list[Row]:
    """How far the step-up went, and each step's connect time."""
    return [reach_row(stage)] + [
        Row(f"  {size:,} devices: connect", seconds(took), f"limit {CONNECT_LIMIT_S:.0f} s",
            f"{size / took:.0f} devices/s") for size, took in stage.connects.items()]


def summary_rows(stages: list[Stage], sampler: Sampler) -> list[Row]:
    rows = []
    for stage in stages:
        if stage.failed:
            rows.append(Row(f"fleet of {', '.join(map(str, stage.sizes))}", "FAILED",
                            verdict=stage.failed[:100]))
        for run, _ in stage.rollouts:
            rate = run.devices / run.hub_serving
            verdict = (meets(run.hub_serving < ROLLOUT_TARGET_S)
                       if run.devices == ROLLOUT_TARGET_DEVICES else f"{rate:.0f} devices/s")
            rows.append(Row(f"rollout, {run.devices:,} devices: POST -> every device serving",
                            seconds(run.hub_serving),
                            f"{ROLLOUT_TARGET_DEVICES:,} in < {ROLLOUT_TARGET_S:.0f} s", verdict))
        if len(stage.sizes) > 1:
            rows.append(reach_row(stage))
        for ingest in stage.ingest:
            rows.append(Row(f"telemetry, {ingest.label} ({ingest.devices:,} devices every "
                            f"{ingest.interval:g} s)", f"{ingest.points_per_s:,.0f} points/s",
                            f"offered {ingest.offered_points_per_s:,.0f}",
                            "kept up" if ingest.kept_up else "FELL BEHIND"))
        if stage.drain is not None:
            rate = stage.drain.points_per_s
            rows.append(Row("telemetry, ceiling (draining a backlog)", f"{rate:,.0f} points/s",
                            f">= {INGEST_TARGET:,.0f}", meets(rate >= INGEST_TARGET)))
    hub = sampler.usage("hub", 0.0, time.monotonic())
    if hub is not None:
        rows.append(Row("hub, whole run: peak RSS / busiest 1 s of CPU",
                        f"{hub.peak_rss / MB:.0f} MB / {hub.peak_cpu:.0f} %"))
    return rows


def parse_sizes(text: str) -> tuple[list[int], bool]:
    """"100,1000,max" -> ([100, 1000], True)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    sizes = sorted(int(p) for p in parts if p != "max")
    if any(s < 1 for s in sizes) or not parts:
        raise ValueError(f"--sizes {text!r}: give device counts and/or max")
    return sizes, "max" in parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,max",
                        help="fleet sizes; max steps up " + ", ".join(map(str, MAX_STEPS))
                             + " (default 100,1000,max)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: sizes 50,200 and short telemetry windows")
    parser.add_argument("--sim-processes", type=int, default=1,
                        help="run the simulator as this many processes (edgefleet sim "
                             "--processes; default 1)")
    parser.add_argument("--brokers", type=int, default=1,
                        help="with N > 1, the devices connect to N leaf brokers bridged to "
                             "the hub's (one broker here holds under 20,000 connections, the "
                             "open-file limit; default 1: the hub's broker only)")
    parser.add_argument("--connect-limit", type=float, default=CONNECT_LIMIT_S,
                        help="seconds a fleet gets to connect before the stage stops "
                             f"(default {CONNECT_LIMIT_S:.0f})")
    parser.add_argument("--no-telemetry", action="store_true",
                        help="the rollouts only: no telemetry runs on the largest fleet")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the hub's database: SQLite in its data dir (default), or "
                             "PostgreSQL, a private server the bench starts (Debian's, as "
                             "the tests do) with fsync on")
    args = parser.parse_args()
    try:
        sizes, probe = parse_sizes("50,200" if args.quick else args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    windows = Windows(10.0, 6.0, 4.0) if args.quick else Windows(20.0, 15.0, 15.0)
    stages = [Stage([n]) for n in sizes]
    if probe:
        stages.append(Stage([s for s in MAX_STEPS if s > max(sizes, default=0)]))

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp, Sampler() as sampler:
        for i, stage in enumerate(stages):
            root = Path(tmp) / f"stage-{i}"
            root.mkdir()
            telemetry = stage is stages[-1] and not args.no_telemetry
            run_stage(root, sampler, stage, windows if telemetry else None,
                      args.sim_processes, args.brokers, args.connect_limit, args.database)
    rollout = [row for stage in stages for run, connect in stage.rollouts
               for row in rollout_rows(run, connect)]
    if probe:
        rollout += reach_rows(stages[-1])
    cpus = os.cpu_count()
    caption = (f"Hub ({args.database}), Mosquitto and simulator share the {cpus} CPUs; "
               f"100 % CPU is one core. Load average before the run: {load_before:.1f}.")
    print_table(rollout, f"edgefleet rollout bench: rollout time, step latency "
                         f"{STEP_LATENCY_S} s, {cpus} CPUs", caption)
    last = stages[-1]
    drain = drain_rows(last.drain) if last.drain is not None else []
    if not args.no_telemetry:
        print_table([row for run in last.ingest for row in ingest_rows(run)] + drain
                    + last.stored, "edgefleet rollout bench: telemetry ingestion", caption)
    print_table(summary_rows(stages, sampler), "edgefleet rollout bench: summary")


if __name__ == "__main__":
    main()
