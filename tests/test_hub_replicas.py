"""Two hub replicas on one PostgreSQL database and one Mosquitto, with a simulated fleet.

Both replicas answer the API; one leads the rollout engine (hub/leader.py). The
test kills that one outright in the middle of a rollout in waves: the other takes
the lead within seconds and finishes the rollout. The killed replica is started
again, as a supervisor would, under its own data dir: what devices sent live is
shared between the replicas by an MQTT shared subscription, and Mosquitto keeps
handing the dead member of the group its share (QoS 1, in its persistent session)
until it is back; then it gets those, and the ones it had in flight when it died,
again. In the end the database holds every telemetry point the simulator measured,
each device's sequence numbers 1..N with no gap, each once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from conftest import Cli
from hub.storage.db import Database
from hubproc import EDGEFLEET, HubProcess, start_hub
from modelgen import make_onnx
from mosquitto import Mosquitto, start_mosquitto

DEVICES = 20
T = TypeVar("T")


def until(check: Callable[[], T], what: str, timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def replica(base: Path, name: str, broker: Mosquitto, database: str) -> HubProcess:
    return start_hub(base / name, extra_args=(
        "--database-url", database, "--mqtt-url", broker.url, "--shared-dir",
        str(base / "shared"), "--heartbeat-seconds", "1"))


def leads(hub: HubProcess) -> bool:
    return hub.log().count("this hub now leads") > hub.log().count(
        "this hub no longer leads")


class Api:
    def __init__(self, hub: HubProcess) -> None:
        self.hub = hub

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with httpx.Client(base_url=self.hub.url, timeout=30, verify=self.hub.verify, headers={
                "Authorization": f"Bearer {self.hub.admin_token}"}) as client:
            answer = client.request(method, path, **kwargs)
        answer.raise_for_status()
        return answer.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def serving(self) -> dict[str, int | None]:
        """Device id -> the version of "tiny" it reports serving."""
        found = {}
        for device in self.get("/api/v1/devices"):
            rows = self.get(f"/api/v1/devices/{device['id']}/deployments")["reported"]
            found[device["id"]] = next((r["version"] for r in rows if r["name"] == "tiny"
                                        and r["state"] == "serving"), None)
        return found


def rollout(api: Api, version: int, waves: str, soak: str) -> str:
    made = api.post("/api/v1/rollouts", json={
        "model": "tiny", "version": version, "target": {"site": "replicas"},
        "waves": waves, "soak": soak})
    return str(made["id"])


def completed(api: Api, rollout_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (record := api.get(f"/api/v1/rollouts/{rollout_id}", devices="true"))[
            "state"] != "completed":
        assert time.monotonic() < deadline, json.dumps([
            (d["device_id"], d["state"], api.get(f"/api/v1/devices/{d['device_id']}/deployments"))
            for d in record["devices"] if d["state"] not in ("serving", "pending")])
        time.sleep(0.2)


@pytest.fixture
def site(tmp_path: Path, postgres_url: str) -> Iterator[tuple[Path, Mosquitto]]:
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield tmp_path, broker
    broker.stop()


def test_the_engine_moves_when_its_replica_dies_and_no_point_is_lost_or_doubled(
        site: tuple[Path, Mosquitto], postgres_url: str) -> None:
    base, broker = site
    hubs = {"a": replica(base, "a", broker, postgres_url)}
    hubs["b"] = replica(base, "b", broker, postgres_url)
    sim: subprocess.Popen[bytes] | None = None
    try:
        api = Api(hubs["b"])
        model = make_onnx(base / "model.onnx")
        cli = Cli(hubs["a"], base)
        for version in (1, 2):
            digest = api.post("/api/v1/blobs", content=model.read_bytes())["digest"]
            api.post("/api/v1/models/tiny/versions", json={
                "files": [{"path": "model.onnx", "digest": digest}]})
            cli.run("package", "build", f"tiny:{version}", "--no-deps", "--platform",
                    "linux/arm64")  # through replica a: one blob directory for both
        env = {**os.environ, **({"EDGEFLEET_CA": str(hubs["a"].ca_path)}
                                if hubs["a"].tls else {})}
        with open(base / "sim.log", "wb") as log:
            sim = subprocess.Popen(
                [*EDGEFLEET, "sim", "--devices", str(DEVICES), "--hub", hubs["a"].url,
                 "--api-token", hubs["a"].admin_token, "--tag", "site=replicas",
                 "--data-dir", str(base / "sim"), "--telemetry-interval", "0.2",
                 "--step-latency", "0.02"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        until(lambda: sum(d["status"] == "online" for d in api.get("/api/v1/devices"))
              == DEVICES, "the simulated devices online")
        first = rollout(api, 1, "100%", "0s")
        completed(api, first, timeout=30)

        second = rollout(api, 2, "20%,50%,100%", "3s")
        until(lambda: api.get(f"/api/v1/rollouts/{second}")["current_wave"] >= 1,
              "the second wave")
        name = until(lambda: next((n for n, h in hubs.items() if leads(h)), None),
                     "a leader")
        other = "b" if name == "a" else "a"
        hubs[name].stop(signal.SIGKILL)
        killed = time.monotonic()
        until(lambda: leads(hubs[other]), "the other replica to lead", timeout=10)
        took_over = time.monotonic() - killed
        hubs[name] = replica(base, name, broker, postgres_url)  # a supervisor restarts it
        api = Api(hubs[other])
        completed(api, second, timeout=60)
        assert set(api.serving().values()) == {2}
        assert took_over < 10

        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=30) == 0, (base / "sim.log").read_text()
        sim = None
        measured = {name: saved["next_seq"] - 1 for name, saved in json.loads(
            (base / "sim" / "sim-state.json").read_text()).items()}
        db = Database(postgres_url)

        def stored() -> dict[str, tuple[int, int, int]]:
            rows = db.query("SELECT d.name, COUNT(*) AS n, MIN(t.seq) AS low, MAX(t.seq) AS high"
                            " FROM telemetry t JOIN devices d ON d.id = t.device_id"
                            " GROUP BY d.name")
            return {r["name"]: (r["n"], r["low"], r["high"]) for r in rows}

        want = {name: (count, 1, count) for name, count in measured.items()}
        deadline = time.monotonic() + 20  # the restarted replica drains its share
        while (found := stored()) != want and time.monotonic() < deadline:
            time.sleep(0.2)
        db.close()
        assert found == want  # (points, lowest seq, highest seq) per device
        ingest = [Api(h).get("/api/v1/fleet/status")["ingest"] for h in hubs.values()]
        print(f"took over after {took_over:.1f} s; {sum(measured.values())} points; "
              f"per replica since its start: points {[i['telemetry_points'] for i in ingest]}, "
              f"delivered again {[i['duplicate_points'] for i in ingest]}, stale reports "
              f"{[i['dropped'].get('reported', {}).get('stale', 0) for i in ingest]}")
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=30)
        for hub in hubs.values():
            hub.stop()
