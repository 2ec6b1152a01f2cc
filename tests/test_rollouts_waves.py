"""Rollouts that go well, end to end: waves that advance by themselves, devices that
join the target later, and two deployments rolled out side by side on the same devices.

Real parts only: Mosquitto, `edgefleet hub serve --mqtt-url`, three (and later
four) `edgefleet agent run` processes; the CLI and REST API as a user drives them
(tests/rolloutfleet.py).
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest

from agentproc import publish_version, wait_for
from hubproc import EDGEFLEET
from modelgen import make_failing_onnx, make_onnx
from rolloutfleet import Fleet, parse_time, start_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("rollouts-waves")
    fleet = start_fleet(base, agents=3)
    good = make_onnx(base / "models" / "model.onnx")
    failing = make_failing_onnx(base / "models" / "failing.onnx")
    try:
        assert [publish_version(fleet.hub, "tiny", good) for _ in range(2)] == [1, 2]
        for name in ("detector", "classifier"):
            assert [publish_version(fleet.hub, name, good) for _ in range(2)] == [1, 2]
        assert publish_version(fleet.hub, "classifier", failing) == 3
        yield fleet
    finally:
        fleet.close()


def test_waves_advance_by_themselves_to_every_device(fleet: Fleet) -> None:
    agents = fleet.agents[:3]
    fleet.tag(agents, test="waves")
    fleet.deploy(agents, "tiny:1", "waves")
    record = fleet.create("tiny:2", "--deployment", "waves", "--target", "test=waves",
                          "--waves", "1,2,all", "--soak", "2s")
    rollout_id = record["id"]
    assert [w["devices"] for w in record["waves_progress"]] == [1, 1, 1]
    watch = subprocess.Popen(
        [*EDGEFLEET, "rollout", "watch", rollout_id, "--interval", "0.5", "--timeout", "120"],
        env=fleet.cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # While it runs: no device of a later wave is assigned before the earlier waves serve.
        def finished() -> bool:
            record = fleet.show(rollout_id)
            by_wave: dict[int, list[str]] = {}
            for d in record["devices"]:
                by_wave.setdefault(d["wave"], []).append(d["state"])
            for wave, states in by_wave.items():
                if any(s != "pending" for s in states):
                    earlier = [s for w, ss in by_wave.items() if w < wave for s in ss]
                    assert all(s == "serving" for s in earlier), record
            return record["state"] == "completed"

        wait_for(finished, timeout=120, what=f"{rollout_id} to complete")
        out, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
        watch.wait()
    assert watch.returncode == 0, out + err
    assert "Summary: completed; 3/3 serving, 0 failed" in out

    # Each wave started only once the one before it served and had soaked for 2 s, and
    # the agents' own reports agree: the wave-1 device said "serving" before wave 2 began.
    members = sorted(fleet.members(rollout_id).values(), key=lambda d: d["wave"])
    assert [(d["wave"], d["state"], d["previous_version"]) for d in members] == [
        (1, "serving", 1), (2, "serving", 1), (3, "serving", 1)]
    for before, after in itertools.pairwise(members):
        gap = parse_time(after["assigned_at"]) - parse_time(before["serving_at"])
        assert gap >= timedelta(seconds=2), (before, after)
    by_id = {a.device_id: a for a in agents}
    first = by_id[members[0]["device_id"]]
    reported_serving = parse_time(fleet.reported(first, "waves")[2]["since"])
    assert reported_serving < parse_time(members[1]["assigned_at"])

    # Every device serves version 2: in what it reports, in its own state, and when asked.
    fleet.wait_serving(agents, "waves", 2)
    for agent in agents:
        assert fleet.desired(agent, "waves")["rollout_id"] == rollout_id
        assert fleet.reported(agent, "waves").keys() == {2}

    listed = {r["id"]: r for r in fleet.cli.json("rollout", "list")}
    assert (listed[rollout_id]["state"], listed[rollout_id]["serving"]) == ("completed", 3)
    engine = [(e["action"], e["detail"]) for e in fleet.audit(rollout_id)
              if e["actor"] == "rollout-engine"]
    assert engine == [("rollout.running", ""), ("rollout.wave", "wave 1: 1 device(s)"),
                      ("rollout.wave", "wave 2: 1 device(s)"),
                      ("rollout.wave", "wave 3: 1 device(s)"), ("rollout.completed", "")]
    assert ("admin", "rollout.create") in [(e["actor"], e["action"])
                                           for e in fleet.audit(rollout_id)]
    shown = fleet.cli.run("rollout", "show", rollout_id, "--devices").stdout
    assert "completed" in shown and all(a.device_id in shown for a in agents)


def test_a_device_that_joins_the_target_later_gets_the_newest_version(fleet: Fleet) -> None:
    agents = fleet.agents[:3]
    fleet.tag(agents, test="late")
    first = fleet.create("tiny:1", "--deployment", "late", "--target", "test=late")["id"]
    fleet.wait_rollout(first, "completed")
    second = fleet.create("tiny:2", "--deployment", "late", "--target", "test=late")["id"]
    fleet.wait_rollout(second, "completed")
    fleet.wait_serving(agents, "late", 2)

    # A new device enrolls with a token that carries the target's tag.
    (late,) = fleet.start_agents(1, tags={"test": "late"})
    fleet.wait_serving([late], "late", 2)
    wait_for(lambda: fleet.members(second).get(late.device_id, {}).get("state") == "serving",
             what="the newest rollout counting the late device as serving")
    row = fleet.members(second)[late.device_id]
    assert (row["wave"], row["previous_version"]) == (1, None)
    record = fleet.show(second)
    assert (record["state"], sum(w.get("serving", 0) for w in record["waves_progress"])) == (
        "completed", 4)
    # Straight to version 2: the older, superseded rollout did not hand it version 1 first.
    assert late.device_id not in fleet.members(first)
    # And the superseded rollout's record stays what it was when it completed.
    assert [(d["state"], d["error"]) for d in fleet.members(first).values()] == [
        ("serving", None)] * 3
    device = fleet.get(f"/api/v1/devices/{late.device_id}")
    assert device["desired_generation"] == 1
    assert 1 not in fleet.reported(late, "late")


def test_two_deployments_roll_out_independently_on_the_same_devices(fleet: Fleet) -> None:
    agents = fleet.agents[:3]
    fleet.tag(agents, test="two")
    for name in ("detector", "classifier"):
        fleet.deploy(agents, f"{name}:1", name)
    # At the same time: a good detector in two waves, and a classifier that fails its
    # self-test on the first device, which rolls the classifier back and only that.
    detector = fleet.create("detector:2", "--target", "test=two", "--waves", "1,all",
                            "--soak", "1s")["id"]
    broken = fleet.create("classifier:3", "--target", "test=two", "--waves", "1,all",
                          "--max-failures", "0", "--auto-rollback")["id"]
    fleet.wait_rollout(broken, "rolled_back")
    fleet.wait_rollout(detector, "completed")
    fleet.wait_serving(agents, "detector", 2)
    fleet.wait_serving(agents, "classifier", 1)
    # Then a good classifier: both deployments serve their new versions, side by side.
    classifier = fleet.create("classifier:2", "--target", "test=two")["id"]
    fleet.wait_rollout(classifier, "completed")
    fleet.wait_serving(agents, "classifier", 2)
    for agent in agents:
        assert (fleet.score(agent, "detector"), fleet.score(agent, "classifier")) == ("2", "2")
        assert {d["name"]: d["rollout_id"] for d in fleet.get(
            f"/api/v1/devices/{agent.device_id}/deployments")["desired"]
            if d["name"] in ("detector", "classifier")} == {"detector": detector,
                                                             "classifier": classifier}
