"""Benchmark the device agent: idle memory, time from a deploy to the new version serving, scoring.

Run from the repository root (about 70 s on 2 cores; --quick about 30 s):

    .venv/bin/python bench/agent.py                    # 5000 requests per scoring run
    .venv/bin/python bench/agent.py --quick            # smoke run
    .venv/bin/python bench/agent.py --requests 20000   # steadier percentiles

Everything runs on loopback: a real `edgefleet hub serve` process with its
managed Mosquitto broker (bench/harness.py) and a real `edgefleet agent run`
process enrolled on it (bench/harness.py), in a temporary directory that is
removed at the end. The model is the tests' tiny ONNX model (input "x" FP32
[-1,3], one MatMul and an Add), published as versions 1 and 2 with signed
packages. The table goes to stdout, progress to stderr.

What is measured, and how to read it:

* idle RSS: of an agent started again after its first start enrolled it (as a
  device starts at every boot; the first start's figure is beside it), with
  the agent connected to the broker and
  nothing deployed, the bench waits 5 s and reads the resident memory of the
  agent process and of all its child processes (psutil): with nothing
  deployed the agent starts no serving process, so the daemon is all there
  is unless one runs. Target: all of them together at most 25 MB. The
  baseline is the 96 MB the AWS IoT Greengrass Java nucleus needs; the ratio
  is ours / 96 MB (below 1.0x: lighter). Beside it: the same processes'
  PSS (a shared library's pages split among every process that maps them:
  on this machine the hub and other Python processes share libpython and
  libcrypto, so PSS is far lower; on a device running no other Python it
  comes close to RSS, which is what the target is judged on), and the RSS
  of a second idle agent, enrolled on a hub with TLS (https, mqtts), as
  hubs run by default (measured first, on a hub of its own). The rows under
  the daemon say where its memory goes: a fresh interpreter imports what
  the daemon (`python -m agent`, which `edgefleet agent run` execs into)
  imports at start-up, one dependency at a time (each with what it imports
  that no row before did) and the agent's own modules last; each row is
  that step's RSS growth and its share of the daemon's RSS. "running" is
  the live daemon's RSS minus all the steps: modules imported later,
  threads, connections, buffers, less what the daemon hands back to the
  system once started (agent/heap.py). The same is read again after the
  deploy rounds, with a model served by the serving process the first
  deploy started: by then the daemon has also verified signatures
  (cryptography) and downloaded and unpacked packages (the registry client,
  the update machinery), which it loads at the first desired state, not
  before.
* first deploy -> serving: version 1 deployed to the idle agent, which
  starts its serving process for it (as soon as the desired state arrives,
  overlapping the download); timed from the deploy being sent until the
  agent's state.json says the update is done and the version serving,
  polled every 2 ms. The scoring API is not polled here: a scoring request
  would start the serving process too. The rows under it split it by update
  state, as below; the serving process's start-up shows in "starting",
  where the first load waits for it.
* deploy -> serving: with version 1 deployed and serving, each round
  deploys the other version (2, then 1, ...) and polls the scoring API every
  2 ms with an unversioned request until it answers with the new
  model_version; the clock starts when the deploy is sent. "REST" is a POST
  /api/v1/devices/{id}/deployments on a warm connection; "CLI" is the whole
  `edgefleet deploy MODEL:V --device ID` subprocess, so the difference is
  the CLI's start-up. The value is the median and the max over the rounds,
  against the 2 s target. From the second round on, both packages are
  already in the device's store, so "downloading" moves manifests only. The
  rows under it split the REST rounds (medians): the first is the hub taking
  the deploy, signing the desired state and publishing it over MQTT, and the
  agent verifying and saving it; then the time in each update state, from
  the agent's own timestamps, read from its state.json every 2 ms (a state
  shorter than that may be missed; its time then counts in the state before
  it). The last one is the route switch and the poll seeing the new version.
* scoring: --requests requests per run, spread over 1, 8 and 32 client
  threads, each thread on its own keep-alive connection, all with the one
  row [[1, 2, 3]]. JSON is the OIP JSON body sent by a raw http.client loop
  (encoded once; the answer is only status-checked); binary is
  tritonclient.http with binary_data=True for input and output, one client
  per thread. The baseline is onnxruntime's InferenceSession.run on the same
  model file and input, in this process, timed the same way with as many
  threads. The value is p50 / p99 latency of the answered requests and their
  rate; the ratio column is the p50 overhead over the baseline (at 1 client
  against the 0.5 ms target) and, under load, the rate as a share of the
  baseline's. The indented rows are floors, measured the same way: "client
  alone" runs the same client against a bare asyncio server in another
  process that answers a fixed "{}" (the load generator and loopback cost,
  and the most it can drive), "HTTP floor" is GET /v2/health/live on the
  agent (its HTTP stack, no model). The agent serves as shipped, at most 2
  inferences at once and 16 waiting, so with 32 clients some requests get
  503: counted, left out of the latencies and the rate, and sent again at
  once rather than after Retry-After, so their share overstates the 14
  clients too many. The client threads and the servers share this
  machine's CPUs, and anything else running on it shows up in the numbers:
  the caption gives the load average before the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import tritonclient.http as triton
from rich.console import Console
from tritonclient.utils import InferenceServerException

from harness import (
    EDGEFLEET,
    AgentProcess,
    HubProcess,
    publish_version,
    start_agent,
    start_hub,
    wait_for,
)
from packager.samples import make_onnx
from report import Row, print_table

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
MODEL = "tiny"
ROW = [1.0, 2.0, 3.0]
INFER_PATH = f"/v2/models/{MODEL}/infer"
AGENT_TARGET_MB = 25.0
GREENGRASS_MB = 96.0
DEPLOY_TARGET_S = 2.0
OVERHEAD_TARGET_MS = 0.5
IDLE_S = 5.0
POLL_S = 0.002
WARMUP = 20
CONCURRENCY = (1, 8, 32)
# The agent's update states in the order an update passes them (agent/updates.py).
UPDATE_STATES = ("downloading", "verifying", "staged", "starting", "self_test", "serving")

console = Console(stderr=True)

Call = Callable[[], bool]  # one request; False when the server turned it away (503)
Connect = Callable[[], AbstractContextManager[Call]]




def mb(n: float) -> str:
    return f"{n / MB:.1f} MB"  # a tenth: the rows by import differ by less than 1 MB


def ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1000:.2f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def percentile(samples: list[float], pct: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def meets(ok: bool) -> str:
    return "ok" if ok else "MISSES"


# ---- idle memory -------------------------------------------------------------

# What a fresh interpreter holds once it has imported what the agent imports at start-up.
AGENT_MODULES = "import json, sys, agent.__main__; print(json.dumps(sorted(sys.modules)))"
# Runs in a fresh interpreter: RSS after each step of importing those modules.
STARTUP_PROBE = textwrap.dedent("""
    import importlib, json, os, sys
    def rss():  # by hand: importing agent.procfs would count the agent package in row one
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    steps = [("python", rss())]
    for label, modules in json.loads(sys.argv[1]):
        for module in modules:
            importlib.import_module(module)
        steps.append((label, rss()))
    print(json.dumps(steps))
""")
# Big dependencies first, so each row is what that dependency costs (with what it
# imports that no row before did); the agent's own modules last. Steps the agent does
# not import are left out: the first four and paho-mqtt only show if one creeps back in.
STARTUP_IMPORTS = [
    ("click + the CLI", ["click", "edgefleet.cli", "agent.cli"]),
    ("numpy", ["numpy"]),
    ("cryptography", ["cryptography.hazmat.primitives.asymmetric.ec"]),
    ("rich + pygments (httpx/_main.py)", ["rich.console", "pygments.lexers"]),
    ("httpx + certifi", ["httpx"]),
    ("stdlib: logging, dataclasses (inspect), json, subprocess, datetime",
     ["logging", "dataclasses", "json", "subprocess", "socket", "datetime", "threading"]),
    ("OpenSSL's libcrypto (hashlib, hmac)", ["hashlib", "hmac"]),
    ("ssl, libssl (only with TLS: mqtts://, https)", ["ssl"]),
    ("paho-mqtt (+ urllib.request, http.client, email)", ["paho.mqtt.client"]),
    ("http.client, email (enrolling; a serving process's control socket)", ["http.client"]),
    ("sqlite3 (the telemetry queue)", ["sqlite3"]),
    ("contract modules (protocol, names, settings, keys)",
     ["contract.protocol", "contract.keys", "contract.tls", "contract.files"]),
    ("agent modules (python -m agent)", ["agent.__main__"]),
]


def python(*args: str) -> str:
    # From the repository root, where `import agent` is the package and not this script.
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          check=True, cwd=ROOT).stdout


def startup_steps() -> list[tuple[str, int]]:
    """(step, RSS growth in bytes) for a fresh interpreter importing what the agent imports."""
    loaded = set(json.loads(python("-c", AGENT_MODULES)))
    wanted = [(label, [m for m in modules if m in loaded]) for label, modules in STARTUP_IMPORTS]
    steps = json.loads(python("-c", STARTUP_PROBE, json.dumps([s for s in wanted if s[1]])))
    return [(label, rss - (steps[i - 1][1] if i else 0)) for i, (label, rss) in enumerate(steps)]


def device_online(hub: HubProcess, device_id: str) -> bool:
    answer = httpx.get(f"{hub.url}/api/v1/devices/{device_id}", verify=hub.verify,
                       headers={"Authorization": f"Bearer {hub.admin_token}"})
    return answer.status_code == 200 and answer.json()["status"] == "online"


@dataclass(frozen=True)
class Footprint:
    daemon: int   # RSS of the agent's own process
    serving: int  # RSS of all its child processes together (the serving process, if one runs)
    pss: int      # PSS of all of them: pages shared with other processes split among them

    @property
    def rss(self) -> int:
        return self.daemon + self.serving


def footprint(agent: AgentProcess) -> Footprint:
    """The agent's memory, all its processes, after IDLE_S seconds of doing nothing."""
    time.sleep(IDLE_S)
    process = psutil.Process(agent.process.pid)
    children = process.children(recursive=True)
    return Footprint(int(process.memory_info().rss),
                     sum(int(child.memory_info().rss) for child in children),
                     sum(int(p.memory_full_info().pss) for p in [process, *children]))


def idle_agent(hub: HubProcess, data_dir: Path) -> tuple[Footprint, AgentProcess]:
    """Start an agent that enrolls, measure it, and start it again, as a device starts at
    every boot after its first: (the first start's footprint, the agent running again).
    The first start also holds what enrolling needed (http.client, secrets)."""
    agent = start_agent(hub, data_dir, telemetry_interval=10.0)
    try:
        wait_for(lambda: device_online(hub, agent.device_id), what="the agent online")
        first = footprint(agent)
    finally:
        agent.stop()
    agent = start_agent(hub, data_dir, telemetry_interval=10.0)
    wait_for(lambda: device_online(hub, agent.device_id), what="the agent online again")
    return first, agent


def tls_footprint(scratch: Path) -> Footprint:
    """An idle agent's memory on a hub with TLS (https, mqtts), as hubs run by default."""
    hub = start_hub(scratch / "hub-tls", tls=True)
    try:
        _, agent = idle_agent(hub, scratch / "agent-tls")
        try:
            return footprint(agent)
        finally:
            agent.stop()
    finally:
        hub.stop()


def memory_rows(
    idle: Footprint, first: Footprint, tls: Footprint, steps: list[tuple[str, int]],
    serving_model: Footprint,
) -> list[Row]:
    agent_rss, serving_rss = idle.daemon, idle.serving
    both = idle.rss
    rows = [
        Row("agent idle RSS, all its processes (nothing deployed)", mb(both),
            f"Greengrass {GREENGRASS_MB:.0f} MB",
            f"{both / MB / GREENGRASS_MB:.2f}x; target <= {AGENT_TARGET_MB:.0f} MB: "
            f"{meets(both / MB <= AGENT_TARGET_MB)}"),
        Row("  the same in PSS (shared library pages split with other processes)",
            mb(idle.pss)),
        Row("  the same on its first start (enrolling: http.client, secrets)", mb(first.rss)),
        Row("  the same with TLS (https hub, mqtts)", mb(tls.rss), verdict=(
            f"target <= {AGENT_TARGET_MB:.0f} MB: {meets(tls.rss / MB <= AGENT_TARGET_MB)}")),
        Row("  the daemon (python -m agent)", mb(agent_rss)),
    ]
    rows += [Row(f"    {label}", f"+{mb(grown)}", verdict=f"{grown / agent_rss:.0%} of it")
             for label, grown in steps]
    running = agent_rss - sum(grown for _, grown in steps)
    rows += [
        Row("    running: later imports, threads, buffers, less the heap trimmed",
            f"{running / MB:+.1f} MB",
            verdict=f"{running / agent_rss:.0%} of it"),
        Row("  serving process", mb(serving_rss) if serving_rss else "none running"),
        Row("agent RSS serving the model, all its processes (after the deploys)",
            mb(serving_model.rss), f"Greengrass {GREENGRASS_MB:.0f} MB",
            f"{serving_model.rss / MB / GREENGRASS_MB:.2f}x"),
        Row("  the daemon", mb(serving_model.daemon),
            verdict=f"+{mb(serving_model.daemon - agent_rss)}: cryptography, registry client, "
                    "update machinery"),
        Row("  serving process, the model loaded", mb(serving_model.serving)),
    ]
    return rows


# ---- deploy -> serving -------------------------------------------------------


@dataclass
class Round:
    via: str
    version: int
    sent: float
    answered: float
    began: dict[str, float]  # update state -> when the agent entered it (epoch seconds)

    @property
    def seconds(self) -> float:
        return self.answered - self.sent


class UpdateWatcher:
    """Reads the agent's state.json every POLL_S and keeps when each state of one update began."""

    def __init__(self, agent: AgentProcess, version: int) -> None:
        self._agent = agent
        self._version = version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.began: dict[str, float] = {}

    def _run(self) -> None:
        while not self._stop.is_set():
            update = self._agent.state().get("update")
            if update and update["version"] == self._version:
                since = datetime.fromisoformat(update["since"]).timestamp()
                self.began.setdefault(update["state"], since)
            self._stop.wait(POLL_S)

    def __enter__(self) -> UpdateWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Scoring:
    """One keep-alive connection to a scoring API, sending one request again and again."""

    def __init__(self, port: int, api_key: str, method: str = "POST",
                 path: str = INFER_PATH) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._method = method
        self._path = path
        self._body = json.dumps({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ROW},
        ]}).encode() if method == "POST" else None
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def send(self) -> tuple[int, bytes]:
        self._conn.request(self._method, self._path, self._body, self._headers)
        response = self._conn.getresponse()
        return response.status, response.read()

    def served_version(self) -> str | None:
        status, body = self.send()
        return json.loads(body)["model_version"] if status == 200 else None

    def close(self) -> None:
        self._conn.close()


def wait_answering(scoring: Scoring, version: int, timeout: float = 60) -> float:
    """Poll every POLL_S until VERSION answers; returns when it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scoring.served_version() == str(version):
            return time.time()
        time.sleep(POLL_S)
    raise RuntimeError(f"{MODEL}:{version} did not answer within {timeout:g}s")


def cli_env(hub: HubProcess, scratch: Path) -> dict[str, str]:
    # A config file from the user's own `edgefleet login` must not be read.
    return {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
            "EDGEFLEET_CONFIG": str(scratch / "no-config.json")}


def deploy_rest(client: httpx.Client, device_id: str, version: int) -> None:
    client.post(f"/api/v1/devices/{device_id}/deployments",
                json={"model": MODEL, "version": version, "name": MODEL,
                      "prefer": []}).raise_for_status()


def deploy_cli(env: dict[str, str], device_id: str, version: int) -> subprocess.Popen[str]:
    return subprocess.Popen([*EDGEFLEET, "deploy", f"{MODEL}:{version}", "--device", device_id],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def update_done(agent: AgentProcess) -> bool:
    state = agent.state()
    return state["update"] is None and state["pending_desired"] is None


def deploy_round(agent: AgentProcess, version: int, via: str,
                 send: Callable[[], subprocess.Popen[str] | None]) -> Round:
    """SEND a deploy of VERSION; time it until VERSION answers, then let the update finish."""
    scoring = Scoring(agent.port, agent.api_key)
    try:
        with UpdateWatcher(agent, version) as watcher:
            sent = time.time()
            command = send()  # the CLI runs on while the scoring API is polled
            answered = wait_answering(scoring, version)
        if command is not None:
            _, errors = command.communicate(timeout=60)
            if command.returncode != 0:
                raise RuntimeError(f"edgefleet deploy failed:\n{errors}")
    finally:
        scoring.close()
    wait_for(lambda: update_done(agent), what="the update to finish")
    return Round(via, version, sent, answered, watcher.began)


def first_deploy(client: httpx.Client, agent: AgentProcess, version: int) -> Round:
    """The first deploy, which starts the serving process, timed until the agent saved the
    update done (the scoring API is not polled: a scoring request would start it too)."""
    with UpdateWatcher(agent, version) as watcher:
        sent = time.time()
        deploy_rest(client, agent.device_id, version)
        deadline = time.monotonic() + 60
        while not (MODEL in agent.state().get("serving", {}) and update_done(agent)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{MODEL}:{version} was not serving within 60 s")
            time.sleep(POLL_S)
        done = time.time()
    return Round("first", version, sent, done, watcher.began)


def bench_deploys(hub: HubProcess, agent: AgentProcess, versions: tuple[int, int], rounds: int,
                  scratch: Path) -> list[Round]:
    """Alternates REST and CLI deploys, each switching to the version not serving."""
    env = cli_env(hub, scratch)
    done: list[Round] = []
    with httpx.Client(base_url=hub.url, timeout=60,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as client:
        done.append(first_deploy(client, agent, versions[0]))
        scoring = Scoring(agent.port, agent.api_key)
        wait_answering(scoring, versions[0])
        scoring.close()
        for i in range(2 * rounds):
            version = versions[(i + 1) % 2]
            if i % 2 == 0:
                send = partial(deploy_rest, client, agent.device_id, version)
                done.append(deploy_round(agent, version, "REST", send))
            else:
                done.append(deploy_round(agent, version, "CLI",
                                         partial(deploy_cli, env, agent.device_id, version)))
    return done


def phases(r: Round) -> list[tuple[str, float]]:
    """(phase, seconds) from the deploy being sent to the new version answering."""
    seen = [s for s in UPDATE_STATES if s in r.began]
    names = ["deploy sent -> agent has it"] + [f"in {s}" for s in seen]
    if seen:
        names[-1] += ": switch, first answer" if r.via != "first" else ": until saved done"
    starts = [r.sent] + [r.began[s] for s in seen]
    ends = starts[1:] + [r.answered]
    return [(name, end - start) for name, start, end in zip(names, starts, ends, strict=True)]


def deploy_rows(rounds: list[Round]) -> list[Row]:
    (first,) = [r for r in rounds if r.via == "first"]
    rest = [r for r in rounds if r.via == "REST"]
    cli = [r for r in rounds if r.via == "CLI"]
    rest_s = [r.seconds for r in rest]
    starts = [Row("first deploy -> serving, REST: starts the serving process", ms(first.seconds),
                  verdict=f"target < {DEPLOY_TARGET_S:.0f} s: "
                          f"{meets(first.seconds < DEPLOY_TARGET_S)}")]
    starts += [Row(f"  {name}", ms(seconds)) for name, seconds in phases(first)]

    def row(label: str, times: list[float], baseline: str = "",
            against: float | None = None) -> Row:
        worst = max(times)
        verdict = f"target < {DEPLOY_TARGET_S:.0f} s: {meets(worst < DEPLOY_TARGET_S)}"
        if against is not None:
            verdict = f"{statistics.median(times) / against:.2f}x; {verdict}"
        return Row(f"deploy -> answers, {label} (median / max, n={len(times)})",
                   f"{ms(statistics.median(times))} / {ms(worst)}", baseline, verdict)

    rows = [*starts, row("REST", rest_s)]
    by_phase: dict[str, list[float]] = {}
    for r in rest:
        for name, seconds in phases(r):
            by_phase.setdefault(name, []).append(seconds)
    rows += [Row(f"  {name}", ms(statistics.median(times)),
                 verdict=f"seen in {len(times)} of {len(rest)}" if len(times) < len(rest) else "")
             for name, times in by_phase.items()]
    rest_median = statistics.median(rest_s)
    rows.append(row("CLI", [r.seconds for r in cli], f"REST {ms(rest_median)}", rest_median))
    return rows


# ---- scoring -----------------------------------------------------------------

# Answers every request with a fixed 200 "{}", for the load generator's own floor.
BARE_SERVER = textwrap.dedent("""
    import asyncio

    ANSWER = (b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
              b"Content-Length: 2\\r\\n\\r\\n{}")

    class Fixed(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""

        def data_received(self, data):
            self.buffer += data
            while (end := self.buffer.find(b"\\r\\n\\r\\n")) >= 0:
                length = 0
                for line in self.buffer[:end].split(b"\\r\\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                self.transport.write(ANSWER)

    async def main():
        server = await asyncio.get_running_loop().create_server(Fixed, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
""")


@contextmanager
def bare_server() -> Iterator[int]:
    """A separate process answering HTTP with nothing but a fixed response; yields its port."""
    process = subprocess.Popen([sys.executable, "-c", BARE_SERVER], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()


@dataclass
class Load:
    latencies: list[float]  # of answered requests
    rejected: int
    seconds: float  # from the first request sent to the last answer

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


@dataclass
class ClientRun:
    times: list[float]
    rejected: int
    began: float
    ended: float


def run_load(connect: Connect, clients: int, requests: int) -> Load:
    """REQUESTS calls over CLIENTS threads, each with its own connection, all starting together."""
    start_line = threading.Barrier(clients, timeout=120)

    def client() -> ClientRun:
        with connect() as call:
            for _ in range(WARMUP):
                call()
            start_line.wait()
            run = ClientRun([], 0, time.perf_counter(), 0.0)
            for _ in range(requests // clients):
                start = time.perf_counter()
                answered = call()
                elapsed = time.perf_counter() - start
                if answered:
                    run.times.append(elapsed)
                else:
                    run.rejected += 1
            run.ended = time.perf_counter()
            return run

    with ThreadPoolExecutor(clients) as pool:
        runs = [f.result() for f in [pool.submit(client) for _ in range(clients)]]
    return Load([t for r in runs for t in r.times], sum(r.rejected for r in runs),
                max(r.ended for r in runs) - min(r.began for r in runs))


def direct(session: ort.InferenceSession) -> Connect:
    feeds = {"x": np.array([ROW], dtype=np.float32)}

    @contextmanager
    def connect() -> Iterator[Call]:
        def call() -> bool:
            session.run(["y"], feeds)
            return True

        yield call

    return connect


def over_json(port: int, api_key: str, method: str = "POST", path: str = INFER_PATH) -> Connect:
    @contextmanager
    def connect() -> Iterator[Call]:
        scoring = Scoring(port, api_key, method, path)

        def call() -> bool:
            status, _ = scoring.send()
            if status not in (200, 503):
                raise RuntimeError(f"{method} {path} answered {status}")
            return status == 200

        try:
            yield call
        finally:
            scoring.close()

    return connect


def triton_client(port: int) -> tuple[triton.InferenceServerClient, list[triton.InferInput],
                                      list[triton.InferRequestedOutput]]:
    x = triton.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([ROW], dtype=np.float32), binary_data=True)
    return (triton.InferenceServerClient(f"127.0.0.1:{port}"), [x],
            [triton.InferRequestedOutput("y", binary_data=True)])


def over_binary(port: int, api_key: str) -> Connect:
    headers = {"Authorization": f"Bearer {api_key}"}

    @contextmanager
    def connect() -> Iterator[Call]:
        client, inputs, outputs = triton_client(port)

        def call() -> bool:
            try:
                client.infer(MODEL, inputs, outputs=outputs, headers=headers)
            except InferenceServerException as e:
                if e.status() != "503":
                    raise
                return False
            return True

        try:
            yield call
        finally:
            client.close()

    return connect


def check_answers(agent: AgentProcess, session: ort.InferenceSession) -> None:
    """Both paths must return what the runtime computes before their speed means anything."""
    expected = session.run(["y"], {"x": np.array([ROW], dtype=np.float32)})[0]
    scoring = Scoring(agent.port, agent.api_key)
    status, body = scoring.send()
    scoring.close()
    if status != 200:
        raise RuntimeError(f"the scoring API answered {status}: {body!r}")
    got = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(1, 2)
    client, inputs, outputs = triton_client(agent.port)
    binary = client.infer(MODEL, inputs, outputs=outputs,
                          headers={"Authorization": f"Bearer {agent.api_key}"}).as_numpy("y")
    client.close()
    if not (np.allclose(got, expected, atol=1e-5) and np.allclose(binary, expected, atol=1e-5)):
        raise RuntimeError(f"expected {expected}, JSON gave {got}, binary gave {binary}")


def p50(load: Load) -> float:
    return percentile(load.latencies, 50)


def load_text(load: Load) -> str:
    return f"{ms(p50(load))} / {ms(percentile(load.latencies, 99))}, {load.rate:,.0f}/s"


def score_row(label: str, clients: int, load: Load, base: Load, *, target: bool = False) -> Row:
    overhead = p50(load) - p50(base)
    verdict = f"+{ms(overhead)} p50"
    if target:
        ok = overhead * 1000 < OVERHEAD_TARGET_MS
        verdict += f"; target < {OVERHEAD_TARGET_MS} ms: {meets(ok)}"
    elif clients > 1:
        verdict += f", {load.rate / base.rate:.3f}x rate"
    if load.rejected:
        verdict += f", {load.rejected / (load.rejected + len(load.latencies)):.0%} got 503"
    return Row(f"{label}, {clients} client{'s' if clients > 1 else ''}", load_text(load),
               f"ort.run {load_text(base)}", verdict)


def bench_scoring(agent: AgentProcess, model: Path, requests: int) -> list[Row]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    check_answers(agent, session)
    rows: list[Row] = []
    with bare_server() as bare:
        for clients in CONCURRENCY:
            console.log(f"scoring with {clients} client(s)")
            base = run_load(direct(session), clients, requests)
            floors = [("  JSON client alone", over_json(bare, agent.api_key)),
                      ("  tritonclient alone", over_binary(bare, agent.api_key))]
            if clients == 1:
                floors.append(("  HTTP floor (GET /v2/health/live)",
                               over_json(agent.port, agent.api_key, "GET", "/v2/health/live")))
            for label, connect in floors:
                rows.append(score_row(label, clients, run_load(connect, clients, requests), base))
            served = [("JSON", over_json(agent.port, agent.api_key)),
                      ("binary (tritonclient)", over_binary(agent.port, agent.api_key))]
            for label, connect in served:
                rows.append(score_row(label, clients, run_load(connect, clients, requests), base,
                                      target=clients == 1))
    return rows


# ---- main --------------------------------------------------------------------




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000,
                        help="timed requests per scoring run (default 5000)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="deploys timed per way (REST, CLI) (default 4)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 300 requests per scoring run, 2 deploys per way")
    args = parser.parse_args()
    requests, rounds = (300, 2) if args.quick else (args.requests, args.rounds)
    if requests < max(CONCURRENCY) * 4 or rounds < 1:
        parser.error(f"--requests must be at least {max(CONCURRENCY) * 4}, --rounds at least 1")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        scratch = Path(tmp)
        console.log(f"an idle agent on a hub with TLS: its RSS after {IDLE_S:.0f} s idle")
        tls = tls_footprint(scratch)
        model = make_onnx(scratch / "model" / "model.onnx")
        hub = start_hub(scratch / "hub", tls=False)  # bench/tls.py measures TLS
        try:
            console.log("publishing two versions of the tiny model")
            versions = (publish_version(hub, MODEL, model), publish_version(hub, MODEL, model))
            console.log(f"an agent enrolling, then started again: its RSS after {IDLE_S:.0f} s "
                        "idle each time")
            first, agent = idle_agent(hub, scratch / "agent")
            try:
                idle = footprint(agent)
                steps = startup_steps()
                console.log(f"timing {rounds} deploys each through REST and the CLI")
                deploys = bench_deploys(hub, agent, versions, rounds, scratch)
                console.log(f"measuring the agent's RSS again after {IDLE_S:.0f} s idle, serving")
                rows = memory_rows(idle, first, tls, steps, footprint(agent))
                rows += deploy_rows(deploys)
                rows += bench_scoring(agent, model, requests)
            finally:
                agent.stop()
        finally:
            hub.stop()
    cpus = os.cpu_count()
    print_table(
        rows,
        f"edgefleet agent bench: --requests {requests}, {rounds} deploys per way, {cpus} CPUs",
        f"The load generator shares the {cpus} CPUs with the hub, the agent and its serving "
        f"process, so under load they compete: server numbers are lower bounds. "
        f"Load average before the run: {load_before:.1f}.",
    )


if __name__ == "__main__":
    main()
