"""API tokens: who may call the REST API, and with which role.

A token is shown once when created; the database keeps only its sha256, so a
stolen database file does not hand out working tokens.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hub.errors import Forbidden, NotFound, Unauthorized
from hub.storage.db import Database, format_time, now
from hub.validation import InvalidInput

ROLES = ("viewer", "operator", "admin")  # each role can do everything the one before can
DEVICE_ROLE = "device"  # outside that ladder: a device may only pull packages and report
TOKEN_PREFIX = "eft_"
DEVICE_TOKEN_PREFIX = "efd_"


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    role: str

    def can(self, role: str) -> bool:
        if self.role == DEVICE_ROLE or role == DEVICE_ROLE:
            return self.role == role
        return ROLES.index(self.role) >= ROLES.index(role)

    def require(self, role: str) -> None:
        if not self.can(role):
            raise Forbidden(f"this needs the {role} role; token {self.name!r} has {self.role}")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


MAX_LIFETIME = timedelta(days=3650)


def create(db: Database, *, name: str, role: str, created_by: str,
           expires_in: timedelta | None = None) -> tuple[dict, str]:
    """Make a token, valid for EXPIRES_IN (None: until revoked); returns its record and
    the secret, which is never stored."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if not 1 <= len(name) <= 64:
        raise InvalidInput("token name must be 1-64 characters")
    if expires_in is not None and not timedelta(minutes=1) <= expires_in <= MAX_LIFETIME:
        raise InvalidInput("a token expires between 1 minute and 3650 days after it is made")
    secret = new_secret(TOKEN_PREFIX)
    record = {
        "id": "tok-" + secrets.token_hex(4),
        "name": name,
        "role": role,
        "token_hash": hash_secret(secret),
        "created_at": now(),
        "created_by": created_by,
        "revoked_at": None,
        "expires_at": None if expires_in is None
        else format_time(datetime.now(UTC) + expires_in),
    }
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO api_tokens"
            " (id, name, role, token_hash, created_at, created_by, revoked_at, expires_at)"
            " VALUES (:id, :name, :role, :token_hash, :created_at, :created_by, :revoked_at,"
            " :expires_at)",
            record,
        )
    return public(record), secret


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "token_hash"}


def authenticate(db: Database, secret: str) -> Principal:
    if secret.startswith(DEVICE_TOKEN_PREFIX):
        device = db.query_one(
            "SELECT id FROM devices WHERE token_hash = ?", (hash_secret(secret),)
        )
        if device is None:
            raise Unauthorized("unknown device token; enroll the device again")
        return Principal(device["id"], device["id"], DEVICE_ROLE)
    row = db.query_one(
        "SELECT id, name, role, revoked_at, expires_at FROM api_tokens WHERE token_hash = ?",
        (hash_secret(secret),),
    )
    if row is None:
        raise Unauthorized("unknown API token; create one with `edgefleet token create`")
    if row["revoked_at"]:
        raise Unauthorized(f"API token {row['name']!r} was revoked at {row['revoked_at']}")
    if row["expires_at"] and row["expires_at"] <= now():
        raise Unauthorized(f"API token {row['name']!r} expired at {row['expires_at']}; "
                           "ask an admin for a new one (`edgefleet token create`)")
    return Principal(row["id"], row["name"], row["role"])


def list_tokens(db: Database) -> list[dict]:
    return [public(r) for r in db.query("SELECT * FROM api_tokens ORDER BY created_at")]


def revoke(db: Database, token_id: str) -> dict:
    with db.transaction() as conn:
        row = conn.execute("SELECT * FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFound(f"no API token with id {token_id!r}; see `edgefleet token list`")
        if not row["revoked_at"]:
            conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (now(), token_id))
    return public(db.query_one("SELECT * FROM api_tokens WHERE id = ?", (token_id,)) or {})
