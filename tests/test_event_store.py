"""Events and webhook deliveries in the database, in process: what becomes an event,
the delivery policy, fan-out by type and filter, retries to a dead letter, replay and
retention. tests/test_events.py runs the same through a real hub and real receivers."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contract import protocol
from hub import audit, events, liveness, webhooks
from hub.events import EventType
from hub.retention import RetentionPolicy, prune_events
from hub.rollouts.states import TRANSITIONS
from hub.storage.db import Database, format_time
from hub.validation import InvalidInput
from hub.webhooks import DeliveryPolicy, DeliveryState, Outcome

SECRET = "0123456789abcdef"


@pytest.fixture
def db(any_db: Database) -> Database:
    """Each test on SQLite, then on PostgreSQL."""
    return any_db


def test_audited_state_changes_become_events(db: Database) -> None:
    audit.record(db, actor="ana", action="model.register", target="digits:1", status=201)
    audit.record(db, actor="ana", action="model.register", target="digits:2", status=422)
    audit.record(db, actor="ana", action="rollout.pause", target="r-1", status=200)  # a request
    audit.record(db, actor="rollout-engine", action="rollout.paused", target="r-1", status=200,
                 detail="too many failures")
    found = events.newest(db)
    assert [(e.type, e.subject, e.actor) for e in found] == [
        (EventType.MODEL_REGISTERED, "digits:1", "ana"),
        (EventType.ROLLOUT_PAUSED, "r-1", "rollout-engine")]
    assert found[1].detail == "too many failures" and json.loads(found[1].to_json())["schema"] == 1
    assert [e.id for e in events.after(db, found[0].id)] == [found[1].id]


def test_device_status_events_only_for_changes(db: Database) -> None:
    with db.transaction() as conn:
        conn.execute("INSERT INTO devices (id, name, tags, status) VALUES"
                     " ('d1', 'one', '{}', 'offline'), ('d2', 'two', '{}', 'online')")
        events.device_status(conn, {"d1": "online", "d2": "online", "gone": "online"},
                             actor="ingest")
        conn.execute("UPDATE devices SET status = 'online', last_seen = ?",
                     (format_time(datetime.now(UTC) - timedelta(hours=1)),))
    silent = liveness.mark_silent(db, now=datetime.now(UTC), silent_for=timedelta(minutes=1))
    assert silent == ["d1", "d2"]
    assert [(e.type, e.subject) for e in events.newest(db)] == [
        (EventType.DEVICE_ONLINE, "d1"), (EventType.DEVICE_OFFLINE, "d1"),
        (EventType.DEVICE_OFFLINE, "d2")]


def test_a_deployment_newly_failed_is_an_event(db: Database) -> None:
    def report(state: protocol.UpdateState) -> list[protocol.DeploymentStatus]:
        return [protocol.DeploymentStatus("digits", "digits", 2, state, datetime.now(UTC),
                                          error="self-test failed" if state == "failed" else
                                          None)]

    for state in ("serving", "failed", "failed"):  # the second "failed" is old news
        with db.transaction() as conn:
            events.deployment_failures(conn, {"d1": report(protocol.UpdateState(state))},
                                       actor="ingest")
            conn.execute("DELETE FROM deployment_status")
            conn.execute("INSERT INTO deployment_status (device_id, name, version, state)"
                         " VALUES ('d1', 'digits', 2, ?)", (state,))
    assert [(e.type, e.subject, e.detail) for e in events.newest(db)] == [
        (EventType.DEPLOYMENT_FAILED, "d1/digits", "digits:2: self-test failed")]


def test_type_patterns_are_checked() -> None:
    assert events.types_matching(["rollout.paus*"]) == ["rollout.paused"]
    with pytest.raises(events.BadPattern, match="matches no event type"):
        events.check_patterns(["rollouts.*"])


def test_the_delivery_policy_is_checked_when_made_and_pure() -> None:
    for bad in ({"attempts": 0}, {"initial": 0}, {"initial": 10, "maximum": 5},
                {"jitter": 1}, {"multiplier": 0.5}, {"timeout": 0}, {"per_endpoint": 0}):
        with pytest.raises(ValueError, match="webhook"):
            DeliveryPolicy(**bad)  # type: ignore[arg-type]
    policy = DeliveryPolicy(initial=2, maximum=10, jitter=0.5)
    assert [policy.delay(n, lambda: 0.0) for n in (1, 2, 3, 4, 50)] == [2, 4, 8, 10, 10]
    assert policy.delay(1, lambda: 1.0) == 1.0  # at most half off


def test_fan_out_filters_then_retries_end_in_a_dead_letter_and_replay(db: Database) -> None:
    for url, types, filter in (("ftp://h/x", ["rollout.*"], {}),
                               ("http://h/x", ["nope.*"], {}),
                               ("http://h/x", ["rollout.*"], {"colour": "red"})):
        with pytest.raises(InvalidInput):
            webhooks.add(db, url=url, types=types, filter=filter, secret=SECRET,
                         created_by="t")
    with db.transaction() as conn:
        events.record(conn, EventType.ROLLOUT_PAUSED, subject="r-0", actor="x")  # before
    hook = webhooks.add(db, url="http://127.0.0.1:9/x", types=["rollout.*"],
                        filter={"subject": "r-1*"}, secret=SECRET, created_by="t")["id"]
    with db.transaction() as conn:
        for subject in ("r-1", "r-2", "r-10"):
            events.record(conn, EventType.ROLLOUT_PAUSED, subject=subject, actor="x")
        events.record(conn, EventType.DEVICE_ONLINE, subject="r-1", actor="x")
    assert webhooks.fan_out(db) == 2 and webhooks.fan_out(db) == 0
    policy = DeliveryPolicy(attempts=3, initial=1)
    now = datetime.now(UTC)
    for attempt in range(3):
        due = webhooks.due(db, now, per_endpoint=2, room={}, busy=[])
        assert sorted(d.event.subject for d in due) == ["r-1", "r-10"]
        assert webhooks.due(db, now, per_endpoint=2, room={hook: 0}, busy=[]) == []
        assert len(webhooks.due(db, now, per_endpoint=1, room={}, busy=[])) == 1
        webhooks.settle(db, [Outcome(d, 500, "answered HTTP 500", now) for d in due],
                        policy=policy, rand=lambda: 0.0)
        assert webhooks.due(db, now, per_endpoint=2, room={}, busy=[]) == []  # backing off
        now += timedelta(seconds=policy.delay(attempt + 1, lambda: 0.0))
    dead = webhooks.deliveries(db, hook, state=DeliveryState.DEAD)
    assert [(d["attempts"], d["last_status"]) for d in dead] == [(3, 500), (3, 500)]
    assert webhooks.replay(db, hook) == 2
    (first, _) = webhooks.due(db, now, per_endpoint=2, room={}, busy=[])
    webhooks.settle(db, [Outcome(first, 204, "", now)], policy=policy, rand=lambda: 0.0)
    assert webhooks.get(db, hook)["delivered"] == 1
    # Retention: old events go, and with them their deliveries.
    assert prune_events(db, datetime.now(UTC) + timedelta(days=1), 1000) == 5
    assert webhooks.deliveries(db, hook) == [] and events.last_seq(db) == 5


def test_event_retention_is_checked() -> None:
    with pytest.raises(ValueError, match="at least a day"):
        RetentionPolicy(events=timedelta(hours=1))


# Audited actions that are no event: requests for a change (the change itself is
# audited where it happens, and is the event), steps of a larger change, sessions,
# and a replay, which changes only deliveries.
NOT_EVENTS = {"rollout.pause", "rollout.resume", "rollout.abort", "rollout.rollback",
              "rollout.unknown-action", "blob.upload", "registry.upload", "ui.signin",
              "ui.signout", "webhook.replay",
              # a command's outcome is the event: profile.done (hub/commands.py)
              "device.command", "device.command_result"}


def test_every_audited_action_is_an_event_or_said_not_to_be() -> None:
    """Read the hub's sources for the actions it audits: a new one must be mapped."""
    root = Path(__file__).resolve().parent.parent / "hub"
    source = "\n".join(p.read_text() for p in root.rglob("*.py"))
    found = set(re.findall(r'audit = \(\s*"([a-z_.-]+)"', source))
    found |= set(re.findall(r'action="([a-z_.-]+)"', source))
    found |= {f"rollout.{target.value}" for _, target in TRANSITIONS.values()}  # the store's
    found |= {f"rollout.{a}" for a in ("pause", "resume", "abort", "rollback")}  # the API's
    assert found - set(events.FROM_AUDIT) - NOT_EVENTS == set()
    assert set(events.FROM_AUDIT) - found == set()  # no mapping of an action that is gone
