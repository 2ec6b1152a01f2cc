"""hub.deployments and hub.desired on a database of their own: what the rollout engine calls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contract import cosign, protocol, signing
from hub import deployments, desired
from hub.deployments import Candidate
from hub.errors import Conflict, NotFound
from hub.storage.db import Database
from hub.validation import InvalidInput

DIGESTS = {v: f"sha256:{v:064x}" for v in (1, 2, 3)}
DEVICES = ["dev-a", "dev-b", "dev-c"]


@pytest.fixture
def db(tmp_path: Path) -> Database:
    """Devices dev-a..c and model tiny with versions 1-3, packaged; 1 and 2 signed."""
    db = Database(tmp_path / "hub.db")
    with db.transaction() as conn:
        conn.execute("INSERT INTO models VALUES ('tiny', 'now', 4)")
        for v, digest in DIGESTS.items():
            conn.execute("INSERT INTO model_versions (model, version, created_at, tags, metrics,"
                         " lineage) VALUES ('tiny', ?, 'now', '{}', '{}', '{}')", (v,))
            conn.execute("INSERT INTO oci_manifests VALUES ('models/tiny', ?, ?, 512, 'now')",
                         (digest, "application/vnd.oci.image.index.v1+json"))
            conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', ?, ?, 'now')",
                         (str(v), digest))
            if v != 3:
                conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', ?, 'sha256:ff', 'now')",
                             (cosign.signature_tag(digest),))
        conn.executemany(
            "INSERT INTO devices (id, name, tags, desired_generation, applied_generation,"
            " published_generation) VALUES (?, ?, '{}', 0, 0, 0)", [(d, d) for d in DEVICES])
    return db


def test_a_batch_is_one_change_per_device_and_repeating_it_changes_nothing(db: Database) -> None:
    assert deployments.assign_many(db, DEVICES, name="tiny", model="tiny", version=1,
                                   rollout_id="r-1") == dict.fromkeys(DEVICES, 1)
    again = deployments.assign_many(db, DEVICES, name="tiny", model="tiny", version=1,
                                    rollout_id="r-1")
    assert again == dict.fromkeys(DEVICES, 1)
    moved = deployments.assign_many(db, DEVICES[:2], name="tiny", model="tiny", version=2,
                                    prefer=["openvino:GPU"])
    assert moved == {"dev-a": 2, "dev-b": 2}
    (row,) = deployments.for_device(db, "dev-a")
    assert (row["version"], row["digest"], row["prefer"], row["rollout_id"]) == (
        2, DIGESTS[2], ["openvino:GPU"], None)
    assert deployments.unassign_many(db, ["dev-b", "dev-c"], "tiny") == {"dev-b": 3, "dev-c": 2}
    assert deployments.unassign_many(db, ["dev-b"], "tiny") == {}
    with pytest.raises(NotFound, match="has no deployment 'tiny'"):
        deployments.unassign(db, "dev-b", "tiny")


def test_nothing_changes_when_any_device_is_unknown(db: Database) -> None:
    with pytest.raises(NotFound, match="no device with id dev-x, dev-y"):
        deployments.assign_many(db, ["dev-a", "dev-x", "dev-y"], name="tiny", model="tiny",
                                version=1)
    assert deployments.for_device(db, "dev-a") == []


@pytest.mark.parametrize("version, error, message", [
    (3, Conflict, "tiny:3 is not signed, and agents refuse unsigned packages"),
    ("latest", Conflict, "tiny:3 is not signed"),
    (9, NotFound, "has no version 9"),
])
def test_a_version_needs_a_signed_package(db: Database, version: int | str, error: type,
                                          message: str) -> None:
    with pytest.raises(error, match=message):
        deployments.assign(db, "dev-a", name="tiny", model="tiny", version=version)


def test_candidates_split_or_shadow(db: Database) -> None:
    deployments.assign(db, "dev-a", name="tiny", model="tiny", version=1,
                       candidate=Candidate(2, 10))
    deployments.assign(db, "dev-b", name="tiny", model="tiny", version=1,
                       candidate=Candidate(2, 100, shadow=True))
    split, shadow = (deployments.for_device(db, d)[0] for d in ("dev-a", "dev-b"))
    assert split["traffic"] == 90 and split["candidate"]["traffic"] == 10
    assert shadow["traffic"] == 100 and shadow["candidate"]["shadow"]
    for bad, message in [(Candidate(2, 100), "must be 1-99"), (Candidate(1, 5), "own version")]:
        with pytest.raises(InvalidInput, match=message):
            deployments.assign(db, "dev-c", name="tiny", model="tiny", version=1, candidate=bad)


def test_a_device_holds_as_many_deployments_as_a_desired_state(db: Database) -> None:
    for n in range(protocol.MAX_DEPLOYMENTS):
        deployments.assign(db, "dev-a", name=f"d{n}", model="tiny", version=1)
    with pytest.raises(Conflict, match="already has 64 deployments"):
        deployments.assign(db, "dev-a", name="one-more", model="tiny", version=1)
    assert deployments.assign(db, "dev-a", name="d0", model="tiny", version=2) == 65


def test_the_snapshot_signs_into_a_state_the_agent_accepts(db: Database) -> None:
    deployments.assign(db, "dev-a", name="low", model="tiny", version=1)
    deployments.assign(db, "dev-a", name="high", model="tiny", version=1, priority=5,
                       candidate=Candidate(2, 20, shadow=True), rollout_id="r-7")
    generation, rows = deployments.desired_snapshot(db, ["dev-a"])["dev-a"]
    assert [r["name"] for r in rows] == ["high", "low"]  # applied in priority order
    now = datetime.now(UTC)
    state = desired.build("dev-a", generation, rows, issued_at=now, validity=timedelta(days=1))
    key = signing.generate_private_key()
    checked = protocol.verify_desired(protocol.sign_desired(state, key),
                                      public_key=key.public_key(), device_id="dev-a",
                                      last_generation=0, now=now)
    assert checked.deployments[0].candidate is not None
    assert checked.deployments[0].rollout == "r-7"


def test_due_is_what_the_broker_lacks_or_what_expires_soon(db: Database) -> None:
    deployments.assign_many(db, DEVICES, name="tiny", model="tiny", version=1)
    now = datetime.now(UTC)
    soon = protocol.format_time(now + timedelta(days=2))
    later = protocol.format_time(now + timedelta(days=25))
    with db.transaction() as conn:
        conn.execute("UPDATE devices SET published_generation = 1, published_expires_at = ?"
                     " WHERE id = 'dev-a'", (soon,))
        conn.execute("UPDATE devices SET published_generation = 1, published_expires_at = ?"
                     " WHERE id = 'dev-b'", (later,))
    refresh_before = now + timedelta(days=10)
    assert sorted(desired.due(db, refresh_before=refresh_before)) == ["dev-a", "dev-c"]
    assert desired.due(db, refresh_before=refresh_before, among=["dev-b", "dev-c"]) == ["dev-c"]
    desired.forget_published(db)
    assert sorted(desired.due(db, refresh_before=refresh_before)) == DEVICES


def test_reported_states_for_a_wave(db: Database) -> None:
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO deployment_status (device_id, name, model, version, state, since,"
            " updated_at) VALUES (?, 'tiny', 'tiny', ?, ?, 'now', 'now')",
            [("dev-a", 2, "serving"), ("dev-b", 2, "downloading"), ("dev-b", 1, "serving"),
             ("dev-c", 1, "serving")])
    assert deployments.reported_states(db, name="tiny", version=2, device_ids=DEVICES) == {
        "dev-a": "serving", "dev-b": "downloading"}
