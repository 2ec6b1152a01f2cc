"""What the hub makes of device reports, in process: failures a later report made stale
leave `device show`, and deploying the same version again after a failed or refused
attempt is a retry with a new generation.

Real parts: the hub's SQLite database, real signed packages (tests/hubapp.py); what
devices report is written as the ingest writes it."""

from __future__ import annotations

import json

import pytest

from hub import deployments
from hub.cli.devices import current_refusals
from hubapp import InProcessHub


@pytest.fixture
def hub(inproc: InProcessHub) -> InProcessHub:
    """tiny:1-3 signed; dev-a serving tiny:1."""
    for version in (1, 2, 3):
        inproc.publish("tiny", version)
    inproc.add_devices(["dev-a"])
    inproc.deploy(["dev-a"], "tiny", 1, "tiny")
    return inproc


def report(hub: InProcessHub, version: int, state: str, since: str,
           error: str | None = None) -> None:
    with hub.db.transaction() as conn:
        conn.execute(
            "INSERT INTO deployment_status (device_id, name, model, version, state, error, since,"
            " updated_at) VALUES ('dev-a', 'tiny', 'tiny', ?, ?, ?, ?, ?) ON CONFLICT (device_id,"
            " name, version) DO UPDATE SET state = excluded.state, error = excluded.error,"
            " since = excluded.since, updated_at = excluded.updated_at",
            (version, state, error, since, since))


def shown(hub: InProcessHub) -> list[tuple[int, str, str | None]]:
    answer = hub.client.get("/api/v1/devices/dev-a/deployments").json()
    return [(r["version"], r["state"], r["error"]) for r in answer["reported"]]


def test_a_failure_leaves_device_show_once_a_later_version_serves(hub: InProcessHub) -> None:
    report(hub, 1, "serving", "2026-01-01T00:00:00.000000Z")
    report(hub, 2, "rolled_back", "2026-01-02T00:00:00.000000Z", "self-test failed")
    # Rolled back to tiny:1, which has served since before: the failure is news.
    assert shown(hub) == [(1, "serving", None), (2, "rolled_back", "self-test failed")]
    with hub.db.transaction() as conn:
        conn.execute("DELETE FROM deployment_status WHERE version = 1")
    report(hub, 3, "serving", "2026-01-03T00:00:00.000000Z")
    # tiny:3 serves since after it: the agent still reports the failure, the hub drops it.
    assert shown(hub) == [(3, "serving", None)]


def test_the_same_version_again_after_a_failure_is_a_retry(hub: InProcessHub) -> None:
    first = deployments.assign(hub.db, "dev-a", name="tiny", model="tiny", version=2)
    hub.applied(["dev-a"])
    # Nothing new: the same assignment is no new generation.
    assert deployments.assign(hub.db, "dev-a", name="tiny", model="tiny", version=2) == first
    report(hub, 2, "rolled_back", "2026-01-02T00:00:00.000000Z", "download failed")
    answer = hub.client.post("/api/v1/devices/dev-a/deployments",
                             json={"model": "tiny", "version": 2})
    assert answer.status_code == 201 and answer.json()["generation"] == first + 1


def test_the_same_version_again_after_a_refused_state_is_a_retry(hub: InProcessHub) -> None:
    first = deployments.assign(hub.db, "dev-a", name="tiny", model="tiny", version=2)
    refusal = {"generation": first, "at": "2026-01-02T00:00:00.000000Z", "reason": "expired",
               "message": "the desired state expired"}
    with hub.db.transaction() as conn:
        conn.execute("UPDATE devices SET reported = ? WHERE id = 'dev-a'",
                     (json.dumps({"refusals": [refusal]}),))
    assert deployments.assign(hub.db, "dev-a", name="tiny", model="tiny", version=2) == first + 1
    # `device show` lists a refusal only while no later generation was applied.
    assert current_refusals({"refusals": [refusal]}, first - 1) == [refusal]
    assert current_refusals({"refusals": [refusal]}, first) == []
    assert current_refusals({"refusals": [refusal]}, None) == [refusal]
