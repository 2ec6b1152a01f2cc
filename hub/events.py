"""Events: the hub's state changes as numbered records that others can follow.

The one definition of an event is here: its JSON shape (`Event`, version
`SCHEMA`), its types (`EventType`) and which audited action is which type
(`FROM_AUDIT`). Every audit entry that succeeded and names a state change
becomes an event in the same transaction (hub/audit.py calls `from_audit`);
device status changes and failed deployments are written by ingest and liveness
(`device_status`, `deployment_failures`, `record_many`), detected drift by
hub/drift.py (`record`). The SSE stream and the listing (hub/api/events.py) and
webhooks (hub/webhooks.py) read from the `events` table.

`seq` is SQLite's AUTOINCREMENT: it only grows, even after retention deleted
the newest rows, and since writers hold the write lock one at a time, an event
is committed before any event with a higher seq exists, so a reader that saw
seq N has missed nothing below it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from contract import protocol
from hub.storage.db import Connection, Database, dumps, now

SCHEMA: Final = 1  # bumped when a field is removed or changes meaning; new fields may come


class EventType(StrEnum):
    MODEL_REGISTERED = "model.registered"
    MODEL_DELETED = "model.deleted"
    PROFILE_DONE = "profile.done"
    MODEL_BASELINE_SET = "model.baseline_set"  # its drift baseline (hub/drift.py)
    PACKAGE_PUSHED = "package.pushed"
    PACKAGE_SIGNED = "package.signed"
    DEVICE_ENROLLED = "device.enrolled"
    DEVICE_DELETED = "device.deleted"
    DEVICE_TAGGED = "device.tagged"
    DEVICE_CERTIFIED = "device.certified"
    DEVICE_ONLINE = "device.online"
    DEVICE_OFFLINE = "device.offline"
    DEPLOYMENT_ASSIGNED = "deployment.assigned"
    DEPLOYMENT_REMOVED = "deployment.removed"
    DEPLOYMENT_FAILED = "deployment.failed"
    ROLLOUT_CREATED = "rollout.created"
    ROLLOUT_RUNNING = "rollout.running"
    ROLLOUT_WAVE = "rollout.wave"
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_COMPLETED = "rollout.completed"
    ROLLOUT_ABORTED = "rollout.aborted"
    ROLLOUT_ROLLED_BACK = "rollout.rolled_back"
    ROLLOUT_FAILED = "rollout.failed"
    TOKEN_CREATED = "token.created"
    TOKEN_REVOKED = "token.revoked"
    ENROLLMENT_TOKEN_CREATED = "enrollment_token.created"
    ENROLLMENT_TOKEN_REVOKED = "enrollment_token.revoked"
    WEBHOOK_CREATED = "webhook.created"
    WEBHOOK_REMOVED = "webhook.removed"
    KEY_PREPARED = "key.prepared"
    KEY_ROTATED = "key.rotated"
    KEY_ROOT_SET = "key.root_set"
    DESIRED_REPLACED = "desired.replaced"  # a state on the broker the hub did not publish
    DRIFT_DETECTED = "drift.detected"  # written by hub/drift.py when a feature starts drifting


T = EventType
# Audited actions that are state changes. Actions not here are requests for one (a
# user's "rollout.pause": the state change it causes, "rollout.paused", is audited
# by the rollout store) or change nothing lasting (a sign-in, one blob of a push).
FROM_AUDIT: Final[dict[str, EventType]] = {
    "model.register": T.MODEL_REGISTERED,
    "model.delete": T.MODEL_DELETED,
    "model.profile": T.PROFILE_DONE,
    "model.baseline": T.MODEL_BASELINE_SET,
    "registry.push": T.PACKAGE_PUSHED,
    "package.sign": T.PACKAGE_SIGNED,
    "device.enroll": T.DEVICE_ENROLLED,
    "device.delete": T.DEVICE_DELETED,
    "device.tag": T.DEVICE_TAGGED,
    "device.certificate": T.DEVICE_CERTIFIED,
    "device.deploy": T.DEPLOYMENT_ASSIGNED,
    "device.undeploy": T.DEPLOYMENT_REMOVED,
    "rollout.create": T.ROLLOUT_CREATED,
    "rollout.running": T.ROLLOUT_RUNNING,
    "rollout.wave": T.ROLLOUT_WAVE,
    "rollout.paused": T.ROLLOUT_PAUSED,
    "rollout.completed": T.ROLLOUT_COMPLETED,
    "rollout.aborted": T.ROLLOUT_ABORTED,
    "rollout.rolled_back": T.ROLLOUT_ROLLED_BACK,
    "rollout.failed": T.ROLLOUT_FAILED,
    "token.create": T.TOKEN_CREATED,
    "token.revoke": T.TOKEN_REVOKED,
    "enrollment_token.create": T.ENROLLMENT_TOKEN_CREATED,
    "enrollment_token.revoke": T.ENROLLMENT_TOKEN_REVOKED,
    "webhook.add": T.WEBHOOK_CREATED,
    "webhook.remove": T.WEBHOOK_REMOVED,
    "keys.prepare": T.KEY_PREPARED,
    "keys.rotate": T.KEY_ROTATED,
    "keys.root": T.KEY_ROOT_SET,
    "desired.stale": T.DESIRED_REPLACED,
}
MAX_PATTERNS: Final = 32


class Event(BaseModel):
    """One event, as the stream, the listing and webhooks send it (JSON schema version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_: Literal[1] = Field(SCHEMA, alias="schema",
                                description="version of this shape; consumers check it")
    id: int = Field(description="sequence number: higher for each later event, never reused")
    type: EventType
    at: str = Field(description="when, UTC ISO 8601 with microseconds and Z")
    actor: str = Field(description="who caused it: a token name, or a hub component "
                       "(rollout-engine, liveness, ingest)")
    subject: str = Field(description="what it is about: MODEL:VERSION, a rollout id "
                         "(r-N), a device id, DEVICE/DEPLOYMENT, a token or webhook id")
    detail: str = Field(description="free text from the change (a rollout's reason); "
                        "anyone's text: escape it before showing it")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Event:
        return cls(schema=SCHEMA, id=row["seq"], type=row["type"], at=row["at"],
                   actor=row["actor"], subject=row["subject"], detail=row["detail"])

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


class BadPattern(ValueError):
    """A type pattern that matches no event type, or too many patterns."""


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """PATTERNS (globs like 'rollout.*') if each matches at least one event type."""
    if len(patterns) > MAX_PATTERNS:
        raise BadPattern(f"at most {MAX_PATTERNS} event type patterns, got {len(patterns)}")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(t.value, pattern) for t in EventType):
            raise BadPattern(f"event type pattern {pattern[:80]!r} matches no event type; "
                             f"types are like {EventType.ROLLOUT_PAUSED.value!r}, patterns "
                             "like 'rollout.*'")
    return list(patterns)


def types_matching(patterns: Iterable[str]) -> list[str]:
    """The event types any of PATTERNS matches (all of them for none)."""
    wanted = list(patterns)
    return [t.value for t in EventType
            if not wanted or any(fnmatch.fnmatchcase(t.value, p) for p in wanted)]


def record(conn: Connection, kind: EventType, *, subject: str, actor: str,
           detail: str = "") -> None:
    """Add one event in the caller's transaction, so it commits with the change."""
    conn.execute("INSERT INTO events (at, type, subject, actor, detail) VALUES (?, ?, ?, ?, ?)",
                 (now(), kind.value, subject[:500], actor[:200], detail[:1000]))


def record_many(conn: Connection, kind: EventType, subjects: Iterable[str], *,
                actor: str, detail: str = "") -> None:
    stamp = now()
    conn.executemany(
        "INSERT INTO events (at, type, subject, actor, detail) VALUES (?, ?, ?, ?, ?)",
        [(stamp, kind.value, subject[:500], actor[:200], detail[:1000]) for subject in subjects])


def device_status(conn: Connection, statuses: Mapping[str, str], *,
                  actor: str) -> None:
    """device.online / device.offline for each device whose status STATUSES changes;
    called in the transaction that writes them, before it does. A status the device
    already has (the broker replays retained ones on every subscribe) is no event."""
    if not statuses:
        return
    changed = [(r[0], statuses[r[0]]) for r in conn.execute(
        "SELECT d.id, d.status FROM devices d JOIN json_each(?) s ON s.value = d.id",
        (dumps(sorted(statuses)),)) if r[1] != statuses[r[0]]]
    for status in ("online", "offline"):
        record_many(conn, EventType(f"device.{status}"),
                    [device for device, now_status in changed if now_status == status],
                    actor=actor)


def deployment_failures(conn: Connection,
                        reports: Mapping[str, Iterable[protocol.DeploymentStatus]], *,
                        actor: str) -> None:
    """deployment.failed for each version a device of REPORTS (device -> what it reports
    now) reports failed that was not before; called in the transaction that replaces
    their rows, before it does. One query for all of them: the ingest calls this per batch."""
    if not reports:
        return
    before = {(r[0], r[1], r[2]): r[3] for r in conn.execute(
        "SELECT device_id, name, version, state FROM deployment_status"
        " WHERE device_id IN (SELECT value FROM json_each(?))", (dumps(sorted(reports)),))}
    for device, deployments in reports.items():
        for d in deployments:
            if d.state == protocol.UpdateState.FAILED and \
                    before.get((device, d.name, d.version)) != protocol.UpdateState.FAILED:
                record(conn, EventType.DEPLOYMENT_FAILED, subject=f"{device}/{d.name}",
                       actor=actor, detail=f"{d.model}:{d.version}: {d.error or 'no reason given'}")


def from_audit(conn: Connection, *, action: str, target: str, actor: str,
               status: int, detail: str) -> None:
    """The event of an audit entry, if it is a state change that happened."""
    kind = FROM_AUDIT.get(action)
    if kind is not None and status < 400:
        record(conn, kind, subject=target, actor=actor, detail=detail)


def after(db: Database, seq: int, *, types: Sequence[str] = (), limit: int = 100) -> list[Event]:
    """Events with a seq above SEQ, oldest first, of TYPES (all for none)."""
    rows = db.query(
        "SELECT * FROM events WHERE seq > ?"
        + (" AND type IN (SELECT value FROM json_each(?))" if types else "")
        + " ORDER BY seq LIMIT ?",
        (seq, dumps(list(types)), limit) if types else (seq, limit))
    return [Event.from_row(r) for r in rows]


def newest(db: Database, *, before: int | None = None, types: Sequence[str] = (),
           limit: int = 100) -> list[Event]:
    """The newest LIMIT events below BEFORE (all for None), oldest first."""
    clauses = ["seq < ?"]
    params: list[int | str] = [before if before is not None else 2**63 - 1]
    if types:
        clauses.append("type IN (SELECT value FROM json_each(?))")
        params.append(dumps(list(types)))
    rows = db.query("SELECT * FROM events WHERE " + " AND ".join(clauses)
                    + " ORDER BY seq DESC LIMIT ?", (*params, limit))
    return [Event.from_row(r) for r in reversed(rows)]


def last_seq(db: Database) -> int:
    """The highest seq ever given (0 for none): deleted events count too."""
    return db.last_given("events", "seq")
