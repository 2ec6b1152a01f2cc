"""The rollout rows the commands and the engine share: reading one with its typed spec,
moving it by the transition table, and finding the devices of a target."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hub import audit
from hub.devices import tag_filter
from hub.errors import NotFound
from hub.rollouts import spec as specs
from hub.rollouts.states import ANSWERED, TRANSITIONS, Event, RolloutState
from hub.storage.db import Database, now, parse_time


@dataclass(frozen=True)
class Rollout:
    """One rollout as the engine sees it: its spec (fixed at create) and where it is."""

    seq: int
    id: str
    spec: specs.RolloutSpec
    state: RolloutState
    current_wave: int
    wave_started_at: str | None
    created_at: str


def row(db: Database, rollout_id: str) -> dict[str, Any]:
    found = db.query_one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
    if found is None:
        raise NotFound(f"no rollout {rollout_id[:40]!r}; see `edgefleet rollout list`")
    return found


def load(db: Database, found: Mapping[str, Any]) -> Rollout:
    return Rollout(seq=found["seq"], id=found["id"], spec=stored_spec(db, found),
                   state=RolloutState(found["state"]), current_wave=found["current_wave"],
                   wave_started_at=found["wave_started_at"], created_at=found["created_at"])


def get(db: Database, rollout_id: str) -> Rollout:
    return load(db, row(db, rollout_id))


def stored_spec(db: Database, found: Mapping[str, Any]) -> specs.RolloutSpec:
    """The typed spec; a rollout created by a hub from before typed specs has its text
    columns checked once, here, and the result stored."""
    if found["spec"] is not None:
        return specs.RolloutSpec.from_json(found["spec"])
    spec = specs.parse(
        model=found["model"], version=found["version"], deployment=found["deployment"],
        target=json.loads(found["target"]), waves=found["waves"],
        max_failures=found["max_failures"], soak=found["soak"],
        device_timeout=found["device_timeout"], auto_rollback=bool(found["auto_rollback"]),
        traffic=found["traffic"], shadow=bool(found["shadow"]), priority=found["priority"],
        prefer=json.loads(found["prefer"]), max_error_rate=found["max_error_rate"],
        max_latency_ratio=found["max_latency_ratio"])
    with db.transaction() as conn:
        conn.execute("UPDATE rollouts SET spec = ? WHERE seq = ?", (spec.to_json(), found["seq"]))
    return spec


def transition(db: Database, rollout_id: str, event: Event, reason: str | None,
               actor: str = "rollout-engine") -> bool:
    """Move the rollout by EVENT if it is in one of the event's source states now;
    False if it is not. The check and the change are one write transaction, so the
    engine and a user acting at the same moment cannot undo each other (a pause
    overwritten by "completed", a wave started after an abort)."""
    sources, target = TRANSITIONS[event]
    with db.transaction() as conn:
        changed = conn.execute(
            "UPDATE rollouts SET state = ?, reason = ?, updated_at = ? WHERE id = ?"
            " AND state IN (SELECT value FROM json_each(?))",
            (target.value, reason, now(), rollout_id, json.dumps(sorted(sources)))).rowcount
        if changed:
            audit.record(db, actor=actor, action=f"rollout.{target.value}", target=rollout_id,
                         status=200, detail=reason or "")
    return bool(changed)


def target_devices(db: Database, target: Mapping[str, str], *,
                   outside: str | None = None) -> list[str]:
    """The devices matching TARGET; with OUTSIDE, only those not yet in that rollout."""
    clauses, params = tag_filter(target.items())
    if outside is not None:
        clauses.append("NOT EXISTS (SELECT 1 FROM rollout_devices m WHERE m.rollout_id = ?"
                       " AND m.device_id = devices.id)")
        params.append(outside)
    return [r["id"] for r in db.query(
        "SELECT id FROM devices" + (" WHERE " + " AND ".join(clauses) if clauses else ""),
        tuple(params))]


def soak_ends(db: Database, rollout: Rollout) -> datetime | None:
    """When the current wave will have soaked: the soak after its last device started
    serving; None while any device up to this wave has not answered yet."""
    waiting = db.query_one(
        "SELECT COUNT(*) AS n FROM rollout_devices WHERE rollout_id = ? AND wave <= ?"
        " AND state NOT IN (SELECT value FROM json_each(?))",
        (rollout.id, rollout.current_wave, json.dumps(sorted(ANSWERED))))
    if waiting is None or waiting["n"]:
        return None
    last = db.query_one(
        "SELECT MAX(serving_at) AS t FROM rollout_devices WHERE rollout_id = ? AND wave = ?",
        (rollout.id, rollout.current_wave))
    start = (last and last["t"]) or rollout.wave_started_at or rollout.created_at
    return parse_time(start) + timedelta(seconds=rollout.spec.soak.seconds)


def next_wave(db: Database, rollout: Rollout) -> int | None:
    """The wave after the current one, None when the current one is the last."""
    found = db.query_one(
        "SELECT MIN(wave) AS w FROM rollout_devices WHERE rollout_id = ? AND wave > ?",
        (rollout.id, rollout.current_wave))
    return None if found is None else found["w"]
