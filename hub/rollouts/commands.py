"""What users do to rollouts: create one (everything checkable is checked here, so the
engine never meets a spec it cannot run), pause, resume, abort and roll back."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from contract.errors import PackageError
from contract.names import DEFAULT_VARIANT
from hub import deployments, packages, profiles, validation
from hub.errors import Conflict
from hub.rollouts import reads, store
from hub.rollouts import spec as specs
from hub.rollouts.states import DeviceState, Event
from hub.storage.blobs import BlobStore
from hub.storage.db import Database, dumps, now
from hub.validation import InvalidInput

Notify = Callable[[Iterable[str]], None]


def spread(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """The rollout's device order: stable for one rollout, different between rollouts."""
    return sorted(device_ids,
                  key=lambda d: hashlib.sha256(f"{rollout_id}:{d}".encode()).hexdigest())


def create(db: Database, blobs: BlobStore, *, model: str, version: int | str, created_by: str,
           **options: Any) -> dict[str, Any]:
    """Record a rollout and plan its waves; the engine starts wave 1 on its next tick.
    OPTIONS are `spec.parse`'s; what needs the database is checked here: the version's
    signed package, its platforms against the target's devices, and that an A/B or
    shadow candidate is not the version already serving."""
    validation.model_name(model)
    checked = validation.version(version)
    spec = specs.parse(model=model, version=0, **options)  # the text first: no lookup wasted
    number, package = deployments.signed_package(db, model, checked, spec.variant)
    spec = dataclasses.replace(spec, version=number)
    devices = store.target_devices(db, spec.target)
    if spec.split:
        _refuse_candidate_serving(db, spec, devices)
        _refuse_clusters(db, devices)
    _refuse_missing_platforms(db, blobs, spec, package.digest, devices)
    if spec.max_latency_ms is not None:
        _refuse_over_budget(db, blobs, spec, package.digest, devices)
    stamp = now()
    with db.transaction() as conn:
        seq = conn.execute(
            "INSERT INTO rollouts (id, model, version, deployment, target, waves, max_failures,"
            " soak, device_timeout, auto_rollback, traffic, shadow, priority, prefer,"
            " max_error_rate, max_latency_ratio, spec, state, reason, current_wave,"
            " wave_started_at, created_at, created_by, updated_at)"
            " VALUES ('', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'created', NULL, 0,"
            " NULL, ?, ?, ?) RETURNING seq",
            (spec.model, number, spec.deployment, dumps(dict(spec.target)),
             ",".join(str(w) for w in spec.waves), str(spec.max_failures), str(spec.soak),
             str(spec.device_timeout), int(spec.auto_rollback), spec.traffic, int(spec.shadow),
             spec.priority, json.dumps(list(spec.prefer)), spec.max_error_rate,
             spec.max_latency_ratio, spec.to_json(), stamp, created_by, stamp),
        ).fetchone()[0]
        rollout_id = f"r-{seq}"
        conn.execute("UPDATE rollouts SET id = ? WHERE seq = ?", (rollout_id, seq))
        ordered = spread(rollout_id, devices)
        rows, start = [], 0
        for wave, size in enumerate(specs.wave_sizes(spec.waves, len(ordered)), start=1):
            rows += [(rollout_id, d, wave, DeviceState.PENDING.value)
                     for d in ordered[start:start + size]]
            start += size
        conn.executemany("INSERT INTO rollout_devices (rollout_id, device_id, wave, state)"
                         " VALUES (?, ?, ?, ?)", rows)
    return reads.show(db, rollout_id)


def _few(devices: Sequence[str]) -> str:
    return ", ".join(devices[:3]) + (f" and {len(devices) - 3} more" if len(devices) > 3 else "")


def _refuse_candidate_serving(db: Database, spec: specs.RolloutSpec,
                              devices: Sequence[str]) -> None:
    serving = [r["device_id"] for r in db.query(
        "SELECT device_id FROM deployments WHERE name = ? AND active = 1 AND version = ?"
        " AND device_id IN (SELECT value FROM json_each(?)) ORDER BY device_id",
        (spec.deployment, spec.version, json.dumps(list(devices))))]
    if serving:
        raise InvalidInput(
            f"deployment {spec.deployment} already serves {spec.model}:{spec.version} on "
            f"{len(serving)} target device(s) ({_few(serving)}), so it cannot be their A/B or "
            "shadow candidate; pick another version or a target without them")


def _refuse_clusters(db: Database, devices: Sequence[str]) -> None:
    # A cluster agent runs one Deployment per deployment (agent/kube/daemon.py); it
    # would report the candidate failed, so the rollout is refused up front.
    clusters = [r["id"] for r in db.query(
        "SELECT id FROM devices WHERE json_extract(tags, '$.\"runtime.kubernetes\"') = 'true'"
        " AND id IN (SELECT value FROM json_each(?)) ORDER BY id", (json.dumps(list(devices)),))]
    if clusters:
        raise InvalidInput(
            f"{len(clusters)} target device(s) are Kubernetes clusters ({_few(clusters)}), "
            "which run no A/B split or shadow: narrow the target (e.g. add a tag the "
            "clusters lack) or roll out without --traffic/--shadow")


def _refuse_missing_platforms(db: Database, blobs: BlobStore, spec: specs.RolloutSpec,
                              digest: str, devices: Sequence[str]) -> None:
    # Devices that have not reported yet have no platform: their own update will tell.
    platforms: dict[str, list[str]] = {}
    for r in db.query("SELECT id, platform FROM devices WHERE platform IS NOT NULL"
                      " AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
                      (json.dumps(list(devices)),)):
        platforms.setdefault(r["platform"], []).append(r["id"])
    try:
        have, lacking = packages.platform_coverage(blobs, digest, platforms)
    except (PackageError, OSError) as exc:
        raise Conflict(f"the package of {spec.model}:{spec.version} cannot be read ({exc}); "
                       f"build it again with `edgefleet package build "
                       f"{spec.model}:{spec.version}`") from None
    if lacking:
        what = "; ".join(f"{p} ({_few(platforms[p])})" for p in sorted(lacking))
        raise InvalidInput(
            f"the package of {spec.model}:{spec.version} has no image for {what}; it has "
            f"{', '.join(have) or 'none'}: build it with `edgefleet package "
            f"build {spec.model}:{spec.version} --platform ...` or narrow the target")


def _refuse_over_budget(db: Database, blobs: BlobStore, spec: specs.RolloutSpec, digest: str,
                        devices: Sequence[str]) -> None:
    assert spec.max_latency_ms is not None  # the caller checks
    classes = sorted({r["platform"] for r in db.query(
        "SELECT platform FROM devices WHERE platform IS NOT NULL"
        " AND id IN (SELECT value FROM json_each(?))", (json.dumps(list(devices)),))})
    if not classes:
        raise InvalidInput(
            f"no target device has reported its platform yet, so the latency budget of "
            f"{spec.max_latency_ms:g} ms has no device class to be checked on; wait for the "
            "devices to come online, or leave out --max-latency-ms")
    build = packages.build_record(blobs, digest) or {}
    runtime = build.get("runtime") if isinstance(build.get("runtime"), str) else None
    profiles.check_budget(db, model=spec.model, version=spec.version, variant=spec.variant,
                          runtime=runtime, device_classes=classes,
                          max_latency_ms=spec.max_latency_ms)


def _command(db: Database, rollout_id: str, event: Event, reason: str | None, actor: str,
             refusal: str) -> dict[str, Any]:
    store.row(db, rollout_id)  # NotFound first
    if not store.transition(db, rollout_id, event, reason, actor):
        raise Conflict(f"{rollout_id} is {store.row(db, rollout_id)['state']}; {refusal}")
    return reads.show(db, rollout_id)


def pause(db: Database, rollout_id: str, *, actor: str) -> dict[str, Any]:
    return _command(db, rollout_id, Event.PAUSE, f"paused by {actor}", actor,
                    "only a running rollout can be paused")


def resume(db: Database, rollout_id: str, *, actor: str) -> dict[str, Any]:
    """Carry on with a paused rollout, or a failed one whose cause has been fixed."""
    return _command(db, rollout_id, Event.RESUME, None, actor,
                    "only a paused or failed rollout can be resumed")


def abort(db: Database, rollout_id: str, *, actor: str) -> dict[str, Any]:
    """Stop here: devices keep what they run now; pending devices are never assigned."""
    return _command(db, rollout_id, Event.ABORT, f"aborted by {actor}", actor,
                    "it cannot be aborted")


def roll_back(db: Database, rollout_id: str, *, actor: str, notify: Notify,
              reason: str | None = None) -> dict[str, Any]:
    """Give every device that got the new version its previous one back."""
    rollout = store.get(db, rollout_id)
    with db.transaction():
        changed = roll_back_in(db, rollout, actor=actor, reason=reason)
    if changed:  # after the commit, so the publisher reads the new generations
        notify(changed)
    return reads.show(db, rollout_id)


def roll_back_in(db: Database, rollout: store.Rollout, *, actor: str,
                 reason: str | None) -> list[str]:
    """roll_back inside the caller's transaction; returns the devices to notify."""
    if store.row(db, rollout.id)["state"] == "rolled_back":
        return []
    touched = db.query(
        "SELECT device_id, previous_version, previous_variant, previous_settings"
        " FROM rollout_devices"
        " WHERE rollout_id = ? AND assigned_at IS NOT NULL AND state != 'skipped'",
        (rollout.id,))
    by_previous: dict[tuple[int | None, str, str], list[str]] = {}
    for t in touched:
        key = (t["previous_version"], t["previous_variant"] or DEFAULT_VARIANT,
               t["previous_settings"] or "{}")
        by_previous.setdefault(key, []).append(t["device_id"])
    spec = rollout.spec
    changed: list[str] = []
    for (previous, variant, settings), devices in by_previous.items():
        # Only where this rollout still owns the deployment: another rollout may have taken over.
        owned = [r["device_id"] for r in db.query(
            "SELECT device_id FROM deployments WHERE name = ? AND rollout_id = ? AND active = 1"
            " AND device_id IN (SELECT value FROM json_each(?))",
            (spec.deployment, rollout.id, json.dumps(devices)))]
        if not owned:
            continue
        if previous is None:
            deployments.unassign_many(db, owned, spec.deployment)
        else:
            deployments.assign_many(db, owned, name=spec.deployment, model=spec.model,
                                    version=previous, variant=variant, prefer=spec.prefer,
                                    settings=deployments.stored_settings(settings))
        changed += owned
    with db.transaction() as conn:
        # Only the devices given their previous version back are rolled back; failed ones
        # stay "failed" with their error (`rollout show` lists them, and why), and those
        # that someone or something else took over meanwhile say so.
        conn.execute(
            "UPDATE rollout_devices SET state = CASE WHEN device_id IN (SELECT value FROM"
            " json_each(?)) THEN 'rolled_back' ELSE 'skipped' END, error = CASE WHEN"
            " device_id IN (SELECT value FROM json_each(?)) THEN error ELSE"
            " 'not rolled back: its deployment was taken over before the rollback' END"
            " WHERE rollout_id = ? AND assigned_at IS NOT NULL"
            " AND state NOT IN ('skipped', 'failed')",
            (json.dumps(changed), json.dumps(changed), rollout.id))
    store.transition(db, rollout.id, Event.ROLL_BACK, reason or f"rolled back by {actor}", actor)
    return changed
