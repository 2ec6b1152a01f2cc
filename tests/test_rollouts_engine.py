"""The rollout engine's tick in process, with a fake clock: waves, soak, device timeout,
the failure threshold with automatic rollback, health from telemetry, and one broken
rollout that must not hold up another.

Real parts: the hub's database, SQLite and then PostgreSQL (tests/postgres.py), real
signed packages (tests/hubapp.py), the REST API through `create_app`. Devices are rows;
what they report is written as the ingest writes it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contract import cosign
from hub import deployments, events
from hub.rollouts import reads, store
from hub.rollouts.engine import Engine
from hub.storage.db import SCHEMA_VERSION, Database, format_time
from hubapp import InProcessHub
from postgres import as_older_hub_left_it, write_lock_held

DEVICES = ["dev-a", "dev-b", "dev-c", "dev-d"]


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def hub_db(any_db: Database) -> Database:
    """Every test here runs on both databases."""
    return any_db


@pytest.fixture
def hub(inproc: InProcessHub) -> InProcessHub:
    """tiny:1-3 packaged and signed; four devices at site=lab serving tiny:1."""
    for version in (1, 2, 3):
        inproc.publish("tiny", version)
    inproc.add_devices(DEVICES, site="lab")
    inproc.deploy(DEVICES, "tiny", 1, "tiny")
    return inproc


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(hub: InProcessHub, clock: Clock) -> Engine:
    return Engine(hub.db, hub.notify, clock=clock)


def create(hub: InProcessHub, **body: Any) -> str:
    answer = hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 2, "target": {"site": "lab"}, **body})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def members(db: Database, rollout_id: str) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in reads.show(db, rollout_id, devices=True)["devices"]}


def in_wave(db: Database, rollout_id: str, wave: int) -> list[str]:
    return sorted(d for d, m in members(db, rollout_id).items() if m["wave"] == wave)


def serve(hub: InProcessHub, devices: list[str], version: int = 2) -> None:
    """The devices applied their desired state and serve VERSION."""
    hub.applied(devices)
    hub.report(devices, "tiny", "tiny", version, "serving")


def test_waves_advance_once_each_has_served_and_soaked(hub: InProcessHub, clock: Clock,
                                                       engine: Engine) -> None:
    rollout_id = create(hub, waves="1,50%,all", soak="10m")
    assert [len(in_wave(hub.db, rollout_id, w)) for w in (1, 2, 3)] == [1, 1, 2]
    engine.tick()
    first = in_wave(hub.db, rollout_id, 1)
    assert reads.show(hub.db, rollout_id)["state"] == "running"
    assert hub.notified == first
    assert deployments.for_device(hub.db, first[0])[0]["version"] == 2
    assert {m["state"] for d, m in members(hub.db, rollout_id).items() if d not in first} == {
        "pending"}

    hub.report(first, "tiny", "tiny", 2, "downloading")
    engine.tick()
    assert members(hub.db, rollout_id)[first[0]]["state"] == "downloading"
    shown = reads.show(hub.db, rollout_id, at=clock())
    assert (shown["soak_ends_at"], shown["next_wave_at"]) == (None, None)

    serve(hub, first)
    engine.tick()
    assert members(hub.db, rollout_id)[first[0]]["state"] == "serving"
    shown = reads.show(hub.db, rollout_id, at=clock())
    assert shown["soak_left_s"] == 600
    assert shown["next_wave_at"] == format_time(clock() + timedelta(minutes=10))

    clock.advance(minutes=9)
    engine.tick()
    assert reads.show(hub.db, rollout_id, at=clock())["soak_left_s"] == 60
    assert reads.show(hub.db, rollout_id)["current_wave"] == 1
    clock.advance(minutes=1)
    engine.tick()
    assert reads.show(hub.db, rollout_id)["current_wave"] == 2
    serve(hub, in_wave(hub.db, rollout_id, 2))
    engine.tick()
    clock.advance(minutes=10)
    engine.tick()
    last = in_wave(hub.db, rollout_id, 3)
    assert reads.show(hub.db, rollout_id)["current_wave"] == 3
    serve(hub, last)
    engine.tick()
    shown = reads.show(hub.db, rollout_id, at=clock())
    assert shown["next_wave_at"] is None and shown["soak_left_s"] == 600  # the last wave soaks
    clock.advance(minutes=10)
    engine.tick()
    record = reads.show(hub.db, rollout_id)
    assert record["state"] == "completed"
    assert [w["serving"] for w in record["waves_progress"]] == [1, 1, 2]
    # Each step is an event (hub/events.py), in order.
    assert [(e.type, e.detail) for e in events.newest(hub.db) if e.subject == rollout_id] == [
        ("rollout.created", ""), ("rollout.running", ""), ("rollout.wave", "wave 1: 1 device(s)"),
        ("rollout.wave", "wave 2: 1 device(s)"), ("rollout.wave", "wave 3: 2 device(s)"),
        ("rollout.completed", "")]


def test_a_device_that_never_answers_fails_and_auto_rollback_restores_the_rest(
        hub: InProcessHub, clock: Clock, engine: Engine) -> None:
    rollout_id = create(hub, waves="2,all", device_timeout="5m", auto_rollback=True)
    engine.tick()
    quiet, good = in_wave(hub.db, rollout_id, 1)
    serve(hub, [good])
    clock.advance(minutes=4)
    engine.tick()
    assert members(hub.db, rollout_id)[quiet]["state"] == "assigned"
    clock.advance(minutes=2)
    engine.tick()
    record = reads.show(hub.db, rollout_id)
    assert record["state"] == "rolled_back"
    assert record["failed_devices"] == [{"device_id": quiet, "wave": 1, "state": "failed",
                                         "error": "no answer within the device timeout (5m)"}]
    assert "1 device(s) failed, more than --max-failures 0 of 4 allows" in record["reason"]
    assert members(hub.db, rollout_id)[good]["state"] == "rolled_back"
    for device in (quiet, good):
        assert deployments.for_device(hub.db, device)[0]["version"] == 1
    # The later wave was never assigned.
    assert {m["state"] for m in members(hub.db, rollout_id).values() if m["wave"] == 2} == {
        "pending"}


def test_failures_within_the_threshold_let_the_rollout_complete(
        hub: InProcessHub, clock: Clock, engine: Engine) -> None:
    rollout_id = create(hub, max_failures="25%")
    engine.tick()
    broken, *rest = sorted(DEVICES)
    hub.applied([broken])
    hub.report([broken], "tiny", "tiny", 2, "rolled_back", error="self-test failed: boom")
    serve(hub, rest)
    engine.tick()
    engine.tick()
    record = reads.show(hub.db, rollout_id)
    assert record["state"] == "completed"
    assert record["failed_devices"] == [{"device_id": broken, "wave": 1, "state": "failed",
                                         "error": "self-test failed: boom"}]


def test_a_failure_reported_before_the_device_applied_the_state_waits(
        hub: InProcessHub, engine: Engine) -> None:
    rollout_id = create(hub)
    engine.tick()
    device = DEVICES[0]
    # Left over from an earlier attempt: the device has not applied the new state yet.
    hub.report([device], "tiny", "tiny", 2, "failed", error="old news")
    engine.tick()
    assert members(hub.db, rollout_id)[device]["state"] == "assigned"
    hub.applied([device])
    engine.tick()
    assert members(hub.db, rollout_id)[device]["state"] == "failed"
    assert reads.show(hub.db, rollout_id)["state"] == "paused"


def test_an_unhealthy_new_version_fails_its_device(hub: InProcessHub, clock: Clock,
                                                   engine: Engine) -> None:
    rollout_id = create(hub, max_failures="1", soak="10m")
    engine.tick()
    serve(hub, DEVICES)
    engine.tick()
    sick, fine, few = DEVICES[:3]
    at = format_time(clock() + timedelta(seconds=5))
    hub.telemetry(sick, at=at, deployment="tiny", version=2, count=20, errors=5, p95_ms=3.0)
    hub.telemetry(fine, at=at, deployment="tiny", version=2, count=20, errors=0, p95_ms=3.0)
    # Too few requests to judge: one slow or failing request says nothing.
    hub.telemetry(few, at=at, deployment="tiny", version=2, count=5, errors=5, p95_ms=3.0)
    engine.tick(check_health=False)
    assert members(hub.db, rollout_id)[sick]["state"] == "serving"
    engine.tick()
    states = members(hub.db, rollout_id)
    assert states[sick]["state"] == "failed"
    assert states[sick]["error"] == "unhealthy: error rate 25.0% of 20 requests is above 5.0%"
    assert (states[fine]["state"], states[few]["state"]) == ("serving", "serving")
    assert reads.show(hub.db, rollout_id)["state"] == "running"  # one failure is allowed


def test_one_broken_rollout_does_not_hold_up_another(hub: InProcessHub, clock: Clock,
                                                     engine: Engine) -> None:
    hub.add_devices(["lab-x"], site="other")
    hub.deploy(["lab-x"], "tiny", 1, "tiny")
    broken = create(hub)
    other = create(hub, target={"site": "other"}, version=3)
    # Under the first rollout, its package loses its signature (a hand-edited registry).
    _, package = deployments.signed_package(hub.db, "tiny", 2)
    with hub.db.transaction() as conn:
        conn.execute("DELETE FROM oci_tags WHERE tag = ?", (cosign.signature_tag(package.digest),))
    engine.tick()
    record = reads.show(hub.db, broken)
    assert record["state"] == "failed"
    assert "the package of tiny:2 is not signed" in record["reason"]
    assert f"`edgefleet rollout resume {broken}`" in record["reason"]
    assert "\n" not in record["reason"]
    assert reads.show(hub.db, other)["state"] == "running"
    assert members(hub.db, other)["lab-x"]["state"] == "assigned"
    listed = {r["id"]: r for r in hub.client.get("/api/v1/rollouts").json()}
    assert listed[broken]["state"] == "failed" and "not signed" in listed[broken]["reason"]
    assert [r["id"] for r in hub.client.get("/api/v1/rollouts?state=failed").json()] == [broken]

    # Failed is stable: the engine does not retry it every tick.
    engine.tick()
    assert reads.show(hub.db, broken)["reason"] == record["reason"]
    # Fixed and resumed, it carries on.
    hub.sign("tiny", 2)
    assert hub.client.post(f"/api/v1/rollouts/{broken}/resume").json()["state"] == "running"
    engine.tick()
    shown = reads.show(hub.db, broken)
    assert (shown["state"], shown["reason"], shown["current_wave"]) == ("running", None, 1)


def test_a_busy_database_is_no_failure_of_the_rollout(hub: InProcessHub,
                                                      engine: Engine) -> None:
    rollout_id = create(hub)
    with write_lock_held(hub.db):
        engine.tick()
    assert reads.show(hub.db, rollout_id)["state"] == "created"
    engine.tick()
    assert reads.show(hub.db, rollout_id)["state"] == "running"


def test_a_device_joining_the_target_is_taken_in(hub: InProcessHub, engine: Engine) -> None:
    rollout_id = create(hub, target={"site": "later"})
    assert reads.show(hub.db, rollout_id)["waves_progress"] == []
    engine.tick()
    assert reads.show(hub.db, rollout_id)["state"] == "completed"
    hub.add_devices(["late"], site="later")
    hub.deploy(["late"], "tiny", 1, "tiny")
    engine.tick()
    assert members(hub.db, rollout_id)["late"]["state"] == "assigned"
    assert deployments.for_device(hub.db, "late")[0]["version"] == 2


def test_a_rollout_from_an_older_hub_gets_its_typed_spec_once(hub: InProcessHub,
                                                              engine: Engine) -> None:
    rollout_id = create(hub, waves="1,all", max_failures="50%", soak="2m")
    with hub.db.transaction() as conn:
        conn.execute("UPDATE rollouts SET spec = NULL WHERE id = ?", (rollout_id,))
    spec = store.get(hub.db, rollout_id).spec
    assert (str(spec.max_failures), str(spec.soak), [str(w) for w in spec.waves]) == (
        "50%", "2m", ["1", "100%"])
    assert store.row(hub.db, rollout_id)["spec"] == spec.to_json()
    engine.tick()
    assert reads.show(hub.db, rollout_id)["current_wave"] == 1


def test_a_database_of_an_older_hub_gets_the_spec_column(db_target: Any) -> None:
    old = Database(db_target)
    as_older_hub_left_it(old, 1, columns=(("rollouts", "spec"), *OLDER_THAN_3),
                         tables=("telemetry_rollups", "telemetry_rolled",  # schema 4
                                 "webhook_deliveries", "webhooks", "events",  # 6
                                 "model_profiles",  # 7
                                 "drift_baselines", "drift_sketches", "drift_results",  # 8
                                 "device_commands"))  # 9
    old.close()
    db = Database(db_target)
    assert "spec" in db.dialect.columns(db.conn, "rollouts")
    assert db.query("SELECT * FROM model_profiles") == []
    assert db.query_one("SELECT value FROM meta WHERE key = 'schema_version'") == {
        "value": str(SCHEMA_VERSION)}


# The columns schema version 3 added (package variants), and 5 (deployment settings).
OLDER_THAN_3 = (("deployments", "variant"), ("deployments", "candidate_variant"),
                ("rollout_devices", "previous_variant"), ("oci_repo_blobs", "linked_at"),
                ("deployments", "settings"), ("rollout_devices", "previous_settings"))


def test_a_manual_deploy_during_a_rollout_is_a_takeover_the_rollback_leaves_alone(
        hub: InProcessHub, engine: Engine) -> None:
    rollout_id = create(hub, soak="1h")
    engine.tick()
    serve(hub, DEVICES)
    engine.tick()
    manual, removed = DEVICES[0], DEVICES[1]
    deployments.assign(hub.db, manual, name="tiny", model="tiny", version=3)
    deployments.unassign(hub.db, removed, "tiny")
    engine.tick()
    states = members(hub.db, rollout_id)
    assert (states[manual]["state"], states[manual]["error"]) == (
        "skipped", "taken over by a manual deploy")
    assert (states[removed]["state"], states[removed]["error"]) == (
        "skipped", "taken over by removing it by hand (undeploy)")
    answer = hub.client.post(f"/api/v1/rollouts/{rollout_id}/rollback").json()
    assert answer["state"] == "rolled_back"
    states = members(hub.db, rollout_id)
    assert {d: s["state"] for d, s in states.items()} == {
        manual: "skipped", removed: "skipped", DEVICES[2]: "rolled_back",
        DEVICES[3]: "rolled_back"}
    assert deployments.for_device(hub.db, manual)[0]["version"] == 3
    assert deployments.for_device(hub.db, removed) == []
    assert deployments.for_device(hub.db, DEVICES[2])[0]["version"] == 1


def test_a_tick_reads_only_the_devices_with_news(hub: InProcessHub, clock: Clock,
                                                 engine: Engine) -> None:
    """A device whose report, holder and clock say nothing new is not read again (at
    10,000 devices every tick read and judged them all); one with news is."""
    rollout_id = create(hub, device_timeout="5m", soak="1h")
    engine.tick()

    def news(*, check_health: bool = False) -> set[str]:
        rollout = store.get(hub.db, rollout_id)
        return {r["device_id"] for r in engine.news(rollout, check_health=check_health)}

    assert news() == set()  # assigned, no answer yet, not timed out
    first, second, third, fourth = DEVICES
    serve(hub, [first, second])
    hub.report([third], "tiny", "tiny", 2, "failed", error="old news")  # not applied yet
    assert news() == {first, second}
    engine.tick(check_health=False)
    assert news() == set()
    assert news(check_health=True) == {first, second}  # their telemetry is news
    hub.report([third], "tiny", "tiny", 2, "downloading")  # progress counts before applying
    assert news() == {third}
    engine.tick()
    assert members(hub.db, rollout_id)[third]["state"] == "downloading"
    assert news() == set()
    deployments.assign(hub.db, first, name="tiny", model="tiny", version=3)
    # Taken over; a serving device is looked at on the ticks that check health.
    assert (news(), news(check_health=True)) == (set(), {first, second})
    engine.tick()
    clock.advance(minutes=6)
    assert news() == {third, fourth}  # no answer within the device timeout
    engine.tick()
    assert {d: (m["state"], m["error"]) for d, m in members(hub.db, rollout_id).items()} == {
        first: ("skipped", "taken over by a manual deploy"), second: ("serving", None),
        third: ("failed", "no answer within the device timeout (5m)"),
        fourth: ("failed", "no answer within the device timeout (5m)")}
    # Failed for not answering in time, a device is still followed: serving is news.
    assert news() == set()
    serve(hub, [fourth])
    assert news() == {fourth}
