"""Data drift end to end: a real hub and Mosquitto, simulated devices that count their
inputs with the agent's own sketch code, one group of them with a shifted feature.

The baseline is a sample the test draws; the PSI the hub reports is checked
against the test's own numpy computation from that sample and from the
sketches seen on the wire.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.mqtt import Message
from agent.sim import Fleet, SimOptions
from agent.sim.mqtt_lite import Client, ConnectOptions, parse_url
from agent.telemetry import SKETCHES, InferenceDeltas
from conftest import Cli
from contract import protocol
from contract.canonical import canonical_json
from hubproc import HubProcess, start_hub
from modelgen import LINEAR_B, LINEAR_W, make_onnx
from mosquitto import Mosquitto, start_mosquitto

FAST = {"telemetry_interval": 0.2, "step_latency": 0.05, "connect_jitter": 0.2, "keepalive": 10,
        "requests_per_second": 200}
SHIFT = 2.0  # added to x[0] on the shifted group's devices; the sample's x[0] has std 1


@dataclass
class Site:
    hub: HubProcess
    broker: Mosquitto
    cli: Cli
    sample: np.ndarray  # the baseline's x
    tokens: dict[str, str]  # group tag -> enrollment token

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.hub.url, timeout=30, headers={
            "Authorization": f"Bearer {self.hub.admin_token}"})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("drift")
    broker = start_mosquitto(base / "mosquitto")
    hub = start_hub(base / "data", extra_args=("--mqtt-url", broker.url,
                                               "--drift-interval-seconds", "1"))
    cli = Cli(hub, base)
    model = make_onnx(base / "model.onnx")
    x = np.random.default_rng(7).normal(size=(5000, 3))
    np.savez(base / "sample.npz", x=x, y=x @ LINEAR_W + LINEAR_B)
    for version in (1, 2):  # 1 with a baseline from the start; 2 for the refusals
        extra = ("--baseline", str(base / "sample.npz")) if version == 1 else ()
        cli.run("model", "register", str(model), "--name", "tiny", *extra)
    cli.run("package", "build", "tiny:1", "--no-deps", "--platform", "linux/arm64")
    tokens = {}
    with httpx.Client(base_url=hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
        for group in ("shifted", "steady"):
            answer = api.post("/api/v1/enrollment-tokens", json={"tags": {"group": group}})
            tokens[group] = answer.raise_for_status().json()["token"]
    yield Site(hub, broker, cli, x, tokens)
    assert hub.stop() == 0, hub.log()
    broker.stop()


def direct_psi(sample: np.ndarray, observed: np.ndarray) -> float:
    """PSI as the textbook gives it, on the sample's deciles (empty shares floored at 1e-4)."""
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, 11)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, sample, side="right"), minlength=len(edges) + 1)
    p = np.maximum(expected / expected.sum(), 1e-4)
    q = np.maximum(observed / observed.sum(), 1e-4)
    return float(np.sum((q - p) * np.log(q / p)))


def test_a_baseline_that_does_not_match_the_signature_is_refused(site: Site,
                                                                  tmp_path: Path) -> None:
    np.save(tmp_path / "four.npy", np.ones((100, 4)))
    done = site.cli.run("model", "baseline", "tiny:2", str(tmp_path / "four.npy"), ok=False)
    assert done.returncode != 0
    assert "x has 3 column(s)" in done.stdout + done.stderr
    np.savez(tmp_path / "named.npz", z=np.ones((100, 3)))
    done = site.cli.run("model", "baseline", "tiny:2", str(tmp_path / "named.npz"), ok=False)
    assert "has array(s) z, which tiny:2 has no input or output of" in done.stdout + done.stderr
    # The hub checks too, whatever the client: a tensor the model does not have.
    feature = {"side": "input", "tensor": "z", "column": 0, "edges": [0.0], "counts": [1, 1],
               "count": 2, "mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0}
    with httpx.Client(base_url=site.hub.url, headers={
            "Authorization": f"Bearer {site.hub.admin_token}"}) as api:
        answer = api.put("/api/v1/models/tiny/versions/2/baseline", json={"features": [feature]})
        assert answer.status_code == 422, answer.text
        assert "the model has no input named 'z' (it has x)" in answer.text
        answer = api.put("/api/v1/models/tiny/versions/2/baseline",
                         json={"features": [{**feature, "tensor": "x", "counts": [1, -1]}]})
        assert answer.status_code == 422, answer.text
        assert api.get("/api/v1/models/tiny/versions/2/baseline").status_code == 404


def _wire_counts(seen: list[protocol.TelemetryBatch], ids: set[str]) -> dict[str, np.ndarray]:
    totals: dict[str, np.ndarray] = {}
    for batch in seen:
        if batch.device_id not in ids:
            continue
        for point in batch.points:
            for name, counts in point.sketches.items():
                totals[name] = totals.get(name, 0) + np.asarray(counts)
    return totals


def test_a_shifted_feature_drifts_and_the_others_do_not(site: Site, tmp_path: Path) -> None:
    seen: list[protocol.TelemetryBatch] = []

    def keep(message: Any) -> None:
        device, _ = protocol.parse_topic(message.topic)
        seen.append(protocol.parse_telemetry(message.payload, device_id=device))

    async def body() -> dict[str, set[str]]:
        watcher = Client(*parse_url(site.broker.url), ConnectOptions("watcher-drift"),
                         on_message=keep)
        await watcher.connect()
        await watcher.subscribe([(f, 1) for f in protocol.HUB_SUBSCRIPTIONS
                                 if f.endswith("/telemetry")])
        shifted = Fleet(site.hub.url, site.tokens["shifted"], 3, SimOptions(
            data_dir=tmp_path / "a", name_prefix="a-", drift={"x[0]": SHIFT}, **FAST))
        steady = Fleet(site.hub.url, site.tokens["steady"], 3, SimOptions(
            data_dir=tmp_path / "b", name_prefix="b-", **FAST))
        async with site.api() as api, shifted, steady:
            for fleet in (shifted, steady):
                await fleet.wait(lambda f: f.connected == 3, timeout=15, what="connected")
                for device in fleet.devices:
                    answer = await api.post(f"/api/v1/devices/{device.id}/deployments",
                                            json={"model": "tiny", "version": 1})
                    assert answer.status_code == 201, answer.text
            for fleet in (shifted, steady):
                await fleet.wait(lambda f: all(d.versions() == {"tiny": 1} for d in f.devices),
                                 timeout=15, what="tiny:1 everywhere")
                await fleet.wait(lambda f: all(d.sketch_specs for d in f.devices),
                                 timeout=15, what="the bins in the desired state")
            await asyncio.sleep(3)
        await asyncio.sleep(1)  # the last batches on their way to the hub
        await watcher.disconnect()
        return {"shifted": {d.id for d in shifted.devices},
                "steady": {d.id for d in steady.devices}}

    groups = asyncio.run(asyncio.wait_for(body(), 60))
    baseline = site.cli.json("model", "drift", "tiny:1", "--target", "group=shifted")
    assert isinstance(baseline, dict)
    by_feature = {f["feature"]: f for f in baseline["features"]}
    assert set(by_feature) == {"x[0]", "x[1]", "x[2]", "y[0]", "y[1]"}
    wire = _wire_counts(seen, groups["shifted"])
    x0 = by_feature["x[0]"]
    assert x0["drifted"] and x0["observed"] == int(wire["x[0]"].sum()) > 1000
    assert x0["psi"] == pytest.approx(direct_psi(site.sample[:, 0], wire["x[0]"]), rel=1e-9)
    assert x0["psi"] > 1 and 0.3 < x0["js_distance"] <= 1
    for name in ("x[1]", "x[2]"):
        column = site.sample[:, int(name[2])]
        assert by_feature[name]["psi"] == pytest.approx(direct_psi(column, wire[name]), rel=1e-9)
        assert not by_feature[name]["drifted"] and by_feature[name]["psi"] < 0.05
    steady = site.cli.json("model", "drift", "tiny:1", "--target", "group=steady")
    assert isinstance(steady, dict)
    assert not any(f["drifted"] for f in steady["features"])
    assert all(f["observed"] > 1000 for f in steady["features"])
    table = site.cli.run("model", "drift", "tiny:1").stdout
    assert "DRIFT" in table and "x[0]" in table

    # One event per version, target and feature that starts drifting: the schedule (every
    # second here) judged all devices, the first command above the shifted group.
    with httpx.Client(base_url=site.hub.url, headers={
            "Authorization": f"Bearer {site.hub.admin_token}"}) as api:
        found = api.get("/api/v1/events", params={"type": "drift.detected"}).json()["events"]
    assert sorted((e["subject"], e["detail"].split(":")[0], "target group=shifted" in e["detail"])
                  for e in found) == [("tiny:1", "input x[0]", False),
                                      ("tiny:1", "input x[0]", True)]

    # Fixed once deployed: devices count into the bins they were given.
    done = site.cli.run("model", "baseline", "tiny:1", str(site.hub.data_dir.parent / "sample.npz"),
                        ok=False)
    assert done.returncode != 0 and "already has a baseline" in done.stdout + done.stderr


def test_malformed_sketches_are_dropped_and_counted(site: Site) -> None:
    """A point whose sketches are bad keeps its values; each bad sketch is dropped alone."""
    with httpx.Client(base_url=site.hub.url, headers={
            "Authorization": f"Bearer {site.hub.admin_token}"}) as api:
        device = next(d["id"] for d in api.get("/api/v1/devices").json()
                      if d["tags"].get("group") == "steady")
        seq = 50_000_000
        point = {"seq": seq, "at": protocol.format_time(datetime.now(UTC)), "kind": "inference",
                 "values": {"deployment": "tiny", "version": 1, "count": 5, "errors": 0},
                 "sketches": {"x[0]": [1, 2],                    # 2 bins: the baseline has 10
                              "x[1]": [-1] + [1] * 9,            # a negative count
                              "x[2]": [10**15] + [1] * 9,        # absurdly many
                              "q[0]": [1, 1],                    # no such feature
                              "y[0]": [1] * 10}}                 # good
        payload = canonical_json({"schema": protocol.TELEMETRY_SCHEMA, "device_id": device,
                                  "seq_from": seq, "seq_to": seq, "points": [point]})

        async def publish() -> None:
            client = Client(*parse_url(site.broker.url), ConnectOptions("drift-bad"))
            await client.connect()
            await client.publish(Message(protocol.telemetry_topic(device), payload))
            await client.disconnect()

        before = _metrics(api)
        asyncio.run(publish())

        def counted() -> dict[str, float] | None:
            now = _metrics(api)
            return now if now.get("malformed", 0) - before.get("malformed", 0) >= 3 else None

        after = _poll(counted)
        assert after.get("no_baseline", 0) - before.get("no_baseline", 0) == 1
        stored = api.get(f"/api/v1/devices/{device}/telemetry",
                         params={"kind": "inference", "limit": 100_000}).json()
        assert any(p["seq"] == seq for p in stored)  # the point itself is kept
    assert "drift sketch(es) from" in site.hub.log()


def test_a_resent_point_is_counted_once(site: Site) -> None:
    """After a reconnect an agent sends its unacknowledged points again, maybe in a larger
    batch with newer ones: only the newer ones' sketches are added."""
    with httpx.Client(base_url=site.hub.url, headers={
            "Authorization": f"Bearer {site.hub.admin_token}"}) as api:
        device = next(d["id"] for d in api.get("/api/v1/devices").json()
                      if d["tags"].get("group") == "steady")

        def observed() -> int:
            report = api.get("/api/v1/models/tiny/versions/1/drift",
                             params={"target": f"id={device}"}).json()
            return next(f["observed"] for f in report["features"] if f["feature"] == "y[1]")

        def point(seq: int, count: int) -> dict[str, Any]:
            return {"seq": seq, "at": protocol.format_time(datetime.now(UTC)),
                    "kind": "inference", "values": {"deployment": "tiny", "version": 1},
                    "sketches": {"y[1]": [count] * 10}}

        def payload(*points: dict[str, Any]) -> bytes:
            return canonical_json({"schema": protocol.TELEMETRY_SCHEMA, "device_id": device,
                                   "seq_from": points[0]["seq"], "seq_to": points[-1]["seq"],
                                   "points": list(points)})

        async def publish(*payloads: bytes) -> None:
            client = Client(*parse_url(site.broker.url), ConnectOptions("drift-resend"))
            await client.connect()
            for body in payloads:
                await client.publish(Message(protocol.telemetry_topic(device), body))
            await client.disconnect()

        api.patch(f"/api/v1/devices/{device}/tags", json={"set": {"id": device}}).raise_for_status()
        before = observed()
        first, second = point(60_000_000, 1), point(60_000_001, 2)
        asyncio.run(publish(payload(first), payload(first), payload(first, second)))
        _poll(lambda: observed() >= before + 30, timeout=15)
        time.sleep(1)  # anything counted twice would have arrived by now
        assert observed() == before + 10 + 20


def _metrics(api: httpx.Client) -> dict[str, float]:
    text = api.get("/metrics").text
    found = {}
    for line in text.splitlines():
        if line.startswith("edgefleet_ingest_sketches_dropped_total{"):
            labels, value = line.rsplit(" ", 1)
            found[json.loads(labels.split("reason=")[1].rstrip("}"))] = float(value)
    return found


def _poll(check: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def test_the_agent_sends_the_sketch_counts_that_moved() -> None:
    """The serving process's counts are cumulative; each inference point carries what
    moved since the last read, and after a restart of the serving process, all of them."""
    deltas = InferenceDeltas()

    def read(requests: int, x0: list[int], y1: list[int]) -> dict[str, Any]:
        (point,) = deltas.points([{
            "model": "tiny", "version": "1", "requests": requests, "failures": 0,
            "latency_buckets": [0.1, None], "latency_counts": [requests, 0],
            "latency_sum": 0.01 * requests, "sketches": {"x[0]": x0, "y[1]": y1}}])
        return point

    assert read(3, [1, 2], [0, 3])[SKETCHES] == {"x[0]": [1, 2], "y[1]": [0, 3]}
    assert read(5, [1, 4], [0, 3])[SKETCHES] == {"x[0]": [0, 2]}  # y[1] did not move
    assert read(9, [2, 0], [1, 1])[SKETCHES] == {"x[0]": [2, 0], "y[1]": [1, 1]}  # restarted
