"""Kubernetes mode's pod metrics (agent/kube/scrape.py) against real serving processes.

kwok's pods run nothing, so the pods here are real `edgefleet serve --load` processes
(what a package image's pod runs), handed to the scraper the way the API server's pod
list hands it pod IPs; hostile pods are real HTTP servers that answer garbage, too much,
too slowly or nothing. Drift counts: pods given bins (`--sketch`, as the Deployment's
env gives them) summed and sent as they move, through a pod's restart. The agent end to
end (its points and sketches stored by the hub) is in tests/test_kube_agent.py.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent.kube.scrape import (
    MAX_BYTES,
    Counters,
    PodAddress,
    ScrapeError,
    Scraper,
    parse,
    parse_sketches,
)
from hubproc import free_port
from modelgen import make_onnx
from test_serving_autoload import image_root
from test_serving_process import API_KEY, ServeProcess, start_serve

ROW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}
# Drift bins as the desired state carries them; ROW's x[0]=1, x[2]=3 and y[1]=8.3 (the
# model's y = x @ W + b) each fall in their feature's second bin.
SKETCH = [{"side": "input", "tensor": "x", "column": 0, "edges": [0, 2, 4]},
          {"side": "input", "tensor": "x", "column": 2, "edges": [2.5]},
          {"side": "output", "tensor": "y", "column": 1, "edges": [5]}]


def binned(n: int) -> dict[str, list[int]]:
    """N of ROW's rows as SKETCH's counts."""
    return {"x[0]": [0, n, 0, 0], "x[2]": [0, n], "y[1]": [0, n]}


@pytest.fixture(scope="module")
def serving_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_root(tmp_path_factory.mktemp("opt"), make_onnx)


@pytest.fixture
def start_pod(serving_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Callable[..., ServeProcess]]:
    """A pod's process: the image's package loaded as tiny:4 (with ARGS: --sketch)."""
    monkeypatch.setenv("EDGEFLEET_SERVING", str(serving_json))
    started: list[ServeProcess] = []

    def start(name: str, *args: str) -> ServeProcess:
        served = start_serve(tmp_path / f"{name}-{len(started)}", "--load", "tiny:4", *args)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.terminate()
            served.process.wait(30)


def score(pod: ServeProcess, n: int, *, bad: int = 0) -> None:
    with pod.client() as client:
        for _ in range(n):
            assert client.post("/v2/models/tiny/infer", json=ROW).status_code == 200
        for _ in range(bad):
            assert client.post("/v2/models/tiny/infer", json={"inputs": []}).status_code == 400


def metrics(url: str) -> str:
    return f"{url}/metrics"


def test_the_pods_counters_become_one_deployments_points(
        start_pod: Callable[[str], ServeProcess]) -> None:
    a, b = start_pod("a"), start_pod("b")
    pods = {"tiny-a": a, "tiny-b": b}
    listed: list[str] = ["tiny-a", "tiny-b"]
    seen_names: list[str] = []

    def addresses(name: str) -> list[PodAddress]:
        seen_names.append(name)
        return [PodAddress(p, metrics(pods[p].url)) for p in listed]

    scraper = Scraper(addresses)
    try:
        score(a, 3, bad=1)
        score(b, 2)
        [point], read = scraper.scrape({"tiny": "tiny-obj"}, API_KEY)["tiny"]
        assert seen_names == ["tiny-obj"]
        assert (read.pods, read.failed, read.error) == (2, 0, "")
        assert point["deployment"] == "tiny" and point["version"] == 4
        assert (point["count"], point["errors"]) == (3 + 1 + 2, 1)   # 400s count as both
        assert 0 < point["p50_ms"] <= point["p99_ms"]

        assert scraper.scrape({"tiny": "tiny-obj"}, API_KEY)["tiny"][0] == []  # nothing new
        score(b, 4)
        [point], _ = scraper.scrape({"tiny": "tiny-obj"}, API_KEY)["tiny"]
        assert (point["count"], point["errors"]) == (4, 0)

        # Pod b restarts (its counters start again) and a is gone from the list.
        b.process.terminate()
        b.process.wait(30)
        pods["tiny-b"] = start_pod("b")
        listed.remove("tiny-a")
        score(pods["tiny-b"], 5)
        score(a, 7)   # no longer listed: not counted
        [point], read = scraper.scrape({"tiny": "tiny-obj"}, API_KEY)["tiny"]
        assert (point["count"], read.pods) == (5, 1)
    finally:
        scraper.close()


def test_the_pods_drift_counts_are_summed_and_sent_as_they_move(
        start_pod: Callable[..., ServeProcess]) -> None:
    """The counts that moved, per version over its pods: a pod's own increase (all of it
    after a restart), summed, and the sum's increase sent as a device sends it."""
    sketch = ("--sketch", json.dumps(SKETCH))
    a, b = start_pod("a", *sketch), start_pod("b", *sketch)
    pods = {"tiny-a": a, "tiny-b": b}
    scraper = Scraper(lambda name: [PodAddress(p, metrics(s.url)) for p, s in pods.items()])

    def point() -> dict:
        [found], read = scraper.scrape({"tiny": "tiny-obj"}, API_KEY, {"tiny"})["tiny"]
        assert read.failed == 0, read.error
        return found

    try:
        assert httpx.get(f"{a.url}/metrics/sketches").status_code == 401   # the key, as /metrics
        score(a, 3, bad=1)   # a request refused is not counted into the bins
        score(b, 2)
        assert point()["sketches"] == binned(5)
        assert scraper.scrape({"tiny": "tiny-obj"}, API_KEY, {"tiny"})["tiny"][0] == []
        score(b, 4)
        assert point()["sketches"] == binned(4)

        b.process.terminate()   # b restarts: its counts start again, below the last read
        b.process.wait(30)
        pods["tiny-b"] = start_pod("b", *sketch)
        score(pods["tiny-b"], 1)
        score(a, 2)
        assert point()["sketches"] == binned(3)
        # Not read for a deployment without bins: its points carry none.
        score(a, 1)
        [plain], _ = scraper.scrape({"tiny": "tiny-obj"}, API_KEY)["tiny"]
        assert plain["count"] == 1 and "sketches" not in plain
    finally:
        scraper.close()


def test_one_pods_increase_and_the_versions_sum() -> None:
    """The summing and delta logic on its own: a feature's counts per pod and in total."""
    total = Counters()
    first = Counters(requests=4, sketches={"x[0]": [1, 3], "x[1]": [4, 0]})
    total.add(first.since(None))
    later = Counters(requests=6, sketches={"x[0]": [2, 4], "x[1]": [6, 0]})
    assert later.since(first).sketches == {"x[0]": [1, 1], "x[1]": [2, 0]}
    total.add(later.since(first))
    # The pod restarted: its requests went down, so all it has now is new.
    restarted = Counters(requests=1, sketches={"x[0]": [0, 1]})
    assert restarted.since(later).sketches == {"x[0]": [0, 1]}
    total.add(restarted.since(later))
    # A feature whose counts went down while the counters did not: that feature from zero.
    odd = Counters(requests=9, sketches={"x[0]": [0, 5], "x[1]": [7, 0]})
    assert odd.since(later).sketches == {"x[0]": [0, 5], "x[1]": [1, 0]}
    total.add(Counters(sketches={"x[0]": [5, 5]}))   # another pod
    assert total.sketches == {"x[0]": [7, 10], "x[1]": [6, 0]}
    assert total.row("tiny", "4")["sketches"] == total.sketches


class Hostile(http.server.BaseHTTPRequestHandler):
    """Pods that answer what no serving process would."""

    def do_GET(self) -> None:
        kind = self.path.strip("/")
        if kind == "slow":   # a byte at a time, never done within the read's time
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"#")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass
            return
        if kind == "legacy/sketches":   # a serving build from before drift sketches
            self.send_error(404)
            return
        counted = b'edgefleet_serving_requests_total{model="tiny",version="4"} 3\n'
        body = {
            "legacy": counted,
            "garbled": counted,
            "garbled/sketches": b"[{",
            "garbage": b"this is { not metrics\n",
            "binary": bytes(range(256)) * 4,
            "huge": b"# padding\n" * (MAX_BYTES // 10 + 10),
            "nan": b'edgefleet_serving_requests_total{model="tiny",version="4"} NaN\n',
            "histogram": (b'edgefleet_serving_request_duration_seconds_bucket'
                          b'{model="tiny",version="4",le="0.1"} 5\n'
                          b'edgefleet_serving_request_duration_seconds_bucket'
                          b'{model="tiny",version="4",le="+Inf"} 3\n'),
        }[kind]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bad_pods_are_counted_and_the_good_one_still_read(
        start_pod: Callable[[str], ServeProcess], hostile: str) -> None:
    good = start_pod("good")
    score(good, 2)
    bad = {"garbage": f"{hostile}/garbage", "binary": f"{hostile}/binary",
           "huge": f"{hostile}/huge", "slow": f"{hostile}/slow", "nan": f"{hostile}/nan",
           "histogram": f"{hostile}/histogram",
           "unreachable": f"http://127.0.0.1:{free_port()}/metrics"}
    scraper = Scraper(lambda name: [PodAddress("good", metrics(good.url)),
                                    *(PodAddress(k, v) for k, v in bad.items())])
    try:
        started = time.monotonic()
        [point], read = scraper.scrape({"tiny": "tiny"}, API_KEY)["tiny"]
        took = time.monotonic() - started
        assert point["count"] == 2 and read.pods == 1 + len(bad)
        assert read.failed == len(bad)
        assert read.error and "\n" not in read.error
        assert took < 15, f"the bad pods held the round up for {took:.0f} s"
        assert "metrics_error" in read.values() and len(read.values()["metrics_error"]) <= 128

        wrong = Scraper(lambda name: [PodAddress("good", metrics(good.url))])
        try:
            _, read = wrong.scrape({"tiny": "tiny"}, "not-the-key")["tiny"]
        finally:
            wrong.close()
        assert read.failed == 1 and "answered 401" in read.error
    finally:
        scraper.close()


def test_a_pod_serving_no_sketches_is_read_and_bad_sketches_are_counted(hostile: str) -> None:
    scraper = Scraper(lambda name: [PodAddress("legacy", f"{hostile}/legacy"),
                                    PodAddress("garbled", f"{hostile}/garbled")])
    try:
        [point], read = scraper.scrape({"tiny": "tiny"}, API_KEY, {"tiny"})["tiny"]
    finally:
        scraper.close()
    assert point["count"] == 3 and "sketches" not in point   # the legacy pod's counters
    assert (read.failed, read.error) == (1, "garbled: the sketches are not JSON")


@pytest.mark.parametrize("body, message", [
    ("{", "not JSON"),
    ('{"tiny": {}}', "not a list"),
    ('[{"model": "tiny", "version": "4"}]', "model, version and sketches"),
    ('[{"model": "tiny", "version": "4", "sketches": {"x[0]": [1, -2]}}]', "count -2"),
    ('[{"model": "tiny", "version": "4", "sketches": {"x[0]": [0, 0]}}]', "every count is 0"),
    ('[{"model": "tiny", "version": "4", "sketches": {"no name": [1, 2]}}]', "does not match"),
])
def test_what_is_not_sketches_is_one_line(body: str, message: str) -> None:
    with pytest.raises(ScrapeError, match=message):
        parse_sketches(body, "tiny")


def test_sketches_of_other_models_and_versions_are_left_out() -> None:
    rows = [{"model": "tiny", "version": "4", "sketches": {"x[0]": [1, 2]}},
            {"model": "other", "version": "4", "sketches": {"x[0]": [5, 5]}},
            {"model": "tiny", "version": "../x", "sketches": {"x[0]": [5, 5]}}]
    assert parse_sketches(json.dumps(rows), "tiny") == {"4": {"x[0]": [1, 2]}}


def test_a_pod_list_that_fails_is_reported_not_raised() -> None:
    def away(name: str) -> list[PodAddress]:
        raise RuntimeError("connection refused")

    scraper = Scraper(away)
    try:
        points, read = scraper.scrape({"tiny": "tiny"}, API_KEY)["tiny"]
    finally:
        scraper.close()
    assert points == [] and "pods not listed: connection refused" in read.error


@pytest.mark.parametrize("body, message", [
    ("edgefleet_serving_requests_total{model=tiny} 1", "labels"),
    ("edgefleet_serving_requests_total{model=\"tiny\",version=\"4\"} -3", "is -3.0"),
    ("edgefleet_serving_requests_total{model=\"tiny\",version=\"4\"} 1e300", r"is 1e\+300"),
    ("x y z w", "not in the Prometheus text format"),
])
def test_what_is_not_metrics_is_one_line(body: str, message: str) -> None:
    with pytest.raises(ScrapeError, match=message):
        parse(body, "tiny")


def test_other_models_and_versions_no_release_has_are_left_out() -> None:
    text = "\n".join([
        '# HELP edgefleet_serving_requests_total x',
        'edgefleet_serving_requests_total{model="tiny",version="4"} 9',
        'edgefleet_serving_requests_total{model="other",version="4"} 100',
        'edgefleet_serving_requests_total{model="tiny",version="../x"} 100',
        'edgefleet_serving_failures_total{model="tiny",version="4",reason="bad_request"} 1',
        'edgefleet_serving_failures_total{model="tiny",version="4",reason="internal"} 2',
        'something_else{a="b \\" c"} 3 1700000000',
    ])
    found = parse(text, "tiny")
    assert list(found) == ["4"]
    assert (found["4"].requests, found["4"].failures) == (9, 3)
