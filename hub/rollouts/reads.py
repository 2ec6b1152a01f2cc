"""What the API shows of rollouts: the list, and one rollout with its progress per wave,
its failed and skipped devices, and when its current wave's soak ends."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from contract.names import DEFAULT_VARIANT
from contract.settings import Settings, SettingsError
from hub.rollouts import store
from hub.rollouts.states import RolloutState
from hub.storage.db import Database, format_time


def _public(row: dict[str, Any]) -> dict[str, Any]:
    record = {k: v for k, v in row.items() if k not in ("seq", "spec")}
    record["target"] = json.loads(row["target"])
    record["prefer"] = json.loads(row["prefer"])
    record["auto_rollback"] = bool(row["auto_rollback"])
    record["shadow"] = bool(row["shadow"])
    record["variant"] = _variant(row["spec"])
    record.update(_settings(row["spec"]))
    return record


def _variant(spec: str | None) -> str:
    # Read from the stored spec without checking the rest: a listing shows what is stored.
    value = json.loads(spec).get("variant") if spec else None
    return value if isinstance(value, str) else DEFAULT_VARIANT


def _settings(spec: str | None) -> dict[str, Any]:
    """The deployment settings it gives, as `Settings.shown` writes them."""
    value = json.loads(spec).get("settings") if spec else None
    try:
        return Settings.from_json(value or {}).shown()
    except SettingsError:  # a listing shows what it can; the engine refuses a bad spec
        return Settings().shown()


def list_rollouts(db: Database, *, state: RolloutState | None = None) -> list[dict[str, Any]]:
    rows = db.query(
        "SELECT r.*, (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout_id = r.id) AS devices,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout_id = r.id"
        "  AND d.state = 'serving') AS serving,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout_id = r.id"
        "  AND d.state = 'failed') AS failed"
        " FROM rollouts r" + (" WHERE r.state = ?" if state else "") + " ORDER BY r.seq DESC",
        (state.value,) if state else ())
    return [_public(r) for r in rows]


def show(db: Database, rollout_id: str, *, devices: bool = False,
         at: datetime | None = None) -> dict[str, Any]:
    """The rollout with its progress per wave and its failed and skipped devices;
    DEVICES adds every member device's row (wave, state, times, error). The soak of a
    running wave is told as of AT (now)."""
    row = store.row(db, rollout_id)
    record = _public(row)
    counts = db.query(
        "SELECT wave, state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = ?"
        " GROUP BY wave, state ORDER BY wave", (rollout_id,))
    waves: dict[int, dict[str, int]] = {}
    for c in counts:
        waves.setdefault(c["wave"], {})[c["state"]] = c["n"]
    record["waves_progress"] = [
        {"wave": w, "devices": sum(counted.values()), **counted}
        for w, counted in sorted(waves.items())
    ]
    record["failed_devices"] = db.query(
        "SELECT device_id, wave, state, error FROM rollout_devices WHERE rollout_id = ?"
        " AND state IN ('failed', 'skipped') ORDER BY wave, device_id LIMIT 200", (rollout_id,))
    record.update(_soak(db, row, at or datetime.now(UTC)))
    if devices:
        record["devices"] = db.query(
            "SELECT device_id, wave, state, previous_version, previous_variant, assigned_at,"
            " serving_at, error"
            " FROM rollout_devices WHERE rollout_id = ? ORDER BY wave, device_id", (rollout_id,))
    return record


def _soak(db: Database, row: dict[str, Any], at: datetime) -> dict[str, Any]:
    """When the running wave's soak ends, the seconds left at AT, and when the next wave
    starts (None while the wave's devices have not all answered, or with no next wave)."""
    soak: dict[str, Any] = {"soak_ends_at": None, "soak_left_s": None, "next_wave_at": None}
    if row["state"] != RolloutState.RUNNING or row["current_wave"] < 1:
        return soak
    try:
        rollout = store.load(db, row)
    except ValueError:  # a spec from an older hub that no longer passes: the engine
        return soak     # fails the rollout, with the reason, on its next tick
    ends = store.soak_ends(db, rollout)
    if ends is not None:
        soak["soak_ends_at"] = format_time(ends)
        soak["soak_left_s"] = max(0, round((ends - at).total_seconds()))
        if store.next_wave(db, rollout) is not None:
            soak["next_wave_at"] = soak["soak_ends_at"]
    return soak
