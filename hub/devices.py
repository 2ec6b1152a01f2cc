"""Devices and the enrollment tokens that let them join.

An enrollment token carries the tags its devices start with, an expiry and a
use limit. Like API tokens, only the token's hash is stored.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from contract import names
from hub import validation
from hub.errors import NotFound, Unauthorized
from hub.storage.db import Database, dumps, format_time, now
from hub.tokens import DEVICE_TOKEN_PREFIX, hash_secret, new_secret
from hub.validation import InvalidInput

ENROLL_PREFIX = "efe_"
MAX_TOKEN_LIFETIME = timedelta(days=365)


def _token_record(row: dict[str, Any]) -> dict[str, Any]:
    record = {k: v for k, v in row.items() if k != "token_hash"}
    record["tags"] = json.loads(row["tags"])
    return record


def create_enrollment_token(
    db: Database,
    *,
    tags: dict[str, str],
    expires_in: timedelta,
    max_uses: int | None,
    created_by: str,
) -> tuple[dict[str, Any], str]:
    tags = validation.tags(tags)
    if not timedelta(seconds=1) <= expires_in <= MAX_TOKEN_LIFETIME:
        raise InvalidInput("enrollment tokens must expire within 1 second to 365 days")
    if max_uses is not None and max_uses < 1:
        raise InvalidInput("max_uses must be at least 1 (or left out for no limit)")
    secret = new_secret(ENROLL_PREFIX)
    expires_at = format_time(datetime.now(UTC) + expires_in)
    row = {
        "id": "enr-" + secrets.token_hex(4),
        "token_hash": hash_secret(secret),
        "tags": dumps(tags),
        "expires_at": expires_at,
        "max_uses": max_uses,
        "uses": 0,
        "created_at": now(),
        "created_by": created_by,
        "revoked_at": None,
    }
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO enrollment_tokens VALUES (:id, :token_hash, :tags, :expires_at,"
            " :max_uses, :uses, :created_at, :created_by, :revoked_at)",
            row,
        )
    return _token_record(row), secret


def list_enrollment_tokens(db: Database) -> list[dict[str, Any]]:
    return [
        _token_record(r) for r in db.query("SELECT * FROM enrollment_tokens ORDER BY created_at")
    ]


def revoke_enrollment_token(db: Database, token_id: str) -> None:
    with db.transaction() as conn:
        updated = conn.execute(
            "UPDATE enrollment_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
            (now(), token_id),
        ).rowcount
    if not updated:
        raise NotFound(f"no enrollment token with id {token_id!r}")


def enroll(
    db: Database, *, secret: str, public_key: str, name: str, platform: str | None = None,
    grant: Callable[[str, str], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """Spend one use of an enrollment token on a new device record.

    Returns the device and its own credential (shown once, stored hashed),
    which the device uses from then on instead of the enrollment token.
    GRANT(device_id, credential) gives it its broker login once the device
    is stored (the database's write lock is not held while the broker
    reloads); if it raises, the device is removed again and the token's use
    given back.
    """
    if not 1 <= len(name) <= 128:
        raise InvalidInput("device name must be 1-128 characters")
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT * FROM enrollment_tokens WHERE token_hash = ?", (hash_secret(secret),)
        ).fetchone()
        if row is None:
            raise Unauthorized("unknown enrollment token")
        if row["revoked_at"]:
            raise Unauthorized("this enrollment token was revoked")
        if row["expires_at"] <= now():
            raise Unauthorized(f"this enrollment token expired at {row['expires_at']}")
        if row["max_uses"] is not None and row["uses"] >= row["max_uses"]:
            raise Unauthorized(f"this enrollment token was already used {row['uses']} times")
        conn.execute("UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = ?", (row["id"],))
        device_id = "dev-" + secrets.token_hex(6)
        device_secret = new_secret(DEVICE_TOKEN_PREFIX)
        conn.execute(
            "INSERT INTO devices (id, name, tags, public_key, platform, inventory, reported,"
            " status, last_seen, enrolled_at, enrollment_token_id, token_hash,"
            " desired_generation, applied_generation, published_generation)"
            " VALUES (?, ?, ?, ?, ?, '{}', '{}', 'offline', NULL, ?, ?, ?, 0, 0, 0)",
            (device_id, name, row["tags"], public_key, platform, now(), row["id"],
             hash_secret(device_secret)),
        )
    if grant is not None:
        try:
            grant(device_id, device_secret)
        except Exception:
            delete_device(db, device_id)
            with db.transaction() as conn:
                conn.execute("UPDATE enrollment_tokens SET uses = uses - 1 WHERE id = ?",
                             (row["id"],))
            raise
    return get_device(db, device_id), device_secret


def _device_record(row: dict[str, Any]) -> dict[str, Any]:
    record = {k: v for k, v in row.items() if k != "token_hash"}
    for key in ("tags", "inventory", "reported"):
        record[key] = json.loads(row[key] or "{}")
    return record


def tag_filter(tags: Iterable[tuple[str, str]], devices: str = "devices"
               ) -> tuple[list[str], list[Any]]:
    """SQL clauses, and their parameters, true for a row of DEVICES (the table or its
    alias) that has every (key, value) of TAGS: the one tag filter of device lists,
    rollout targets, the dashboard and drift.

    The key goes into json_extract's path rather than through a json_each scan: on
    PostgreSQL json_each is a function of ours that it cannot inline, and running it for
    every device took ~0.6 s at 10,000 devices (bench/rollout.py --database postgresql).
    A key outside the tag grammar, which leaves no quote to end the path, matches none."""
    clauses: list[str] = []
    params: list[Any] = []
    for key, value in tags:
        if not names.TAG_KEY.matches(key):
            clauses.append("1 = 0")
            continue
        clauses.append(f"json_extract({devices}.tags, '$.\"{key}\"') = ?")
        params.append(value)
    return clauses, params


def list_devices(
    db: Database, *, tags: Sequence[tuple[str, str]] = (), limit: int = 1000, offset: int = 0
) -> list[dict[str, Any]]:
    clauses, params = tag_filter(tags)
    rows = db.query(
        "SELECT * FROM devices"
        + (" WHERE " + " AND ".join(clauses) if clauses else "")
        + " ORDER BY name, id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    return [_device_record(r) for r in rows]


def get_device(db: Database, device_id: str) -> dict[str, Any]:
    row = db.query_one("SELECT * FROM devices WHERE id = ?", (device_id,))
    if row is None:
        raise NotFound(f"no device with id {device_id!r}; see `edgefleet device list`")
    return _device_record(row)


def ids(db: Database) -> set[str]:
    """Every enrolled device's id."""
    return {r["id"] for r in db.query("SELECT id FROM devices")}


def delete_device(db: Database, device_id: str) -> None:
    """Forget a device: its record and credential, what it should run and
    reported, and its telemetry, raw and rolled up. Rollout records keep its id as
    history."""
    with db.transaction() as conn:
        if not conn.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount:
            raise NotFound(f"no device with id {device_id!r}; see `edgefleet device list`")
        for table in ("deployments", "deployment_status", "telemetry", "telemetry_rollups",
                      "telemetry_rolled", "device_commands"):
            conn.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,))


def update_tags(
    db: Database, device_id: str, *, set_tags: dict[str, str], remove: Sequence[str]
) -> dict[str, Any]:
    set_tags = validation.tags(set_tags)
    with db.transaction() as conn:
        row = conn.execute("SELECT tags FROM devices WHERE id = ?", (device_id,)).fetchone()
        if row is None:
            raise NotFound(f"no device with id {device_id!r}; see `edgefleet device list`")
        tags = json.loads(row[0])
        for key in remove:
            tags.pop(key, None)
        tags.update(set_tags)
        conn.execute("UPDATE devices SET tags = ? WHERE id = ?", (dumps(tags), device_id))
    return get_device(db, device_id)
