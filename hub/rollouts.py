"""Rollouts: one model version taken to a target of devices in waves.

A rollout's devices are the ones matching its tag selector, put in a
deterministic order (sha256 of rollout id and device id, which spreads each
wave across sites and kinds of device) and cut into cumulative waves
("5%,25%,100%" or "10,100,all"). The engine (`tick`) moves each running
rollout on from what the database says, so a hub killed mid-rollout
resumes where it was:

    created -> running (wave n) -> completed
                  |   ^
                  v   |  (resume)
                paused  -> aborted | rolled_back

Each tick, per rollout: take in devices that joined the target, assign the
current wave (one transaction for the whole wave), read what its devices
report, fail the ones that never answer within the device timeout or whose
new version is unhealthy in telemetry, and then pause (and with
auto-rollback, roll back) when failures cross the threshold, or start the
next wave once this one serves and has soaked. Work per tick is a few
set-based queries per rollout, never a loop of requests per device.

What counts as a device's answer:

- A report about the new version counts (serving, failed) only once the
  device has applied its newest desired state; before that it may be left
  over from an earlier attempt at the same version.
- A device failed for not answering within the device timeout is still
  followed: if it comes back and serves, it counts as serving.
- Health from telemetry needs at least HEALTH_MIN_REQUESTS requests on a
  version before its error rate or latency is judged.
- A device another rollout takes over (higher priority) is "skipped" with
  the reason; so is one a lower-priority rollout finds held. Once a rollout
  has completed or been aborted, what its devices served stays as it was.
- A joiner is taken in by the newest rollout of the deployment that
  targets it, not by older ones it supersedes.

State changes check their starting state in the same write transaction,
and a wave is assigned under the write lock only while the rollout still
runs, so a user's pause or abort and the engine's tick cannot undo each
other.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hub import audit, deployments, validation
from hub.errors import Conflict, NotFound
from hub.storage.db import Database, dumps, format_time, now, parse_time
from hub.validation import InvalidInput

ACTIVE = ("running", "paused")
TERMINAL_DEVICE = ("serving", "failed", "rolled_back", "skipped")
# What a device reports for the new version, as the rollout counts it.
IN_PROGRESS = ("downloading", "verifying", "staged", "starting", "self_test")
TIMED_OUT = "no answer within the device timeout"
# Fewer requests than this on a version say nothing about its error rate or latency.
HEALTH_MIN_REQUESTS = 10
parse_duration = validation.duration


@dataclass(frozen=True)
class Wave:
    """Cumulative: a wave covers every device up to this share or count."""

    percent: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, text: str) -> Wave:
        text = text.strip()
        if text == "all":
            return cls(percent=100.0)
        if text.endswith("%"):
            value = float(text[:-1])
            if not 0 < value <= 100:
                raise InvalidInput(f"wave {text!r}: a percentage must be in (0, 100]")
            return cls(percent=value)
        if not text.isdigit() or int(text) < 1:
            raise InvalidInput(f"wave {text!r}: use a percentage (5%), a count (10) or 'all'")
        return cls(count=int(text))

    def reach(self, total: int) -> int:
        if self.percent is not None:
            return min(total, math.ceil(total * self.percent / 100))
        return min(total, self.count or 0)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_waves(text: str) -> list[Wave]:
    waves = [Wave.parse(part) for part in text.split(",") if part.strip()]
    if not waves:
        raise InvalidInput("give at least one wave, e.g. 5%,25%,100%")
    if waves[-1].percent != 100.0:
        raise InvalidInput("the last wave must be 100% or 'all', so every target device is covered")
    return waves


def wave_sizes(waves: Sequence[Wave], total: int) -> list[int]:
    """How many devices each wave adds, every wave at least one while devices remain."""
    sizes, covered = [], 0
    for wave in waves:
        reach = max(wave.reach(total), min(total, covered + 1))
        sizes.append(reach - covered)
        covered = reach
    return sizes


def allowed_failures(spec: str, total: int) -> int:
    spec = spec.strip()
    if spec.endswith("%"):
        return math.floor(total * float(spec[:-1]) / 100)
    if not spec.isdigit():
        raise InvalidInput(f"--max-failures {spec!r}: use a percentage (5%) or a count (3)")
    return int(spec)


def spread(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """The rollout's device order: stable for one rollout, different between rollouts."""
    return sorted(device_ids,
                  key=lambda d: hashlib.sha256(f"{rollout_id}:{d}".encode()).hexdigest())


@dataclass(frozen=True)
class RolloutSpec:
    model: str
    version: int | str
    target: dict[str, str]
    deployment: str | None = None
    waves: str = "100%"
    max_failures: str = "0"
    soak: str = "0s"
    device_timeout: str = "15m"
    auto_rollback: bool = False
    traffic: int | None = None
    shadow: bool = False
    priority: int = 0
    prefer: tuple[str, ...] = ()
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0


def _target_devices(db: Database, target: dict[str, str], *,
                    outside: str | None = None) -> list[str]:
    """The devices matching TARGET; with OUTSIDE, only those not yet in that rollout."""
    clauses = ["EXISTS (SELECT 1 FROM json_each(tags) WHERE key = ? AND value = ?)"
               for _ in target]
    params = [p for pair in target.items() for p in pair]
    if outside is not None:
        clauses.append("NOT EXISTS (SELECT 1 FROM rollout_devices m WHERE m.rollout_id = ?"
                       " AND m.device_id = devices.id)")
        params.append(outside)
    return [r["id"] for r in db.query(
        "SELECT id FROM devices" + (" WHERE " + " AND ".join(clauses) if clauses else ""),
        params)]


def create(db: Database, spec: RolloutSpec, *, created_by: str) -> dict[str, Any]:
    """Record a rollout and plan its waves; the engine starts wave 1 on its next tick."""
    validation.model_name(spec.model)
    target = validation.tags(spec.target)
    waves = parse_waves(spec.waves)
    for text, what in ((spec.soak, "--soak"), (spec.device_timeout, "--device-timeout")):
        parse_duration(text, what)
    allowed_failures(spec.max_failures, 1)
    if spec.traffic is not None and spec.shadow:
        raise InvalidInput("choose --traffic (an A/B split) or --shadow, not both")
    # Resolve the version and its package now: a typo fails here, not in wave 1.
    number, _ = deployments.signed_package(db, spec.model, spec.version)
    name = spec.deployment or spec.model
    devices = _target_devices(db, target)
    if not devices:
        raise InvalidInput(
            f"no device matches the target {', '.join(f'{k}={v}' for k, v in target.items())}"
        )
    stamp = now()
    with db.transaction() as conn:
        seq = conn.execute(
            "INSERT INTO rollouts (id, model, version, deployment, target, waves, max_failures,"
            " soak, device_timeout, auto_rollback, traffic, shadow, priority, prefer,"
            " max_error_rate, max_latency_ratio, state, reason, current_wave, wave_started_at,"
            " created_at, created_by, updated_at)"
            " VALUES ('', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'created', NULL, 0, NULL,"
            " ?, ?, ?)",
            (spec.model, number, name, dumps(target), ",".join(str(w) for w in waves),
             spec.max_failures, spec.soak, spec.device_timeout, int(spec.auto_rollback),
             spec.traffic, int(spec.shadow), spec.priority, dumps(list(spec.prefer)),
             spec.max_error_rate, spec.max_latency_ratio, stamp, created_by, stamp),
        ).lastrowid
        rollout_id = f"r-{seq}"
        conn.execute("UPDATE rollouts SET id = ? WHERE seq = ?", (rollout_id, seq))
        _add_members(conn, rollout_id, devices, waves, first_wave=1)
    return show(db, rollout_id)


def _add_members(conn: Any, rollout_id: str, devices: Sequence[str], waves: Sequence[Wave],
                 *, first_wave: int) -> None:
    ordered = spread(rollout_id, devices)
    rows, start = [], 0
    for number, size in enumerate(wave_sizes(waves, len(ordered)), start=1):
        for device in ordered[start:start + size]:
            rows.append((rollout_id, device, max(number, first_wave), "pending"))
        start += size
    conn.executemany(
        "INSERT OR IGNORE INTO rollout_devices (rollout_id, device_id, wave, state)"
        " VALUES (?, ?, ?, ?)", rows)


# -- reading ------------------------------------------------------------------------


def _row(db: Database, rollout_id: str) -> dict[str, Any]:
    row = db.query_one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
    if row is None:
        raise NotFound(f"no rollout {rollout_id!r}; see `edgefleet rollout list`")
    return row


def _public(row: dict[str, Any]) -> dict[str, Any]:
    record = {k: v for k, v in row.items() if k != "seq"}
    record["target"] = json.loads(row["target"])
    record["prefer"] = json.loads(row["prefer"])
    record["auto_rollback"] = bool(row["auto_rollback"])
    record["shadow"] = bool(row["shadow"])
    return record


def list_rollouts(db: Database, *, state: str | None = None) -> list[dict[str, Any]]:
    rows = db.query(
        "SELECT r.*, (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout_id = r.id) AS devices,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout_id = r.id"
        "  AND d.state = 'serving') AS serving,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout_id = r.id"
        "  AND d.state = 'failed') AS failed"
        " FROM rollouts r" + (" WHERE r.state = ?" if state else "") + " ORDER BY r.seq DESC",
        [state] if state else [])
    return [_public(r) for r in rows]


def show(db: Database, rollout_id: str, *, devices: bool = False) -> dict[str, Any]:
    """The rollout with its progress per wave and its failed and skipped devices;
    DEVICES adds every member device's row (wave, state, times, error)."""
    record = _public(_row(db, rollout_id))
    counts = db.query(
        "SELECT wave, state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = ?"
        " GROUP BY wave, state ORDER BY wave", (rollout_id,))
    waves: dict[int, dict[str, int]] = {}
    for c in counts:
        waves.setdefault(c["wave"], {})[c["state"]] = c["n"]
    record["waves_progress"] = [
        {"wave": w, "devices": sum(states.values()), **states} for w, states in sorted(waves.items())
    ]
    record["failed_devices"] = db.query(
        "SELECT device_id, wave, state, error FROM rollout_devices WHERE rollout_id = ?"
        " AND state IN ('failed', 'skipped') ORDER BY wave, device_id LIMIT 200", (rollout_id,))
    if devices:
        record["devices"] = db.query(
            "SELECT device_id, wave, state, previous_version, assigned_at, serving_at, error"
            " FROM rollout_devices WHERE rollout_id = ? ORDER BY wave, device_id", (rollout_id,))
    return record


# -- commands ---------------------------------------------------------------------


def _transition(db: Database, rollout_id: str, state: str, reason: str | None,
                actor: str = "rollout-engine", *, source: Sequence[str]) -> bool:
    """Move the rollout to STATE if it is in one of SOURCE now; False if it is not.

    The check and the change are one write transaction, so the engine and a user acting
    at the same moment cannot undo each other (a pause overwritten by "completed", a
    wave started after an abort)."""
    with db.transaction() as conn:
        changed = conn.execute(
            "UPDATE rollouts SET state = ?, reason = ?, updated_at = ? WHERE id = ?"
            " AND state IN (SELECT value FROM json_each(?))",
            (state, reason, now(), rollout_id, json.dumps(list(source)))).rowcount
        if changed:
            audit.record(db, actor=actor, action=f"rollout.{state}", target=rollout_id,
                         status=200, detail=reason or "")
    return bool(changed)


def _command(db: Database, rollout_id: str, state: str, reason: str | None, actor: str,
             source: Sequence[str], refusal: str) -> dict[str, Any]:
    _row(db, rollout_id)  # NotFound first
    if not _transition(db, rollout_id, state, reason, actor, source=source):
        raise Conflict(f"{rollout_id} is {_row(db, rollout_id)['state']}; {refusal}")
    return show(db, rollout_id)


def pause(db: Database, rollout_id: str, *, actor: str) -> dict[str, Any]:
    return _command(db, rollout_id, "paused", f"paused by {actor}", actor, ("created", "running"),
                    "only a running rollout can be paused")


def resume(db: Database, rollout_id: str, *, actor: str) -> dict[str, Any]:
    return _command(db, rollout_id, "running", None, actor, ("paused",),
                    "only a paused rollout can be resumed")


def abort(db: Database, rollout_id: str, *, actor: str) -> dict[str, Any]:
    """Stop here: devices keep what they run now; pending devices are never assigned."""
    return _command(db, rollout_id, "aborted", f"aborted by {actor}", actor,
                    ("created", *ACTIVE), "it cannot be aborted")


def roll_back(db: Database, rollout_id: str, *, actor: str,
              notify: Callable[[Iterable[str]], None], reason: str | None = None) -> dict[str, Any]:
    """Give every device that got the new version its previous one back."""
    _row(db, rollout_id)
    with db.transaction():
        changed = _roll_back(db, rollout_id, actor=actor, reason=reason)
    if changed:  # after the commit, so the publisher reads the new generations
        notify(changed)
    return show(db, rollout_id)


def _roll_back(db: Database, rollout_id: str, *, actor: str, reason: str | None) -> list[str]:
    """roll_back inside the caller's transaction; returns the devices to notify."""
    row = _row(db, rollout_id)
    if row["state"] == "rolled_back":
        return []
    touched = db.query(
        "SELECT device_id, previous_version FROM rollout_devices WHERE rollout_id = ?"
        " AND assigned_at IS NOT NULL AND state != 'skipped'", (rollout_id,))
    by_previous: dict[int | None, list[str]] = {}
    for t in touched:
        by_previous.setdefault(t["previous_version"], []).append(t["device_id"])
    name, model = row["deployment"], row["model"]
    changed: list[str] = []
    for previous, devices in by_previous.items():
        # Only where this rollout still owns the deployment: another rollout may have taken over.
        owned = [r["device_id"] for r in db.query(
            "SELECT device_id FROM deployments WHERE name = ? AND rollout_id = ? AND active = 1"
            " AND device_id IN (SELECT value FROM json_each(?))",
            (name, rollout_id, json.dumps(devices)))]
        if not owned:
            continue
        if previous is None:
            deployments.unassign_many(db, owned, name)
        else:
            deployments.assign_many(db, owned, name=name, model=model, version=previous,
                                    prefer=json.loads(row["prefer"]))
        changed += owned
    with db.transaction() as conn:
        # Failed devices stay "failed" with their error: `rollout show` lists them, and why.
        conn.execute(
            "UPDATE rollout_devices SET state = 'rolled_back' WHERE rollout_id = ?"
            " AND assigned_at IS NOT NULL AND state NOT IN ('skipped', 'failed')", (rollout_id,))
    _transition(db, rollout_id, "rolled_back", reason or f"rolled back by {actor}", actor,
                source=(row["state"],))
    return changed


# -- the engine's tick --------------------------------------------------------------


def _seconds_since(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    then = parse_time(stamp)
    return (datetime.now(UTC) - then).total_seconds()


def tick(db: Database, notify: Callable[[Iterable[str]], None], *, check_health: bool = True,
         check_joiners: bool = True) -> None:
    """Move every rollout that needs it one step on. CHECK_JOINERS False: completed
    rollouts do not look for devices that joined their target this time (a scan of the
    devices each; running rollouts always do)."""
    # An aborted rollout assigns nothing more, but its devices that were updating when it
    # was aborted are still followed to their outcome. A completed rollout is left alone
    # once a newer one of the same deployment has the same target: that one takes in the
    # joiners now, and every completed rollout kept in the tick costs a scan of the devices.
    for row in db.query(
            "SELECT * FROM rollouts r WHERE r.state IN ('created', 'running', 'paused')"
            " OR (r.state = 'completed' AND NOT EXISTS (SELECT 1 FROM rollouts n"
            "  WHERE n.deployment = r.deployment AND n.target = r.target AND n.seq > r.seq"
            "  AND n.state IN ('created', 'running', 'paused', 'completed')))"
            " OR (r.state = 'aborted' AND EXISTS (SELECT 1 FROM rollout_devices d"
            "  WHERE d.rollout_id = r.id AND d.state NOT IN ('pending', 'serving', 'failed',"
            "  'rolled_back', 'skipped'))) ORDER BY r.seq"):
        step(db, row, notify, check_health=check_health, check_joiners=check_joiners)


def step(db: Database, row: dict[str, Any], notify: Callable[[Iterable[str]], None], *,
         check_health: bool = True, check_joiners: bool = True) -> None:
    rollout_id = row["id"]
    if row["state"] == "created":
        _transition(db, rollout_id, "running", None, source=("created",))
        row = _row(db, rollout_id)
    if check_joiners or row["state"] != "completed":
        _take_in_joiners(db, row, notify)
    _refresh_devices(db, row, check_health=check_health)
    if row["state"] != "running":
        return
    total = db.query_one("SELECT COUNT(*) AS n FROM rollout_devices WHERE rollout_id = ?",
                         (rollout_id,))["n"]
    failed = db.query_one("SELECT COUNT(*) AS n FROM rollout_devices WHERE rollout_id = ?"
                          " AND state = 'failed'", (rollout_id,))["n"]
    if failed > allowed_failures(row["max_failures"], total):
        reason = (f"{failed} device(s) failed, more than --max-failures {row['max_failures']} "
                  f"of {total} allows")
        changed: list[str] = []
        with db.transaction():
            if (_transition(db, rollout_id, "paused", reason, source=("running",))
                    and row["auto_rollback"]):
                changed = _roll_back(db, rollout_id, actor="rollout-engine",
                                     reason=reason + "; rolled back automatically")
        if changed:
            notify(changed)
        return
    wave = row["current_wave"]
    if wave == 0 or _wave_done(db, row):
        following = db.query_one(
            "SELECT MIN(wave) AS w FROM rollout_devices WHERE rollout_id = ? AND wave > ?",
            (rollout_id, wave))["w"]
        if following is None:
            _transition(db, rollout_id, "completed", None, source=("running",))
            return
        _start_wave(db, row, following, notify)


def _wave_done(db: Database, row: dict[str, Any]) -> bool:
    """Every device of the current wave has answered, and the soak time has passed."""
    open_ = db.query_one(
        "SELECT COUNT(*) AS n FROM rollout_devices WHERE rollout_id = ? AND wave <= ?"
        " AND state NOT IN ('serving', 'failed', 'rolled_back', 'skipped')",
        (row["id"], row["current_wave"]))["n"]
    if open_:
        return False
    last_serving = db.query_one(
        "SELECT MAX(serving_at) AS t FROM rollout_devices WHERE rollout_id = ? AND wave = ?",
        (row["id"], row["current_wave"]))["t"]
    return _seconds_since(last_serving or row["wave_started_at"]) >= parse_duration(
        row["soak"], "soak")


def _start_wave(db: Database, row: dict[str, Any], wave: int,
                notify: Callable[[Iterable[str]], None]) -> None:
    with db.transaction() as conn:
        fresh = _row(db, row["id"])  # under the write lock: not paused or aborted meanwhile
        if (fresh["state"], fresh["current_wave"]) != ("running", row["current_wave"]):
            return
        devices = [r["device_id"] for r in db.query(
            "SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND wave = ?"
            " AND state = 'pending'", (row["id"], wave))]
        assigned = _assign(db, fresh, devices)
        conn.execute("UPDATE rollouts SET current_wave = ?, wave_started_at = ?, updated_at = ?"
                     " WHERE id = ?", (wave, now(), now(), row["id"]))
        audit.record(db, actor="rollout-engine", action="rollout.wave", target=row["id"],
                     status=200, detail=f"wave {wave}: {len(devices)} device(s)")
    if assigned:
        notify(assigned)


def _assign(db: Database, row: dict[str, Any], devices: Sequence[str]) -> list[str]:
    """Assign the new version to DEVICES, except where a higher-priority rollout owns the
    deployment; returns the devices assigned, for the caller to notify after its commit."""
    if not devices:
        return []
    name = row["deployment"]
    current = {r["device_id"]: r for r in db.query(
        "SELECT d.device_id, d.version, d.rollout_id, r.priority AS owner_priority, r.state AS owner_state"
        " FROM deployments d LEFT JOIN rollouts r ON r.id = d.rollout_id"
        " WHERE d.name = ? AND d.active = 1 AND d.device_id IN (SELECT value FROM json_each(?))",
        (name, json.dumps(list(devices))))}
    skipped, chosen = {}, []
    for device in devices:
        owner = current.get(device)
        if (owner and owner["rollout_id"] and owner["rollout_id"] != row["id"]
                and owner["owner_state"] in ACTIVE and owner["owner_priority"] > row["priority"]):
            skipped[device] = (f"deployment {name} is held by {owner['rollout_id']} with priority "
                               f"{owner['owner_priority']} > {row['priority']}")
        else:
            chosen.append(device)
    candidate = None
    if row["traffic"] is not None or row["shadow"]:
        candidate = deployments.Candidate(row["version"], row["traffic"] or 100, bool(row["shadow"]))
    stamp = now()
    if chosen:
        if candidate is None:
            deployments.assign_many(db, chosen, name=name, model=row["model"],
                                    version=row["version"], prefer=json.loads(row["prefer"]),
                                    rollout_id=row["id"], priority=row["priority"])
        else:
            by_primary: dict[int, list[str]] = {}
            for device in chosen:
                if device in current:
                    by_primary.setdefault(current[device]["version"], []).append(device)
                else:
                    skipped[device] = "an A/B or shadow rollout needs a version already serving"
            for primary, group in by_primary.items():
                deployments.assign_many(db, group, name=name, model=row["model"], version=primary,
                                        candidate=candidate, prefer=json.loads(row["prefer"]),
                                        rollout_id=row["id"], priority=row["priority"])
    with db.transaction() as conn:
        conn.executemany(
            "UPDATE rollout_devices SET state = 'assigned', assigned_at = ?, previous_version = ?"
            " WHERE rollout_id = ? AND device_id = ?",
            [(stamp, current[d]["version"] if d in current else None, row["id"], d)
             for d in chosen if d not in skipped])
        conn.executemany(
            "UPDATE rollout_devices SET state = 'skipped', error = ? WHERE rollout_id = ?"
            " AND device_id = ?", [(reason, row["id"], d) for d, reason in skipped.items()])
    return [d for d in chosen if d not in skipped]


def _take_in_joiners(db: Database, row: dict[str, Any],
                     notify: Callable[[Iterable[str]], None]) -> None:
    """Devices that match the target but joined after the rollout started get it too."""
    if row["state"] not in ("running", "completed"):
        return
    joiners = _target_devices(db, json.loads(row["target"]), outside=row["id"])
    if not joiners:
        return
    # A newer rollout of the same deployment that also targets a joiner is the one to give
    # it a version: this older one would only make it fetch a superseded version first.
    claimed: set[str] = set()
    for newer in db.query(
            "SELECT target FROM rollouts WHERE deployment = ? AND seq > ?"
            " AND state IN ('created', 'running', 'paused', 'completed')",
            (row["deployment"], row["seq"])):
        claimed.update(_target_devices(db, json.loads(newer["target"])))
    joiners = [d for d in joiners if d not in claimed]
    if not joiners:
        return
    assigned: list[str] = []
    with db.transaction() as conn:
        fresh = _row(db, row["id"])  # under the write lock: not paused or aborted meanwhile
        if fresh["state"] not in ("running", "completed"):
            return
        conn.executemany(
            "INSERT OR IGNORE INTO rollout_devices (rollout_id, device_id, wave, state)"
            " VALUES (?, ?, ?, 'pending')",
            [(row["id"], d, max(fresh["current_wave"], 1)) for d in joiners])
        if fresh["current_wave"] >= 1:
            assigned = _assign(db, fresh, joiners)
    if assigned:
        notify(assigned)


def _timed_out(device_timeout: str) -> str:
    return f"{TIMED_OUT} ({device_timeout})"


def _refresh_devices(db: Database, row: dict[str, Any], *, check_health: bool) -> None:
    """Copy what assigned devices report for the new version into the rollout's rows.

    A device's report counts as its answer (serving, failed) only once the device has
    applied its newest desired state: until then what it reports about this version may
    be left from an earlier attempt (a failure it still reports, say, while it is offline).
    A device failed only for not answering in time is still followed, and counts as
    serving if it does serve the version later.
    """
    version = row["version"]
    # Once a rollout has ended, what its devices served is history: a later rollout taking
    # them over does not rewrite it. Devices still on their way are followed to the end.
    settled = "'pending', 'failed', 'rolled_back', 'skipped'" + (
        ", 'serving'" if row["state"] in ("completed", "aborted") else "")
    open_rows = db.query(
        "SELECT device_id, state, assigned_at, serving_at, error FROM rollout_devices"
        f" WHERE rollout_id = ? AND (state NOT IN ({settled})"
        " OR (state = 'failed' AND error LIKE ? || '%'))",
        (row["id"], TIMED_OUT))
    if not open_rows:
        return
    ids = json.dumps([r["device_id"] for r in open_rows])
    reported = {r["device_id"]: r for r in db.query(
        "SELECT s.device_id, s.state, s.error,"
        " COALESCE(d.applied_generation, 0) >= d.desired_generation AS fresh"
        " FROM deployment_status s JOIN devices d ON d.id = s.device_id"
        " WHERE s.name = ? AND s.version = ? AND s.device_id IN (SELECT value FROM json_each(?))",
        (row["deployment"], version, ids))}
    owners = {r["device_id"]: r["rollout_id"] for r in db.query(
        "SELECT device_id, rollout_id FROM deployments WHERE name = ? AND active = 1"
        " AND device_id IN (SELECT value FROM json_each(?))",
        (row["deployment"], ids))}
    # Timestamps are fixed-width UTC text, so one cutoff compares them all as strings.
    timeout = parse_duration(row["device_timeout"], "device timeout")
    stale = format_time(datetime.now(UTC) - timedelta(seconds=timeout))
    health = _unhealthy(db, row, [r["device_id"] for r in open_rows if r["state"] == "serving"]) \
        if check_health else {}
    updates: list[tuple[str, str | None, str | None, str]] = []
    for r in open_rows:
        device, report = r["device_id"], reported.get(r["device_id"])
        state, error, serving_at = r["state"], r["error"], r["serving_at"]
        answer = report["state"] if report is not None and (
            report["fresh"] or report["state"] in IN_PROGRESS) else None
        if owners.get(device) not in (row["id"], None):
            state, error = "skipped", f"taken over by rollout {owners[device]}"
        elif r["state"] == "failed":  # timed out: only serving changes that now
            if answer == "serving":
                state, error, serving_at = "serving", None, now()
        elif device in health:
            state, error = "failed", health[device]
        elif answer in ("failed", "rolling_back", "rolled_back"):
            state, error = "failed", report["error"] or f"the device reports {answer}"
        elif answer == "serving":
            state, serving_at = "serving", serving_at or now()
        elif answer in IN_PROGRESS:
            state = answer
        if state not in ("serving", "failed", "skipped") and (r["assigned_at"] or stale) < stale:
            state, error = "failed", _timed_out(row["device_timeout"])
        if (state, error, serving_at) != (r["state"], r["error"], r["serving_at"]):
            updates.append((state, error, serving_at, device))
    if updates:
        with db.transaction() as conn:
            conn.executemany(
                "UPDATE rollout_devices SET state = ?, error = ?, serving_at = ?"
                " WHERE rollout_id = ? AND device_id = ?",
                [(s, e, t, row["id"], d) for s, e, t, d in updates])


def _unhealthy(db: Database, row: dict[str, Any], serving: Sequence[str]) -> dict[str, str]:
    """Devices whose new version errs or slows down too much, from their inference telemetry."""
    if not serving:
        return {}
    points = db.query(
        "SELECT device_id, metrics FROM telemetry WHERE kind = 'inference' AND at >= ?"
        " AND device_id IN (SELECT value FROM json_each(?))",
        (row["wave_started_at"] or row["created_at"], json.dumps(list(serving))))
    new = row["version"]
    totals: dict[str, dict[str, float]] = {}
    for p in points:
        values = json.loads(p["metrics"])
        if values.get("deployment") != row["deployment"]:
            continue
        t = totals.setdefault(p["device_id"], {"count": 0, "errors": 0, "p95": 0.0,
                                               "old_count": 0, "old_p95": 0.0})
        if values.get("version") == new:
            t["count"] += values.get("count", 0)
            t["errors"] += values.get("errors", 0)
            t["p95"] = max(t["p95"], values.get("p95_ms", 0.0))
        else:
            t["old_count"] += values.get("count", 0)
            t["old_p95"] = max(t["old_p95"], values.get("p95_ms", 0.0))
    verdicts = {}
    for device, t in totals.items():
        if t["count"] >= HEALTH_MIN_REQUESTS and t["errors"] / t["count"] > row["max_error_rate"]:
            verdicts[device] = (f"unhealthy: error rate {t['errors'] / t['count']:.1%} of "
                                f"{int(t['count'])} requests is above {row['max_error_rate']:.1%}")
        # Latency too needs enough requests on both versions: the p95 of one or two
        # requests (a fresh session's first one is slow) says nothing about a version.
        elif (min(t["count"], t["old_count"]) >= HEALTH_MIN_REQUESTS and t["old_p95"]
              and t["p95"] > row["max_latency_ratio"] * t["old_p95"]):
            verdicts[device] = (f"unhealthy: p95 latency {t['p95']:.1f} ms is more than "
                                f"{row['max_latency_ratio']:g}x the previous version's "
                                f"{t['old_p95']:.1f} ms")
    return verdicts
