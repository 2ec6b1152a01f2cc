"""Deployments: what each device should run, and what it reports running.

The `deployments` table holds one row per (device, deployment name): a model
version with its package (repository, digest, size: what the agent fetches
and checks), runtime preferences, and optionally a candidate version for an
A/B split or shadow mode. Every change bumps the device's
`desired_generation` in the same transaction, so a generation names exactly
one set of rows. A change that changes nothing bumps nothing.

The batch forms (`assign_many`, `unassign_many`) are what the rollout engine
calls: one package lookup and one transaction for a whole wave. Publishing is
not done here: after the commit, callers hand the device ids to the
publisher (`FleetLink.notify`), which publishes those whose generation is
ahead of what the broker holds.

`deployment_status` holds what devices report, one row per deployment
version; `reported_states` answers a rollout's "who serves version X".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contract import names
from contract.names import DEFAULT_VARIANT
from contract.protocol import MAX_DEPLOYMENTS
from contract.runtimes import RUNTIMES
from contract.settings import (
    Batching,
    Resources,
    Settings,
    SettingsError,
    accelerator_pairs,
    parse_cpus,
    parse_memory,
)
from hub import package_use, packages, registry
from hub.errors import Conflict, NotFound
from hub.oci_registry import Manifest
from hub.storage.db import Connection, Database, dumps, now
from hub.validation import InvalidInput, InvalidName, model_name

MAX_PREFER = 32
# The columns that make up a deployment; a change to any of them is a new generation.
_VALUES = ("model", "version", "variant", "repository", "digest", "size", "prefer", "traffic",
           "candidate_version", "candidate_variant", "candidate_digest", "candidate_size",
           "candidate_traffic", "candidate_shadow", "settings", "rollout_id", "priority")


@dataclass(frozen=True)
class Candidate:
    """A second version beside the deployment's own: SPLIT takes TRAFFIC percent
    of requests (1-99); SHADOW gets a copy of TRAFFIC percent (1-100)."""

    version: int | str
    traffic: int
    shadow: bool = False
    variant: str = DEFAULT_VARIANT

    def check(self) -> None:
        high = 100 if self.shadow else 99
        if not 1 <= self.traffic <= high:
            kind = "a shadow candidate" if self.shadow else "a split candidate"
            raise InvalidInput(f"candidate traffic must be 1-{high} for {kind}, got "
                               f"{self.traffic}")


def check_name(name: str) -> str:
    try:
        return model_name(name)
    except InvalidName:
        raise InvalidInput(
            f"invalid deployment name {name[:80]!r}: use lower-case letters and digits, "
            "separated by single '.', '_' or '-' (at most 64)"
        ) from None


def check_prefer(prefer: Sequence[str]) -> list[str]:
    if len(prefer) > MAX_PREFER:
        raise InvalidInput(f"prefer lists {len(prefer)} choices; the limit is {MAX_PREFER}")
    for choice in prefer:
        if not names.RUNTIME_CHOICE.matches(choice) or choice.partition(":")[0] not in RUNTIMES:
            raise InvalidInput(
                f"prefer entry {choice[:80]!r} must look like RUNTIME:DEVICE with RUNTIME one "
                f"of {', '.join(RUNTIMES)} (e.g. openvino:GPU, onnxruntime:CPU)"
            )
    return list(prefer)


def settings_from(resources: Mapping[str, Any] | None,
                  batching: Mapping[str, Any] | str | None) -> Settings:
    """A deployment's settings from what a user gave (the REST API's `resources` and
    `batching`, as `Settings.shown` writes them back); InvalidInput with one line."""
    try:
        given = dict(resources or {})
        unknown = sorted(set(given) - {"cpus", "memory", "accelerators"})
        if unknown:
            raise SettingsError(f"resources.{unknown[0]}: unknown field")
        cpus, memory = given.get("cpus"), given.get("memory")
        chosen = Resources(
            cpu_millis=None if cpus is None else parse_cpus(cpus),
            memory_bytes=None if memory is None else parse_memory(memory),
            accelerators=accelerator_pairs(given.get("accelerators") or {}))
        if batching is None:
            return Settings(chosen)
        if isinstance(batching, str):
            if batching != "off":
                raise SettingsError(f"batching {batching[:20]!r}: give an object or 'off'")
            return Settings(chosen, Batching.OFF)
        return Settings(chosen, Batching.from_json(dict(batching)))
    except SettingsError as exc:
        raise InvalidInput(str(exc)) from None


def signed_package(db: Database, model: str, version: int | str,
                   variant: str = DEFAULT_VARIANT) -> tuple[int, Manifest]:
    """The version number and its package VARIANT, which the hub must have signed."""
    try:
        names.variant(variant)
    except names.InvalidName as exc:
        raise InvalidInput(str(exc)) from None
    number = registry.get_version(db, model, version)["version"]  # NotFound names the fix
    found = packages.resolve_package(db, model, number, variant)  # NotFound: build one
    if not packages.is_signed(db, model, found):
        flag = "" if variant == DEFAULT_VARIANT else f" --variant {variant}"
        query = "" if variant == DEFAULT_VARIANT else f"?variant={variant}"
        raise Conflict(
            f"the package of {package_use.named(model, number, variant)} is not signed, and "
            f"agents refuse unsigned packages; sign it with `edgefleet package build "
            f"{model}:{number}{flag}` (which signs what it pushes) or POST "
            f"/api/v1/packages/{model}/{number}/sign{query}"
        )
    return number, found


def assign_many(
    db: Database,
    device_ids: Sequence[str],
    *,
    name: str,
    model: str,
    version: int | str,
    variant: str = DEFAULT_VARIANT,
    prefer: Sequence[str] = (),
    candidate: Candidate | None = None,
    settings: Settings | None = None,
    rollout_id: str | None = None,
    priority: int = 0,
) -> dict[str, int]:
    """Make deployment NAME on every device in DEVICE_IDS run MODEL:VERSION
    ("latest" allowed) in its package VARIANT, in one transaction. Returns each device's
    desired generation (unchanged where the deployment already was exactly this)."""
    name, prefer = check_name(name), check_prefer(prefer)
    number, package = signed_package(db, model, version, variant)
    row: dict[str, Any] = {
        "model": model, "version": number, "variant": variant,
        "repository": packages.repository(model),
        "digest": package.digest, "size": package.size, "prefer": dumps(prefer),
        "traffic": 100, "candidate_version": None, "candidate_variant": None,
        "candidate_digest": None, "candidate_size": None, "candidate_traffic": None,
        "candidate_shadow": None, "settings": dumps((settings or Settings()).to_json()),
        "rollout_id": rollout_id, "priority": priority,
    }
    if candidate is not None:
        candidate.check()
        c_number, c_package = signed_package(db, model, candidate.version, candidate.variant)
        if c_number == number:
            raise InvalidInput(f"the candidate is {model}:{number}, the deployment's own "
                               "version; pick another version")
        row.update(candidate_version=c_number, candidate_variant=candidate.variant,
                   candidate_digest=c_package.digest,
                   candidate_size=c_package.size, candidate_traffic=candidate.traffic,
                   candidate_shadow=int(candidate.shadow),
                   traffic=100 if candidate.shadow else 100 - candidate.traffic)
    wanted = tuple(row[k] for k in _VALUES)
    ids = json.dumps(list(dict.fromkeys(device_ids)))
    stamp = now()
    with db.transaction() as conn:
        generations = _generations(conn, ids)
        current = {
            r["device_id"]: tuple(r[k] for k in _VALUES) for r in conn.execute(
                "SELECT * FROM deployments WHERE name = ? AND active = 1"
                " AND device_id IN (SELECT value FROM json_each(?))", (name, ids))
        }
        retry = _refused_or_failed(conn, ids, name, generations,
                                   [row["version"], row["candidate_version"]])
        changed = [d for d in generations if current.get(d) != wanted or d in retry]
        _check_room(conn, [d for d in changed if d not in current])
        conn.executemany(
            "INSERT INTO deployments (device_id, name, " + ", ".join(_VALUES) + ", active,"
            " created_at, updated_at) VALUES (:device_id, :name, "
            + ", ".join(f":{k}" for k in _VALUES) + ", 1, :stamp, :stamp)"
            " ON CONFLICT (device_id, name) DO UPDATE SET "
            + ", ".join(f"{k} = excluded.{k}" for k in _VALUES)
            + ", active = 1, updated_at = excluded.updated_at",
            [{**row, "device_id": d, "name": name, "stamp": stamp} for d in changed],
        )
        generations.update(_bump(conn, changed))
    return generations


def assign(db: Database, device_id: str, **deployment: Any) -> int:
    """`assign_many` for one device; returns its desired generation."""
    return assign_many(db, [device_id], **deployment)[device_id]


def unassign_many(db: Database, device_ids: Sequence[str], name: str) -> dict[str, int]:
    """Remove deployment NAME from the devices that have it, in one transaction;
    returns the new generation of each device that had it."""
    ids = json.dumps(list(dict.fromkeys(device_ids)))
    with db.transaction() as conn:
        _generations(conn, ids)
        had = [r[0] for r in conn.execute(
            "DELETE FROM deployments WHERE name = ? AND device_id IN"
            " (SELECT value FROM json_each(?)) RETURNING device_id", (name, ids))]
        return _bump(conn, had)


def unassign(db: Database, device_id: str, name: str) -> int:
    """Remove deployment NAME from one device; returns its new desired generation."""
    changed = unassign_many(db, [device_id], name)
    if device_id not in changed:
        raise NotFound(f"device {device_id} has no deployment {name!r}; see "
                       f"`edgefleet device show {device_id}`")
    return changed[device_id]


def _generations(conn: Connection, ids: str) -> dict[str, int]:
    """Each device's desired generation; NotFound naming the ids that are no device."""
    found = {r[0]: r[1] for r in conn.execute(
        "SELECT id, desired_generation FROM devices WHERE id IN (SELECT value FROM json_each(?))",
        (ids,))}
    missing = [d for d in json.loads(ids) if d not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise NotFound(f"no device with id {shown}; see `edgefleet device list`")
    return found


def _refused_or_failed(conn: Connection, ids: str, name: str,
                       generations: dict[str, int], versions: list[int | None]) -> set[str]:
    """Devices that report deployment NAME's VERSIONS failed, or refused their current
    desired state: assigning the same again is a retry, which needs a new generation
    (an agent ignores a generation it has seen)."""
    failed = {r[0] for r in conn.execute(
        "SELECT device_id FROM deployment_status WHERE name = ? AND state IN ('failed',"
        " 'rolled_back') AND version IN (SELECT CAST(value AS BIGINT) FROM json_each(?))"
        " AND device_id IN (SELECT value FROM json_each(?))",
        (name, json.dumps([v for v in versions if v is not None]), ids))}
    refused = {r[0] for r in conn.execute(
        "SELECT d.id FROM devices d, json_each(d.reported, '$.refusals') r"
        " WHERE d.id IN (SELECT value FROM json_each(?))"
        " AND CAST(json_extract(r.value, '$.generation') AS BIGINT) = d.desired_generation",
        (ids,))}
    return (failed | refused) & set(generations)


def _check_room(conn: Connection, device_ids: list[str]) -> None:
    """Refuse a new deployment on devices that have as many as a desired state holds."""
    full = [r[0] for r in conn.execute(
        "SELECT device_id FROM deployments WHERE active = 1 AND device_id IN"
        " (SELECT value FROM json_each(?)) GROUP BY device_id HAVING COUNT(*) >= ?",
        (json.dumps(device_ids), MAX_DEPLOYMENTS))]
    if full:
        raise Conflict(f"device {full[0]} already has {MAX_DEPLOYMENTS} deployments, the most "
                       "one desired state holds; undeploy one first")


def _bump(conn: Connection, device_ids: list[str]) -> dict[str, int]:
    if not device_ids:
        return {}
    return {r[0]: r[1] for r in conn.execute(
        "UPDATE devices SET desired_generation = desired_generation + 1"
        " WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, desired_generation",
        (json.dumps(device_ids),))}


def _record(row: dict[str, Any]) -> dict[str, Any]:
    candidate = None
    if row["candidate_version"] is not None:
        candidate = {"version": row["candidate_version"],
                     "variant": row["candidate_variant"] or DEFAULT_VARIANT,
                     "digest": row["candidate_digest"],
                     "size": row["candidate_size"], "traffic": row["candidate_traffic"],
                     "shadow": bool(row["candidate_shadow"])}
    return {
        "name": row["name"], "model": row["model"], "version": row["version"],
        "variant": row["variant"] or DEFAULT_VARIANT, "repository": row["repository"],
        "digest": row["digest"], "size": row["size"],
        "prefer": json.loads(row["prefer"]), "traffic": row["traffic"], "candidate": candidate,
        "rollout_id": row["rollout_id"], "priority": row["priority"],
        "updated_at": row["updated_at"],
        # As users give them: {"resources": {"cpus": "0.5", ...}, "batching": ... | "off"}.
        **stored_settings(row["settings"]).shown(),
    }


def stored_settings(text: str | None) -> Settings:
    """A `settings` column as its Settings (NULL: a row older than settings, none)."""
    return Settings.from_json(json.loads(text or "{}"))


def settings_of(record: dict[str, Any]) -> Settings:
    """The settings of a deployment record (`_record`)."""
    return settings_from(record["resources"], record["batching"])


def for_device(db: Database, device_id: str) -> list[dict[str, Any]]:
    """The device's desired deployments, in the order it applies them."""
    return [_record(r) for r in db.query(
        "SELECT * FROM deployments WHERE device_id = ? AND active = 1"
        " ORDER BY priority DESC, name", (device_id,))]


def desired_snapshot(
    db: Database, device_ids: Sequence[str]
) -> dict[str, tuple[int, list[dict[str, Any]]]]:
    """Each device's desired generation with its deployments, read in one
    statement so the rows are the ones that generation names."""
    rows = db.query(
        "SELECT d.id AS device, d.desired_generation AS generation, b.spec AS sketch,"
        " cb.spec AS candidate_sketch, x.*"
        " FROM devices d LEFT JOIN deployments x ON x.device_id = d.id AND x.active = 1"
        " LEFT JOIN drift_baselines b ON b.model = x.model AND b.version = x.version"
        " LEFT JOIN drift_baselines cb ON cb.model = x.model"
        " AND cb.version = x.candidate_version"
        " WHERE d.id IN (SELECT value FROM json_each(?))"
        " ORDER BY d.id, x.priority DESC, x.name", (json.dumps(list(device_ids)),))
    snapshot: dict[str, tuple[int, list[dict[str, Any]]]] = {}
    for r in rows:
        _, deployments = snapshot.setdefault(r["device"], (r["generation"], []))
        if r["name"] is not None:
            # The versions' drift bins (hub/drift.py): fixed once they are deployed.
            deployments.append({**_record(r), "sketch": json.loads(r["sketch"] or "null"),
                                "candidate_sketch": json.loads(r["candidate_sketch"] or "null")})
    return snapshot


FAILED_STATES = ("failed", "rolled_back")


def reported_for_device(db: Database, device_id: str) -> list[dict[str, Any]]:
    """What the device last reported, one row per deployment version, less failures that
    a later report made stale: an agent goes on reporting a deployment's newest failure,
    but once another version of it started serving after that failure, the failure is
    history (`rollout show` keeps it where it mattered)."""
    rows = db.query(
        "SELECT name, model, version, state, error, runtime, device, since, updated_at"
        " FROM deployment_status WHERE device_id = ? ORDER BY name, version", (device_id,))
    served_since: dict[str, str] = {}
    for r in rows:
        if r["state"] == "serving" and r["since"]:
            served_since[r["name"]] = max(served_since.get(r["name"], ""), r["since"])
    return [r for r in rows if not (r["state"] in FAILED_STATES and r["since"]
                                    and r["since"] < served_since.get(r["name"], ""))]


def reported_states(
    db: Database, *, name: str, version: int, device_ids: Sequence[str]
) -> dict[str, str]:
    """device id -> the state it reports for VERSION of deployment NAME.
    Devices that report nothing about that version are left out."""
    return {r["device_id"]: r["state"] for r in db.query(
        "SELECT device_id, state FROM deployment_status WHERE name = ? AND version = ?"
        " AND device_id IN (SELECT value FROM json_each(?))",
        (name, version, json.dumps(list(device_ids))))}
