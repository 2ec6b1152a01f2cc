"""Benchmark the serving process against a bare FastAPI endpoint, its transports, batching
and load shedding, in one run.

    .venv/bin/python bench/serving_speed.py                        # ~8 min on 2 cores
    .venv/bin/python bench/serving_speed.py --only mlp --rounds 1  # quick look
    .venv/bin/python bench/serving_speed.py --clients 32 --rounds 5

Servers. One `edgefleet serve` process at its default settings
(--max-concurrency 2, --max-queue 128, --max-wait-ms 500; --grpc-port 0)
serves a small MLP (input "x" FP32 [N, 64], 64 -> 256 -> 256 -> 16 with
ReLU, built here with onnx) twice: "mlp" answers each request with its own
runtime call, "mlp-batched" has adaptive batching on (max_batch_size 64,
max_delay_ms 0). Beside it, in its own uvicorn process, the baseline a user
would write: one FastAPI route that reads the same JSON request, runs an
InferenceSession (one intra-op thread, like the device's) and answers JSON,
with no key, no checks and no metrics.

Clients. Closed loop (each client sends its next request when the last is
answered), one keep-alive connection or channel each, in their own processes
(bench/serving_load.py: 1 process up to 16 clients, else 2), so the load
generator is not the server's event loop. HTTP clients send prepared bytes
and only look for Content-Length in the answer, a few microseconds a request;
gRPC clients use grpcio's asyncio channel, which costs much more per call, so
the gRPC rows are partly the client's limit. Each configuration runs
--seconds after a 1 s warm-up, in --rounds rounds that interleave all the
configurations, so a change in the machine's load hits them alike.

Rows, at 1, 8, 32 and 128 clients: answered requests/s (over all rounds),
p50 and p99 latency as the clients see it, the server process's CPU time per
answered request (all its threads, from /proc; steadier than the rate on a
shared machine), then three shares of the measured seconds: the server's CPU
(all threads), the load generator's CPU (all client processes), and the time
the server's event-loop thread was ready to run but waited for a CPU (the
kernel's schedstat); and the median over rounds of the rate's ratio to the
bare endpoint's in the same round. A server whose loop ran plus waited adds
up to ~100 % was busy all the time: its rate is what the machine's scheduler
gave it, and only its CPU per request says how efficient it is. Also:

* onnxruntime direct: InferenceSession.run in a loop in this process, one
  row a call and 32 rows a call (rows/s): the ceiling without any server.
* heavier model: the same MLP with three hidden layers of 4096 (~130 MB of
  weights, read on every call: ~12 ms with one row, ~40 ms with 32 here),
  REST binary, batching off and on: what merging requests buys when the
  runtime call dominates.
* shedding: a slow model (~N ms per call, tuned at start to about 20 ms)
  with --max-wait-ms 100 under 32 clients: how many requests are answered,
  how many get 503 and how fast the 503 comes (it should be at once), and
  from the server's own histogram how long the answered ones took inside it
  (body received to response, queue wait included) against the budget.

Servers and clients share the machine's 2 cores, and other jobs on it skew
everything: quote the load average the run prints with its numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.serving.oip import messages  # noqa: E402

WIDTH = 64
# Seconds from starting the client processes to counting: their start-up and a warm-up.
WARMUP = 1.0
KEY = "bench-serving-key"


def make_mlp(path: Path, hidden: int = 256, layers: int = 2, out: int = 16) -> Path:
    """x FP32 [N, 64] -> ReLU(x W1 + b1) ... -> y FP32 [N, OUT]; weights seeded."""
    rng = np.random.default_rng(0)
    nodes, weights, last, size = [], [], "x", WIDTH
    for i in range(layers):
        weights += [numpy_helper.from_array(
                        (rng.normal(size=(size, hidden)) / np.sqrt(size)).astype(np.float32),
                        f"W{i}"),
                    numpy_helper.from_array(np.zeros(hidden, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [last, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        last, size = f"h{i}", hidden
    weights.append(numpy_helper.from_array(
        (rng.normal(size=(size, out)) / np.sqrt(size)).astype(np.float32), "Wout"))
    nodes.append(helper.make_node("MatMul", [last, "Wout"], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path.parent


def version(model_dir: Path, v: str, **extra: Any) -> dict[str, Any]:
    return {"version": v, "model_dir": str(model_dir), "entrypoint": "model.onnx",
            "framework": "onnx", "runtime": {"prefer": ["onnxruntime:CPU"], "threads": 1},
            **extra}


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    grpc: str
    control_socket: Path

    def deploy(self, name: str, body: dict[str, Any]) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.control_socket)),
                          base_url="http://serve", timeout=120) as control:
            answer = control.put(f"/control/deployments/{name}", json=body)
        if answer.status_code != 200:
            raise SystemExit(f"deploy {name}: {answer.text}")


def start(tmp: Path, *args: str) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "key").write_text(KEY)
    log = tmp / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.serving", "--port", "0", "--grpc-port", "0",
         "--control-socket", str(tmp / "s.sock"), "--api-key-file", str(tmp / "key"), *args],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        rest = re.search(r"on (http://127\.0\.0\.1:\d+)", text)
        grpc_at = re.search(r"gRPC API \(Open Inference Protocol\) on (\S+)", text)
        if rest and grpc_at:
            return Server(process, rest.group(1), grpc_at.group(1), tmp / "s.sock")
        if process.poll() is not None:
            raise SystemExit(f"serve exited:\n{text}")
        time.sleep(0.05)
    raise SystemExit("serve did not start")


# The baseline: FastAPI and onnxruntime with nothing else (no auth, no checks, no metrics),
# taking the same REST JSON request.
BARE_APP = """
import sys
import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
app = FastAPI()

@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> dict:
    tensor = (await request.json())["inputs"][0]
    x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
    (y,) = session.run(None, {"x": x})
    return {"model_name": name, "outputs": [
        {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
            access_log=False)
"""


def start_bare(model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", BARE_APP, str(model_dir / "model.onnx"),
                                str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the bare FastAPI server did not start")


# ---- requests -------------------------------------------------------------------------


def rest_request(url: str, name: str, x: np.ndarray, binary: bool) -> bytes:
    host = url.removeprefix("http://")
    tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
    if binary:
        raw = x.astype("<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [tensor], "outputs": [
            {"name": "y", "parameters": {"binary_data": True}}]}).encode()
        body = head + raw
        extra = f"Inference-Header-Content-Length: {len(head)}\r\n"
    else:
        tensor["data"] = x.ravel().tolist()
        body = json.dumps({"inputs": [tensor]}).encode()
        extra = "Content-Type: application/json\r\n"
    return (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"X-API-Key: {KEY}\r\n{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def grpc_request(name: str, x: np.ndarray) -> bytes:
    request = messages.ModelInferRequest(model_name=name)
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return bytes(request.SerializeToString())


@dataclass
class Run:
    statuses: dict[int, int]
    latencies: list[float]  # of successes
    refusals: list[float]  # of 503s
    seconds: float
    cpu: float | None = None  # the server's CPU seconds meanwhile, if measured
    client_cpu: float = 0.0  # the client processes' CPU seconds meanwhile
    # Seconds the server's event-loop thread was ready to run but waited for a CPU
    # (/proc schedstat): the machine's share of the rate, not the server's.
    runqueue: float = 0.0

    @property
    def cpu_per_request(self) -> float:
        """The server's CPU time per answered request, in ms (NaN if not measured)."""
        answered = sum(self.statuses.values())
        return 1000 * self.cpu / answered if self.cpu is not None and answered else float("nan")

    @property
    def rate(self) -> float:
        return self.statuses.get(200, 0) / self.seconds

    def p(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[int(q) - 1] * 1000


def processes_for(clients: int) -> int:
    """Client processes: one per 16 clients, at most 2 (the machine has 2 cores, and
    the servers measured need one of them)."""
    return min(2, max(1, (clients + 15) // 16))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process PID (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_seconds(pid: int) -> float:
    """Seconds the main thread of PID (the server's event loop) has waited, runnable, for a
    CPU so far (the kernel's schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def load(kind: str, target: str, payload: bytes, clients: int, seconds: float,
         server: int | None = None) -> Run:
    """CLIENTS closed-loop clients in their own processes (bench/serving_load.py) for SECONDS
    after a short warm-up; the clients' numbers merged. SERVER: the pid whose CPU time
    per answered request is measured over the same seconds."""
    procs = processes_for(clients)
    with tempfile.NamedTemporaryFile(prefix="bench-payload-") as file:
        file.write(payload)
        file.flush()
        start = time.time() + WARMUP
        shares = [clients // procs + (i < clients % procs) for i in range(procs)]
        children = [subprocess.Popen(
            [sys.executable, str(ROOT / "bench/serving_load.py"), kind, target, file.name,
             str(share), str(start), str(start + seconds)],
            stdout=subprocess.PIPE) for share in shares]
        cpu, queued = None, 0.0
        if server is not None:
            time.sleep(max(0.0, start - time.time()))
            began, waited = cpu_seconds(server), runqueue_seconds(server)
            time.sleep(max(0.0, start + seconds - time.time()))
            cpu = cpu_seconds(server) - began
            queued = runqueue_seconds(server) - waited
        outputs = [child.communicate(timeout=seconds + 120)[0] for child in children]
    run = Run({}, [], [], seconds)
    for child, output in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise SystemExit(f"a client process failed ({child.returncode})")
        part = json.loads(output)
        for status, count in part["statuses"].items():
            run.statuses[int(status)] = run.statuses.get(int(status), 0) + count
        run.latencies += part["latencies"]
        run.refusals += part["refusals"]
        run.client_cpu += part["cpu"]
    run.cpu = cpu
    run.runqueue = queued
    return run


def onnxruntime_direct(model_dir: Path, x: np.ndarray, seconds: float) -> Run:
    """InferenceSession.run on X in a loop, one caller; the rate is in calls/s."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    run = Run({}, [], [], seconds)
    session.run(None, {"x": x})
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        began = time.perf_counter()
        session.run(None, {"x": x})
        run.latencies.append(time.perf_counter() - began)
    run.statuses[200] = len(run.latencies)
    return run


# ---- the run --------------------------------------------------------------------------


def row(label: str, run: Run, ratio: float | None = None, scale: int = 1) -> str:
    """One line: rate (times SCALE: rows per call), p50, p99, server CPU per request,
    the share of one core the server and the load generator used and the share of the time
    the server's loop waited for a CPU, RATIO, errors."""
    shown = f"{ratio:5.2f}x" if ratio is not None else "      "
    errors = sum(n for s, n in run.statuses.items() if s != 200)
    cpu = " " * 34
    if run.cpu is not None:
        shares = (run.cpu, run.client_cpu, run.runqueue)
        cpu = f"cpu {run.cpu_per_request:5.3f} ms " + "/".join(
            f"{100 * share / run.seconds:3.0f}%" for share in shares)
    return (f"{label:<36} {run.rate * scale:8.0f}/s  p50 {run.p(50):6.2f} ms"
            f"  p99 {run.p(99):6.2f} ms  {cpu}  {shown}"
            f"  {'errors ' + str(errors) if errors else ''}")


def merged(runs: list[Run]) -> Run:
    """RUNS (one configuration's rounds) as one: counts and seconds added, latencies pooled."""
    total = Run({}, [], [], sum(r.seconds for r in runs), 0.0)
    for r in runs:
        for status, count in r.statuses.items():
            total.statuses[status] = total.statuses.get(status, 0) + count
        total.latencies += r.latencies
        total.refusals += r.refusals
        total.client_cpu += r.client_cpu
        total.runqueue += r.runqueue
        total.cpu = None if r.cpu is None or total.cpu is None else total.cpu + r.cpu
    return total


def ratio(runs: list[Run], bases: list[Run]) -> float:
    """The median over rounds of RUNS' rate to BASES' rate in the same round: the rounds
    interleave the configurations, so a change in the machine's load hits both sides."""
    return statistics.median(r.rate / b.rate if b.rate else float("nan")
                             for r, b in zip(runs, bases, strict=True))


BATCHING = {"max_batch_size": 64, "max_delay_ms": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="per configuration and round (default 1.5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all configurations, interleaved (default 3)")
    parser.add_argument("--clients", default="1,8,32,128",
                        help="client counts (default 1,8,32,128)")
    parser.add_argument("--only", choices=["mlp", "heavy", "shedding"],
                        help="one part only (default: all)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    x = np.random.default_rng(1).normal(size=(1, WIDTH)).astype(np.float32)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "mlp"):
            small(tmp, x, counts, args.seconds, args.rounds)
        if args.only in (None, "heavy"):
            heavy(tmp, x, counts, args.seconds, args.rounds)
        if args.only in (None, "shedding"):
            shedding(tmp, args.seconds)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def small(tmp: Path, x: np.ndarray, counts: list[int], seconds: float, rounds: int) -> None:
    """The small MLP: every transport and the bare FastAPI endpoint, batching on and off."""
    mlp = make_mlp(tmp / "mlp/model.onnx")
    server = start(tmp / "serve")
    bare, bare_url = start_bare(mlp)
    try:
        server.deploy("mlp", version(mlp, "1"))
        server.deploy("mlp-batched", version(mlp, "1", batching=BATCHING))
        print("-- small MLP 64 -> 2 x 256 -> 16, one row per request; device at default"
              " settings (--max-concurrency 2, --max-wait-ms 500)")
        print(row("onnxruntime direct, 1 row a call", onnxruntime_direct(mlp, x, seconds)))
        wide = np.repeat(x, 32, axis=0)
        print(row("onnxruntime direct, 32 rows (rows/s)", onnxruntime_direct(mlp, wide, seconds),
                  scale=32))
        pid = server.process.pid
        configs: dict[str, Callable[[int], Run]] = {
            "bare FastAPI + onnxruntime, JSON": lambda n: load(
                "http", bare_url, rest_request(bare_url, "mlp", x, False), n, seconds, bare.pid)}
        for model, batching in (("mlp", "off"), ("mlp-batched", "on ")):
            configs |= {
                f"device REST JSON   batching {batching}": functools.partial(
                    load, "http", server.url, rest_request(server.url, model, x, False),
                    seconds=seconds, server=pid),
                f"device REST binary batching {batching}": functools.partial(
                    load, "http", server.url, rest_request(server.url, model, x, True),
                    seconds=seconds, server=pid),
                f"device gRPC        batching {batching}": functools.partial(
                    load, "grpc", server.grpc, grpc_request(model, x), seconds=seconds,
                    server=pid)}
        for clients in counts:
            print(f"-- {clients} client(s) in {processes_for(clients)} process(es), {rounds}"
                  " rounds; ratio: median of each round's to the bare FastAPI endpoint")
            runs: dict[str, list[Run]] = {label: [] for label in configs}
            for _ in range(rounds):
                for label, measure in configs.items():
                    runs[label].append(measure(clients))
            bases = next(iter(runs.values()))
            for label, measured in runs.items():
                shown = None if measured is bases else ratio(measured, bases)
                print(row(label, merged(measured), shown))
    finally:
        bare.send_signal(signal.SIGTERM)
        bare.wait(60)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(60)


def heavy(tmp: Path, x: np.ndarray, counts: list[int], seconds: float, rounds: int) -> None:
    """A model whose call takes ~12 ms with one row and not much more with many: ~130 MB of
    weights read on every call, however many rows it has."""
    server = start(tmp / "heavy-serve")
    try:
        model = make_mlp(tmp / "heavy/model.onnx", hidden=4096, layers=3)
        server.deploy("heavy", version(model, "1"))
        server.deploy("heavy-batched", version(model, "1", batching=BATCHING))
        print("-- heavier model: 64 -> 3 x 4096 -> 16 (~130 MB of weights), REST binary,"
              " default settings")
        print(row("onnxruntime direct, 1 row a call", onnxruntime_direct(model, x, seconds)))
        wide = np.repeat(x, 32, axis=0)
        print(row("onnxruntime direct, 32 rows (rows/s)",
                  onnxruntime_direct(model, wide, seconds), scale=32))
        for clients in counts:
            runs: dict[str, list[Run]] = {"heavy": [], "heavy-batched": []}
            for _ in range(rounds):
                for name, measured in runs.items():
                    measured.append(load("http", server.url,
                                         rest_request(server.url, name, x, True), clients,
                                         seconds, server.process.pid))
            print(row(f"{clients} client(s), batching off", merged(runs["heavy"])))
            print(row(f"{clients} client(s), batching on (vs off)",
                      merged(runs["heavy-batched"]), ratio(runs["heavy-batched"], runs["heavy"])))
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(60)


def server_side(server: Server, model: str) -> str:
    """How many of MODEL's answered requests took at most 0.1/0.25/0.5 s in the server,
    from its request-duration histogram (the client's clock adds its own queueing)."""
    text = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": KEY}).text
    counts = dict(re.findall(
        rf'edgefleet_serving_request_duration_seconds_bucket{{model="{model}",version="1",'
        r'le="([^"]+)"} (\d+)', text))
    total = int(counts.get("+Inf", 0)) or 1
    return ", ".join(f"{100 * int(counts[le]) / total:.0f}% <= {le} s"
                     for le in ("0.1", "0.25", "0.5") if le in counts)


def shedding(tmp: Path, seconds: float) -> None:
    """A ~20 ms model, 32 clients, a 100 ms wait budget: what is answered, what is refused."""
    server = start(tmp / "shed", "--max-concurrency", "2", "--max-wait-ms", "100")
    try:
        hidden = 512
        model = make_mlp(tmp / "slow/model.onnx", hidden=hidden, layers=2)
        server.deploy("slow", version(model, "1"))
        rows = 64
        x = np.ones((rows, WIDTH), np.float32)
        probe = load("http", server.url, rest_request(server.url, "slow", x, True), 1, 1.0)
        per_call = probe.p(50) / 1000
        rows = max(1, int(rows * 0.02 / max(per_call, 1e-4)))
        x = np.ones((rows, WIDTH), np.float32)
        payload = rest_request(server.url, "slow", x, True)
        one = load("http", server.url, payload, 1, seconds)
        burst = load("http", server.url, payload, 32, 2 * seconds)
        print(f"-- shedding: slow model, {rows} rows per request, --max-wait-ms 100,"
              " --max-concurrency 2")
        print(row("1 client", one, None))
        print(row("32 clients", burst, None))
        print(f"{'':<34} server side (body in to response, wait included), answered:"
              f" {server_side(server, 'slow')}")
        refused = burst.refusals
        if refused:
            print(f"{'':<34} 503s: {len(refused)}, answered in p50"
                  f" {statistics.median(refused) * 1000:.2f} ms"
                  f" (max {max(refused) * 1000:.2f} ms); answered p99 {burst.p(99):.0f} ms"
                  " (budget 100 ms + one call)")
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(60)


if __name__ == "__main__":
    main()
