"""Rollouts when things go wrong or people step in, end to end: a broken version stopped
at the first wave and rolled back, devices offline during a rollout, pause / resume /
abort from the CLI, and two rollouts competing for one deployment by priority.

Real parts only: Mosquitto, `edgefleet hub serve --mqtt-url`, three
`edgefleet agent run` processes (tests/rolloutfleet.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from agentproc import publish_version, wait_for
from modelgen import make_failing_onnx, make_onnx
from rolloutfleet import Fleet, parse_time, start_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("rollouts-control")
    fleet = start_fleet(base, agents=3)
    good = make_onnx(base / "models" / "model.onnx")
    failing = make_failing_onnx(base / "models" / "failing.onnx")
    try:
        # tiny:1, 2 and 4 work; tiny:3 loads but fails every request, so its self-test fails.
        for model, version in ((good, 1), (good, 2), (failing, 3), (good, 4)):
            assert publish_version(fleet.hub, "tiny", model) == version
        yield fleet
    finally:
        fleet.close()


def hub_seconds_since(stamp: str) -> float:
    return (datetime.now(UTC) - parse_time(stamp)).total_seconds()


def test_a_broken_version_stops_at_the_first_wave_and_is_rolled_back(fleet: Fleet) -> None:
    agents = fleet.agents[:3]
    fleet.tag(agents, test="broken")
    fleet.deploy(agents, "tiny:2", "broken")
    generations = {a.device_id: fleet.get(f"/api/v1/devices/{a.device_id}")["desired_generation"]
                   for a in agents}
    rollout_id = fleet.create("tiny:3", "--deployment", "broken", "--target", "test=broken",
                              "--waves", "1,2,all", "--max-failures", "0", "--auto-rollback")["id"]
    record = fleet.wait_rollout(rollout_id, "rolled_back")
    assert "1 device(s) failed" in record["reason"] and "rolled back" in record["reason"]

    members = sorted(fleet.members(rollout_id).values(), key=lambda d: d["wave"])
    first, later = members[0], members[1:]
    by_id = {a.device_id: a for a in agents}
    agent = by_id[first["device_id"]]
    # The agent's own words about the failure reach the rollout.
    error = fleet.reported(agent, "broken")[3]["error"]
    assert error and "self-test" in error.lower(), fleet.reported(agent, "broken")
    assert (first["wave"], first["state"], first["error"]) == (1, "failed", error)
    assert record["failed_devices"] == [{"device_id": agent.device_id, "wave": 1,
                                         "state": "failed", "error": error}]
    # Later waves were never assigned: same desired state as before, never a sight of v3.
    assert [(d["state"], d["assigned_at"]) for d in later] == [("pending", None)] * 2
    for d in later:
        other = by_id[d["device_id"]]
        device = fleet.get(f"/api/v1/devices/{other.device_id}")
        assert device["desired_generation"] == generations[other.device_id]
        assert fleet.reported(other, "broken").keys() == {2}
    # The wave-1 device is given version 2 back and serves it.
    desired = fleet.desired(agent, "broken")
    assert (desired["version"], desired["rollout_id"]) == (2, None)
    fleet.wait_serving(agents, "broken", 2)
    assert fleet.reported(agent, "broken")[3]["state"] == "rolled_back"

    shown = fleet.cli.run("rollout", "show", rollout_id).stdout
    assert "rolled_back" in shown and agent.device_id in shown
    assert error[:40] in " ".join(shown.split())
    watched = fleet.cli.run("rollout", "watch", rollout_id, ok=False)
    assert watched.returncode == 3 and "Summary: rolled_back" in watched.stdout
    actions = [e["action"] for e in fleet.audit(rollout_id) if e["actor"] == "rollout-engine"]
    assert actions[-2:] == ["rollout.paused", "rollout.rolled_back"]
    assert actions.count("rollout.wave") == 1

    # Tried again while that device is offline: what it reported about the last attempt
    # is old news, so the rollout waits for it rather than failing it at once.
    fleet.tag([agent], retry="yes")
    agent.stop()
    wait_for(lambda: fleet.get(f"/api/v1/devices/{agent.device_id}")["status"] == "offline",
             what="the device offline")
    retry = fleet.create("tiny:3", "--deployment", "broken", "--target", "retry=yes",
                         "--max-failures", "0")["id"]
    wait_for(lambda: fleet.members(retry)[agent.device_id]["state"] == "assigned",
             what="the retry assigned")
    time.sleep(3)  # a few engine ticks
    assert fleet.members(retry)[agent.device_id]["state"] == "assigned"
    assert fleet.show(retry)["state"] == "running"
    agent = fleet.restart_agent(agent)
    record = fleet.wait_rollout(retry, "paused")
    assert record["failed_devices"][0]["device_id"] == agent.device_id
    fleet.wait_serving([agent], "broken", 2)
    fleet.cli.run("rollout", "abort", retry)


def test_a_device_offline_during_the_rollout_converges_when_it_returns(fleet: Fleet) -> None:
    agents = fleet.agents[:3]
    fleet.tag(agents, test="offline")
    fleet.deploy(agents, "tiny:1", "offline")
    online, away = agents[:2], agents[2]
    away.stop()
    wait_for(lambda: fleet.get(f"/api/v1/devices/{away.device_id}")["status"] == "offline",
             what="the device offline")

    # A long device timeout: the rollout waits for the device that is away.
    rollout_id = fleet.create("tiny:2", "--deployment", "offline", "--target", "test=offline",
                              "--device-timeout", "10m")["id"]
    fleet.wait_serving(online, "offline", 2)
    wait_for(lambda: all(fleet.members(rollout_id)[a.device_id]["state"] == "serving"
                         for a in online), what="the online devices counted as serving")
    assert fleet.show(rollout_id)["state"] == "running"
    assert fleet.members(rollout_id)[away.device_id]["state"] == "assigned"
    away = fleet.restart_agent(away)
    fleet.wait_rollout(rollout_id, "completed")
    fleet.wait_serving(agents, "offline", 2)

    # A short one: the device away counts as failed (one failure allowed), the rollout
    # completes without it, and when it is back it converges and counts as serving. Short,
    # but not so short that a loaded machine makes an online device miss it too.
    away.stop(signal.SIGKILL)
    wait_for(lambda: fleet.get(f"/api/v1/devices/{away.device_id}")["status"] == "offline",
             what="the last will")
    rollout_id = fleet.create("tiny:4", "--deployment", "offline", "--target", "test=offline",
                              "--device-timeout", "10s", "--max-failures", "1")["id"]
    record = fleet.wait_rollout(rollout_id, "completed")
    (failed,) = record["failed_devices"]
    assert failed["device_id"] == away.device_id
    assert "no answer within the device timeout (10s)" in failed["error"]
    away = fleet.restart_agent(away)
    fleet.wait_serving(agents, "offline", 4)
    wait_for(lambda: fleet.members(rollout_id)[away.device_id]["state"] == "serving",
             what="the returned device counted as serving")
    assert fleet.show(rollout_id)["failed_devices"] == []


def test_pause_resume_and_abort_from_the_cli(fleet: Fleet) -> None:
    agents = fleet.agents[:3]
    fleet.tag(agents, test="control")
    fleet.deploy(agents, "tiny:1", "control")
    rollout_id = fleet.create("tiny:2", "--deployment", "control", "--target", "test=control",
                              "--waves", "1,2,all", "--soak", "6s")["id"]
    wait_for(lambda: fleet.show(rollout_id)["current_wave"] == 1, what="wave 1")
    paused = fleet.cli.run("rollout", "pause", rollout_id).stdout
    assert "paused" in paused and "paused by admin" in paused

    # Paused: wave 1 finishes its update and soaks, but no new wave starts.
    waves = sorted(fleet.members(rollout_id).values(), key=lambda d: d["wave"])
    wait_for(lambda: fleet.members(rollout_id)[waves[0]["device_id"]]["state"] == "serving",
             what="wave 1 serving")
    serving_at = fleet.members(rollout_id)[waves[0]["device_id"]]["serving_at"]
    wait_for(lambda: hub_seconds_since(serving_at) > 6 + 3, timeout=20, what="the soak to pass")
    record = fleet.show(rollout_id)
    assert (record["state"], record["current_wave"]) == ("paused", 1)
    assert [d["state"] for d in fleet.members(rollout_id).values()].count("pending") == 2
    watched = fleet.cli.run("rollout", "watch", rollout_id, ok=False)
    assert watched.returncode == 3 and "Summary: paused" in watched.stdout

    # Resumed: wave 2 starts at once (wave 1 has soaked); then aborted during its soak.
    assert "running" in fleet.cli.run("rollout", "resume", rollout_id).stdout
    wait_for(lambda: fleet.show(rollout_id)["current_wave"] == 2, what="wave 2")
    assert "aborted" in fleet.cli.run("rollout", "abort", rollout_id).stdout
    second = next(a for a in agents if a.device_id == waves[1]["device_id"])
    third = next(a for a in agents if a.device_id == waves[2]["device_id"])
    fleet.wait_serving([second], "control", 2)  # a device already given the version keeps it
    wait_for(lambda: fleet.members(rollout_id)[second.device_id]["state"] == "serving",
             what="the aborted rollout still following its assigned devices")
    time.sleep(2)  # a few engine ticks: nothing more may happen
    members = fleet.members(rollout_id)
    assert (members[third.device_id]["state"], members[third.device_id]["assigned_at"]) == (
        "pending", None)
    assert fleet.desired(third, "control")["version"] == 1
    assert fleet.serving_version(third, "control") == 1 and fleet.score(third, "control") == "1"
    record = fleet.show(rollout_id)
    assert (record["state"], record["reason"]) == ("aborted", "aborted by admin")
    again = fleet.cli.run("rollout", "resume", rollout_id, ok=False)
    assert again.returncode == 1 and "aborted" in again.stderr
    assert "Traceback" not in again.stderr
    actions = [(e["actor"], e["action"]) for e in fleet.audit(rollout_id)]
    for step in ("rollout.paused", "rollout.running", "rollout.aborted"):
        assert ("admin", step) in actions


def test_the_higher_priority_rollout_wins_a_device(fleet: Fleet) -> None:
    agents = fleet.agents[:3]
    fleet.tag(agents, test="priority")
    fleet.tag(agents[:1], urgent="yes")
    fleet.deploy(agents, "tiny:1", "prio")
    # A high-priority rollout holds the deployment on every device while it soaks.
    high = fleet.create("tiny:2", "--deployment", "prio", "--target", "test=priority",
                        "--priority", "10", "--soak", "10m")["id"]
    fleet.wait_serving(agents, "prio", 2)
    # A lower one finds every device held, and says so for each.
    low = fleet.create("tiny:4", "--deployment", "prio", "--target", "test=priority")["id"]
    record = fleet.wait_rollout(low, "completed")
    assert sorted(f["device_id"] for f in record["failed_devices"]) == sorted(
        a.device_id for a in agents)
    for f in record["failed_devices"]:
        assert f["state"] == "skipped"
        assert f["error"] == f"deployment prio is held by {high} with priority 10 > 0"
    shown = fleet.cli.run("rollout", "show", low).stdout
    assert "skipped" in shown and f"held by {high}" in shown
    for agent in agents:
        assert fleet.desired(agent, "prio")["rollout_id"] == high
        assert fleet.score(agent, "prio") == "2"

    # A higher one takes one device over; the rollout it took it from says so.
    urgent = fleet.create("tiny:4", "--deployment", "prio", "--target", "urgent=yes",
                          "--priority", "20")["id"]
    fleet.wait_rollout(urgent, "completed")
    fleet.wait_serving(agents[:1], "prio", 4)
    wait_for(lambda: fleet.members(high)[agents[0].device_id]["state"] == "skipped",
             what="the high-priority rollout noting the takeover")
    assert fleet.members(high)[agents[0].device_id]["error"] == f"taken over by rollout {urgent}"
    assert fleet.show(high)["state"] == "running"
    fleet.cli.run("rollout", "abort", high)
    for agent in agents[1:]:
        assert fleet.score(agent, "prio") == "2"
