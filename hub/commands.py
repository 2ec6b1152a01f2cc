"""Commands to one device (contract/protocol.py `Command`), and what became of each.

One kind for now: `profile` a model version on the device, where its accelerators
are. A command is recorded here (`device_commands`, schema 9) before it is signed
and published on the device's commands topic; the device answers over HTTPS with
its own token (`running`, then `done` with profile rows or `failed` with an error),
and a done profile is stored with the version like any other (hub/profiles.py),
its host being the device's id and its device class the platform the device
measured on. A command nobody answered before it expired (device gone offline, a
refusal, a crash) reads as `expired`; a late answer is refused.

Bounded: a device runs one profile at a time (a second is a 409 while the first is
sent or running), only an online device is asked, and the arguments are range-
checked here and again by the agent (the protocol's reader).
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from contract import protocol
from contract.protocol import CommandKind, CommandResult, CommandState, ProfileArgs
from hub import packages, profiles, registry
from hub.errors import Conflict, NotFound, Unprocessable
from hub.storage.db import Connection, Database, format_time

ACTIVE = (CommandState.SENT, CommandState.RUNNING)
DEFAULT_VALIDITY = timedelta(minutes=10)
_COLUMNS = ("id, device_id, kind, model, version, variant, max_batch, iterations, state,"
            " error, rows, issued_at, expires_at, updated_at, created_by")


def _now() -> datetime:
    return datetime.now(UTC)


def _expire(conn: Connection, now: datetime) -> None:
    """Mark commands past their expiry that never finished as expired."""
    conn.execute("UPDATE device_commands SET state = ?, updated_at = ? WHERE state IN (?, ?)"
                 " AND expires_at <= ?", (CommandState.EXPIRED, format_time(now), *ACTIVE,
                                          format_time(now)))


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "rows": json.loads(row["rows"]) if row["rows"] else []}


def create_profile(db: Database, device_id: str, args: ProfileArgs, *, validity: timedelta,
                   actor: str) -> tuple[dict[str, Any], protocol.Command]:
    """Record a profile command to DEVICE_ID and return it with the command to sign.
    NotFound for an unknown device, version or package; Conflict when the device is
    offline or already profiling."""
    if not timedelta(seconds=1) <= validity <= protocol.MAX_COMMAND_VALIDITY:
        raise Unprocessable(f"a command is valid for 1 s to {protocol.MAX_COMMAND_VALIDITY},"
                            f" not {validity}")
    now = _now()
    command = protocol.Command(
        id="c-" + secrets.token_hex(8), device_id=device_id, issued_at=now,
        expires_at=now + validity, kind=CommandKind.PROFILE, profile=args)
    with db.transaction() as conn:
        device = db.query_one("SELECT id, status, last_seen FROM devices WHERE id = ?",
                              (device_id,))
        if device is None:
            raise NotFound(f"no device with id {device_id!r}; see `edgefleet device list`")
        if device["status"] != "online":
            raise Conflict(f"device {device_id} is offline (last seen "
                           f"{device['last_seen'] or 'never'}): start its agent, or profile "
                           "on this machine without --device")
        registry.get_version(db, args.model, args.version)
        packages.resolve_package(db, args.model, args.version, args.variant)
        _expire(conn, now)
        busy = db.query_one("SELECT id, state, expires_at FROM device_commands WHERE"
                            " device_id = ? AND state IN (?, ?)", (device_id, *ACTIVE))
        if busy is not None:
            raise Conflict(f"device {device_id} is already profiling (command {busy['id']}, "
                           f"{busy['state']}, expires {busy['expires_at']}); wait for it")
        conn.execute(
            f"INSERT INTO device_commands ({_COLUMNS}) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?)",
            (command.id, device_id, str(command.kind), args.model, args.version, args.variant,
             args.max_batch, args.iterations, CommandState.SENT, format_time(now),
             format_time(command.expires_at), format_time(now), actor))
    return get(db, device_id, command.id), command


def fail(db: Database, device_id: str, command_id: str, error: str) -> None:
    """The hub could not deliver the command: it ends failed with ERROR."""
    with db.transaction() as conn:
        conn.execute("UPDATE device_commands SET state = ?, error = ?, updated_at = ?"
                     " WHERE id = ? AND device_id = ?",
                     (CommandState.FAILED, error[:protocol.MAX_TEXT], format_time(_now()),
                      command_id, device_id))


def get(db: Database, device_id: str, command_id: str) -> dict[str, Any]:
    """The command's record; one past its expiry that never finished is marked expired
    first (a write only then: the CLI polls this)."""
    query = f"SELECT {_COLUMNS} FROM device_commands WHERE id = ? AND device_id = ?"
    row = db.query_one(query, (command_id, device_id))
    if row is None:
        raise NotFound(f"device {device_id} has no command {command_id!r}")
    now = _now()
    if row["state"] in ACTIVE and row["expires_at"] <= format_time(now):
        with db.transaction() as conn:
            _expire(conn, now)
        row = db.query_one(query, (command_id, device_id)) or row
    return _record(row)


def record_result(db: Database, result: CommandResult) -> dict[str, Any]:
    """Take a device's answer: RUNNING, or DONE (its rows stored as the version's profile
    measured on the device) or FAILED. Conflict for a command that ended already or
    expired; Unprocessable for rows the profile store refuses or that do not match."""
    device_id, command_id = result.device_id, result.command_id
    with db.transaction() as conn:
        now = _now()
        _expire(conn, now)
        row = db.query_one(f"SELECT {_COLUMNS} FROM device_commands WHERE id = ? AND"
                           " device_id = ?", (command_id, device_id))
        if row is None:
            raise NotFound(f"device {device_id} has no command {command_id!r}")
        if row["state"] not in ACTIVE or (row["state"] == CommandState.RUNNING
                                          and result.state is CommandState.RUNNING):
            raise Conflict(f"command {command_id} is {row['state']}; a {result.state} "
                           "answer is not taken")
        if result.state is CommandState.DONE:
            _store_rows(db, row, result.rows)
        conn.execute("UPDATE device_commands SET state = ?, error = ?, rows = ?, updated_at = ?"
                     " WHERE id = ?",
                     (result.state, result.error, json.dumps([dict(r) for r in result.rows])
                      if result.rows else None, format_time(now), command_id))
    return get(db, device_id, command_id)


def _store_rows(db: Database, command: dict[str, Any], rows: tuple[Any, ...]) -> None:
    platform = (db.query_one("SELECT platform FROM devices WHERE id = ?",
                             (command["device_id"],)) or {}).get("platform")
    for row in rows:
        if row["variant"] != command["variant"]:
            raise Unprocessable(f"profile variant {row['variant']!r} is not the command's "
                                f"{command['variant']!r}")
        if platform and row["device_class"] != platform:
            raise Unprocessable(f"profile device_class {row['device_class']!r} is not the "
                                f"platform the device reports ({platform})")
    profiles.store(db, command["model"], command["version"], rows, host=command["device_id"],
                   profiled_by=command["created_by"])
