"""Who needs a model version or one of its packages: the one answer behind every 409 that
protects them (a version delete, a package rebuilt under a taken name, a tag moved).

A version is needed by the active deployments that run it (as primary or candidate), by
the rollouts still under way (created, running, paused or failed: each can still assign
it or roll back) that ship it, and by those rollouts' devices whose rollback would give
it back. A package (one variant) is needed by the same, narrowed to that variant.
"""

from __future__ import annotations

import json

from contract.names import DEFAULT_VARIANT
from hub.rollouts.states import HOLDING, RolloutState
from hub.storage.db import Database

# Rollouts that may still assign their version or roll back to the one before it.
UNDER_WAY = sorted({RolloutState.CREATED, *HOLDING})
_SHOWN = 3


def _few(items: list[str], total: int) -> str:
    return ", ".join(items[:_SHOWN]) + (f" and {total - _SHOWN} more" if total > _SHOWN else "")


def users(db: Database, model: str, version: int, variant: str | None = None) -> list[str]:
    """What needs MODEL:VERSION (of VARIANT only, when given), each as a short phrase
    ('deployment diabetes on dev-1, dev-2', 'rollout r-3 (running)', 'rollout r-2's rollback
    on dev-4'); empty when nothing does."""
    found: list[str] = []
    rows = db.query(
        "SELECT name, device_id, version, variant, candidate_version, candidate_variant"
        " FROM deployments WHERE model = ? AND active = 1"
        " AND (version = ? OR candidate_version = ?) ORDER BY name, device_id",
        (model, version, version))
    rows = [r for r in rows if variant is None
            or (r["version"] == version and (r["variant"] or DEFAULT_VARIANT) == variant)
            or (r["candidate_version"] == version
                and (r["candidate_variant"] or DEFAULT_VARIANT) == variant)]
    by_name: dict[str, list[str]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r["device_id"])
    for name, devices in by_name.items():
        found.append(f"deployment {name} on {_few(devices, len(devices))}")
    for r in db.query(
            "SELECT id, state, spec FROM rollouts WHERE model = ? AND version = ?"
            " AND state IN (SELECT value FROM json_each(?)) ORDER BY seq",
            (model, version, json.dumps(UNDER_WAY))):
        if variant is None or _spec_variant(r["spec"]) == variant:
            found.append(f"rollout {r['id']} ({r['state']})")
    rollbacks: dict[str, list[str]] = {}
    for r in db.query(
            "SELECT d.rollout_id, d.device_id FROM rollout_devices d JOIN rollouts r"
            " ON r.id = d.rollout_id WHERE r.model = ? AND d.previous_version = ?"
            " AND (? IS NULL OR COALESCE(d.previous_variant, ?) = ?)"
            " AND d.assigned_at IS NOT NULL AND d.state NOT IN ('skipped', 'rolled_back')"
            " AND r.state IN (SELECT value FROM json_each(?)) ORDER BY r.seq, d.device_id",
            (model, version, variant, DEFAULT_VARIANT, variant, json.dumps(UNDER_WAY))):
        rollbacks.setdefault(r["rollout_id"], []).append(r["device_id"])
    for rollout_id, devices in rollbacks.items():
        found.append(f"rollout {rollout_id}'s rollback on {_few(devices, len(devices))}")
    return found


def describe(users_found: list[str]) -> str:
    """USERS_FOUND as one clause for an error line."""
    return "; ".join(users_found[:5]) + (
        f"; and {len(users_found) - 5} more" if len(users_found) > 5 else "")


def _spec_variant(text: str | None) -> str:
    if text is None:
        return DEFAULT_VARIANT
    value = json.loads(text).get("variant", DEFAULT_VARIANT)
    return value if isinstance(value, str) else DEFAULT_VARIANT


def named(model: str, version: int | str, variant: str) -> str:
    return f"{model}:{version}" + ("" if variant == DEFAULT_VARIANT else f" variant {variant}")


def refusal(db: Database, model: str, version: int, variant: str, digest: str) -> str:
    """The one line refusing another package under a variant name that is taken."""
    used = users(db, model, version, variant)
    flag = "a new name with --variant NAME" if variant == DEFAULT_VARIANT else \
        "another --variant NAME"
    return (f"{named(model, version, variant)} already has a package ({digest[:19]}...) "
            "built from other inputs, and a package never changes"
            + (f"; it is used by {describe(used)}" if used else "")
            + f"; build this one under {flag}")
