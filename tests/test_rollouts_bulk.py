"""Rollouts over a bigger fleet: three real agents plus 200 simulated devices
(`edgefleet sim`, agent/sim: the real protocol, real MQTT sessions, simulated
downloads and scoring), all on a real Mosquitto and a real hub.

Percentage waves are cut as documented and advance by themselves; a version whose
requests fail in the field (the simulator's error rate, seen through telemetry) is
stopped in its first wave by the health check and rolled back.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest

from agentproc import publish_version, wait_for
from hubproc import EDGEFLEET
from modelgen import make_onnx
from rolloutfleet import Fleet, parse_time, start_fleet

SIMULATED = 200


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("rollouts-bulk")
    fleet = start_fleet(base, agents=3)
    sim: subprocess.Popen[bytes] | None = None
    try:
        good = make_onnx(base / "models" / "model.onnx")
        assert [publish_version(fleet.hub, "tiny", good) for _ in range(3)] == [1, 2, 3]
        fleet.tag(fleet.agents, test="bulk")
        with open(base / "sim.log", "wb") as log:
            sim = subprocess.Popen(
                [*EDGEFLEET, "sim", "--devices", str(SIMULATED), "--hub", fleet.hub.url,
                 "--api-token", fleet.hub.admin_token, "--tag", "test=bulk",
                 "--data-dir", str(base / "sim"), "--telemetry-interval", "1", "--rps", "5",
                 "--step-latency", "0.05", "--error-rate", "tiny:3=0.5"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: len(fleet.get("/api/v1/devices", tag="test=bulk")) == SIMULATED + 3
                 and all(d["status"] == "online" for d in
                         fleet.get("/api/v1/devices", tag="test=bulk")),
                 timeout=120, what="every simulated device online")
        baseline = fleet.create("tiny:1", "--target", "test=bulk")["id"]
        fleet.wait_rollout(baseline, "completed", timeout=120)
        yield fleet
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGTERM)
            try:
                assert sim.wait(60) == 0, (base / "sim.log").read_text()[-3000:]
            finally:
                if sim.poll() is None:
                    sim.kill()
                    sim.wait()
        fleet.close()


@pytest.mark.slow
def test_percentage_waves_over_real_and_simulated_devices(fleet: Fleet) -> None:
    total = SIMULATED + 3
    rollout_id = fleet.create("tiny:2", "--target", "test=bulk", "--waves", "5%,25%,all",
                              "--soak", "1s", "--max-failures", "1%")["id"]
    # ceil(5% of 203) = 11, ceil(25%) = 51, then the rest.
    assert [w["devices"] for w in fleet.show(rollout_id)["waves_progress"]] == [11, 40, 152]
    record = fleet.wait_rollout(rollout_id, "completed", timeout=180)
    assert sum(w.get("serving", 0) for w in record["waves_progress"]) == total
    members = list(fleet.members(rollout_id).values())
    by_wave = {w: list(ds) for w, ds in itertools.groupby(
        sorted(members, key=lambda d: d["wave"]), key=lambda d: d["wave"])}
    for wave, following in itertools.pairwise(sorted(by_wave)):
        last_serving = max(parse_time(d["serving_at"]) for d in by_wave[wave])
        first_assigned = min(parse_time(d["assigned_at"]) for d in by_wave[following])
        assert first_assigned - last_serving >= timedelta(seconds=1)
    fleet.wait_serving(fleet.agents, "tiny", 2)


@pytest.mark.slow
def test_a_version_failing_in_the_field_is_caught_by_its_telemetry(fleet: Fleet) -> None:
    # tiny:3 passes every self-test, but half of the simulated devices' requests fail on it.
    rollout_id = fleet.create("tiny:3", "--target", "test=bulk", "--waves", "10%,all",
                              "--soak", "30s", "--max-failures", "5%", "--auto-rollback")["id"]
    record = fleet.wait_rollout(rollout_id, "rolled_back", timeout=120)
    assert "rolled back automatically" in record["reason"]
    members = fleet.members(rollout_id)
    first = [d for d in members.values() if d["wave"] == 1]
    assert len(first) == 21  # ceil(10% of 203)
    failed = [d for d in first if d["state"] == "failed"]
    assert len(failed) > 10  # floor(5% of 203) failures allowed
    for d in failed:
        assert d["error"].startswith("unhealthy: error rate"), d
    assert all(d["state"] == "pending" for d in members.values() if d["wave"] == 2)
    # Every wave-1 device has its previous version back.
    for d in first:
        desired = fleet.get(f"/api/v1/devices/{d['device_id']}/deployments")["desired"]
        assert [(x["name"], x["version"]) for x in desired] == [("tiny", 2)]
    wait_for(lambda: all(
        any(r["version"] == 2 and r["state"] == "serving" for r in
            fleet.get(f"/api/v1/devices/{d['device_id']}/deployments")["reported"])
        for d in first), what="the wave-1 devices serving version 2 again")
