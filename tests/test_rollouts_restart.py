"""A hub killed with SIGKILL in the middle of a rollout resumes it where it was.

Real parts: Mosquitto (it stays up, keeping the retained desired states), the hub
killed and started again on the same data dir and REST port (the agents fetch
packages from the URL they enrolled with), three real agents.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from datetime import timedelta

import pytest

from agentproc import publish_version, wait_for
from modelgen import make_onnx
from rolloutfleet import Fleet, parse_time, start_fleet


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("rollouts-restart")
    fleet = start_fleet(base, agents=3)
    try:
        good = make_onnx(base / "models" / "model.onnx")
        assert [publish_version(fleet.hub, "tiny", good) for _ in range(2)] == [1, 2]
        yield fleet
    finally:
        fleet.close()


@pytest.mark.slow
def test_a_hub_killed_mid_rollout_resumes_where_it_was(fleet: Fleet) -> None:
    agents = fleet.agents
    fleet.tag(agents, test="restart")
    fleet.deploy(agents, "tiny:1", "restart")
    rollout_id = fleet.create("tiny:2", "--deployment", "restart", "--target", "test=restart",
                              "--waves", "1,2,all", "--soak", "6s")["id"]
    # Kill it while wave 1 soaks: its device serves, wave 2 is not assigned yet.
    members = wait_for(lambda: (m := fleet.members(rollout_id)) and any(
        d["wave"] == 1 and d["state"] == "serving" for d in m.values()) and m,
        what="wave 1 serving")
    record = fleet.show(rollout_id)
    assert (record["state"], record["current_wave"]) == ("running", 1)
    first = next(d for d in members.values() if d["wave"] == 1)
    generation = fleet.get(f"/api/v1/devices/{first['device_id']}")["desired_generation"]
    fleet.restart_hub(signal.SIGKILL)

    record = fleet.wait_rollout(rollout_id, "completed", timeout=120)
    fleet.wait_serving(agents, "restart", 2)
    after = fleet.members(rollout_id)
    # Wave 1 was not started again: same assignment, same desired generation, soaked once.
    assert after[first["device_id"]]["assigned_at"] == first["assigned_at"]
    assert after[first["device_id"]]["serving_at"] == first["serving_at"]
    assert fleet.get(f"/api/v1/devices/{first['device_id']}")["desired_generation"] == generation
    ordered = sorted(after.values(), key=lambda d: d["wave"])
    assert [(d["wave"], d["state"]) for d in ordered] == [(1, "serving"), (2, "serving"),
                                                          (3, "serving")]
    for before, later in itertools.pairwise(ordered):
        gap = parse_time(later["assigned_at"]) - parse_time(before["serving_at"])
        assert gap >= timedelta(seconds=6), (before, later)
    waves = [e["detail"] for e in fleet.audit(rollout_id) if e["action"] == "rollout.wave"]
    assert waves == [f"wave {n}: 1 device(s)" for n in (1, 2, 3)]
    shown = fleet.cli.run("rollout", "watch", rollout_id)
    assert "Summary: completed; 3/3 serving, 0 failed" in shown.stdout
