"""Events and webhooks: does delivery to bad endpoints, and do open streams, slow the hub?

A real hub (bench/harness.py). Each request is `POST /api/v1/tokens`, a change that
writes an audit entry and an event. Phases alternate A W S A W S, REQUESTS requests
each from one client, one after the other:

- A: no webhooks, no streams: the baseline.
- W: four webhooks on every event: one receiver answering at once, one answering 500,
  one holding every request past the hub's 2 s webhook timeout, one port where nothing
  listens.
- S: STREAMS clients reading the SSE stream (in a child process, with its own GIL).

Printed: request rate and p50/p95 latency in W and S as ratios to A (1.0: no cost),
the time from an event's `at` to its arrival at the healthy receiver while the other
three fail (p50/p95), and whether every event reached it and every stream. The
receivers are threads of this process, sharing its GIL with the client: W's ratio
includes their work, an upper bound on the hub's own cost.

Run: `.venv/bin/python bench/events.py` (~1.5 min); `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose agent.py would shadow the agent package
from bench.harness import free_port, start_hub  # noqa: E402
from bench.report import Row, print_table  # noqa: E402
from hub.cli.events import parse_stream  # noqa: E402

SECRET = "bench-secret-bench-secret"


hits: dict[int, int] = {}  # requests answered with an error, by status


def receiver(status: int, hold: threading.Event | None,
             arrived: Callable[[dict[str, Any]], None]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if hold is not None:
                hold.wait(30)
                return
            if status == 200:
                arrived(json.loads(body))
            else:
                hits[status] = hits.get(status, 0) + 1
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def phase(api: httpx.Client, n: int, tag: str) -> tuple[float, list[float], list[int]]:
    """N token creations: (requests/s, latencies in ms, the events' ids)."""
    latencies = []
    started = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        api.post("/api/v1/tokens", json={"name": f"{tag}-{i}", "role": "viewer"}
                 ).raise_for_status()
        latencies.append((time.perf_counter() - t) * 1000)
    rate = n / (time.perf_counter() - started)
    last = api.get("/api/v1/events", params={"limit": 1}).json()["last"]
    return rate, latencies, list(range(last - n + 1, last + 1))


def read_streams(url: str, headers: dict[str, str], verify: Any, n: int, until: int,
                 counts: Any) -> None:
    """In a child process (its own GIL): N stream readers until each has seen event UNTIL."""

    def read(k: int) -> None:
        with httpx.stream("GET", f"{url}/api/v1/events", timeout=60, verify=verify,
                          headers={**headers, "Accept": "text/event-stream"}) as response:
            for event in parse_stream(response.iter_lines()):
                counts[k] += 1
                if event["id"] >= until:
                    return

    readers = [threading.Thread(target=read, args=(k,)) for k in range(n)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.streams = 50, 3
    load = os.getloadavg()[0]
    hold = threading.Event()
    arrivals: dict[int, float] = {}
    events_at: dict[int, str] = {}

    def arrived(event: dict[str, Any]) -> None:
        arrivals[event["id"]] = time.time()
        events_at[event["id"]] = event["at"]

    servers = [receiver(200, None, arrived), receiver(500, None, arrived),
               receiver(200, hold, arrived)]
    urls = [f"http://127.0.0.1:{s.server_address[1]}/hook" for s in servers]
    urls.append(f"http://127.0.0.1:{free_port()}/hook")
    results: dict[str, list[tuple[float, list[float]]]] = {"A": [], "W": [], "S": []}
    delivered_ok, streamed = True, []
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        hub = start_hub(Path(tmp) / "data", extra_args=(
            "--webhook-timeout-seconds", "2", "--webhook-retry-seconds", "1"))
        headers = {"Authorization": f"Bearer {hub.admin_token}"}
        verify = str(hub.ca_path) if hub.tls else True
        try:
            with httpx.Client(base_url=hub.url, headers=headers, verify=hub.verify,
                              timeout=60) as api:
                for round_ in range(2):
                    results["A"].append(phase(api, args.requests, f"a{round_}")[:2])
                    hooks = [api.post("/api/v1/webhooks", json={
                        "url": url, "types": ["*"], "secret": SECRET}).json()["id"]
                        for url in urls]
                    rate, lat, ids = phase(api, args.requests, f"w{round_}")
                    results["W"].append((rate, lat))
                    deadline = time.monotonic() + 120
                    while not set(ids) <= set(arrivals) and time.monotonic() < deadline:
                        time.sleep(0.1)
                    delivered_ok &= set(ids) <= set(arrivals)
                    for hook in hooks:
                        api.delete(f"/api/v1/webhooks/{hook}")
                    last = api.get("/api/v1/events", params={"limit": 1}).json()["last"]
                    counts = multiprocessing.Array("i", args.streams)
                    child = multiprocessing.Process(target=read_streams, args=(
                        hub.url, headers, verify, args.streams, last + args.requests, counts))
                    child.start()
                    time.sleep(2)  # the streams open
                    results["S"].append(phase(api, args.requests, f"s{round_}")[:2])
                    child.join(120)
                    streamed += list(counts)
                lag = sorted(arrivals[i] - datetime.fromisoformat(events_at[i]).timestamp()
                             for i in arrivals)
        finally:
            hold.set()
            hub.stop()
            for s in servers:
                s.shutdown()

    def rate(p: str) -> float:
        return statistics.mean(r for r, _ in results[p])

    def pct(p: str, q: float) -> float:
        lat = sorted(x for _, ls in results[p] for x in ls)
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    rows = []
    for p, what in (("W", "4 webhooks, 3 failing"), ("S", f"{args.streams} SSE streams")):
        rows += [Row(f"{what}: requests/s", f"{rate(p):.1f}", f"{rate('A'):.1f}",
                     f"{rate(p) / rate('A'):.2f}"),
                 *(Row(f"{what}: latency p{int(q * 100)} ms", f"{pct(p, q):.1f}",
                       f"{pct('A', q):.1f}", f"{pct(p, q) / pct('A', q):.2f}")
                   for q in (0.5, 0.95))]
    rows += [Row("event -> healthy receiver p50 ms", f"{lag[len(lag) // 2] * 1000:.0f}"),
             Row("event -> healthy receiver p95 ms", f"{lag[int(len(lag) * .95)] * 1000:.0f}"),
             Row("every event at the healthy receiver", "yes" if delivered_ok else "NO"),
             Row("requests at the endpoint answering 500", str(hits.get(500, 0)),
                 f"{2 * args.requests} events"),
             Row("events per stream (min of all)", str(min(streamed, default=0)),
                 str(args.requests))]
    print_table(rows, "Events and webhooks: the hub's API with webhooks (W) or streams (S), "
                "against neither (A)",
                f"{args.requests} requests a phase, A W S A W S; load average {load:.1f} before")


if __name__ == "__main__":
    main()
