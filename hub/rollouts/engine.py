"""The engine's tick: every rollout that needs it moved one step on, from what the
database says, so a hub killed mid-rollout resumes where it was.

Each tick, per rollout: take in devices that joined the target, assign the
current wave (one transaction for the whole wave), read what its devices
report, fail the ones that never answer within the device timeout or whose
new version is unhealthy in telemetry (states.DEVICE_MOVES), and then pause
(and with auto-rollback, roll back) when failures cross the threshold, or
start the next wave once this one serves and has soaked. Work per tick is a
few set-based queries per rollout, never a loop of requests per device.

Each rollout's step is isolated: an error in one (a package deleted under
it, a bug) is stored on that rollout as state `failed` with the error as its
reason, and the tick goes on with the others. A busy database is no error
of the rollout's: its step is tried again next tick.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from contract.names import DEFAULT_VARIANT
from hub import audit, deployments
from hub.errors import HubError
from hub.rollouts import commands, health, store
from hub.rollouts.states import (
    ANSWERED,
    CLAIMING,
    FROM_REPORT,
    HOLDING,
    IN_PROGRESS,
    UPDATING,
    DeviceState,
    Event,
    Evidence,
    RolloutState,
    moving_reports,
    next_device_state,
    report_evidence,
)
from hub.storage import errors
from hub.storage.db import Database, format_time
from hub.validation import InvalidInput

log = logging.getLogger("edgefleet.rollouts")
Clock = Callable[[], datetime]
TIMED_OUT = "no answer within the device timeout"
R, D = RolloutState, DeviceState


def system_clock() -> datetime:
    return datetime.now(UTC)


def _states(states: Iterable[str]) -> str:
    return json.dumps(sorted(states))


# What a device's report says of it (states.FROM_REPORT); NULL for no report, or one
# that says nothing of the update.
_REPORTED = "CASE s.state " + " ".join(
    f"WHEN '{said}' THEN '{means.value}'" for said, means in FROM_REPORT.items()) + " END"


def _moved_by_report(state: DeviceState) -> str:
    saids = moving_reports(state)
    return "s.state IN (" + ", ".join(f"'{said}'" for said in saids) + ")" if saids else "FALSE"


# Whether the report moves a device in its state (states.DEVICE_MOVES): a failed device,
# say, only on a report that it serves.
_MOVED_BY_REPORT = "CASE m.state " + " ".join(
    f"WHEN '{state.value}' THEN {_moved_by_report(state)}" for state in DeviceState) + " END"


def _news(check_health: bool) -> str:
    """The rollout's open devices (not :settled, or failed only for not answering in
    time) that have news for the engine, with their report of the version, whether they
    applied their newest desired state and who holds their deployment. News: another
    holder, a timeout due, a report that counts (states.FROM_REPORT; a fresh one, or
    one of progress) and moves the device (states.DEVICE_MOVES) and, with CHECK_HEALTH,
    being served (telemetry judges it). A device without news would stay as it is.
    Serving devices are looked at on the ticks that check health only: most of a
    rollout's devices serve, and joining each to its report and holder every tick was
    most of a tick at 30,000 devices (py-spy)."""
    return (
        "SELECT m.device_id, m.state, m.assigned_at, m.serving_at, m.error,"
        " s.state AS reported, s.error AS reported_error,"
        " COALESCE(d.applied_generation, 0) >= d.desired_generation AS fresh,"
        " x.device_id IS NOT NULL AS held, x.rollout_id AS owner"
        " FROM rollout_devices m"
        " LEFT JOIN deployment_status s ON s.device_id = m.device_id"
        "  AND s.name = :deployment AND s.version = :version"
        " LEFT JOIN devices d ON d.id = m.device_id"
        " LEFT JOIN deployments x ON x.device_id = m.device_id AND x.name = :deployment"
        "  AND x.active = 1"
        " WHERE m.rollout_id = :rollout"
        " AND (m.state NOT IN (SELECT value FROM json_each(:settled))"
        "  OR (m.state = 'failed' AND m.error LIKE :timed_out || '%'))"
        " AND (x.rollout_id IS NULL OR x.rollout_id != :rollout"
        "  OR (m.state IN (SELECT value FROM json_each(:updating)) AND m.assigned_at < :stale)"
        "  OR (d.id IS NOT NULL AND (COALESCE(d.applied_generation, 0) >= d.desired_generation"
        "   OR s.state IN (SELECT value FROM json_each(:in_progress)))"
        f"   AND {_REPORTED} != m.state AND {_MOVED_BY_REPORT})"
        + (f" OR m.state = '{DeviceState.SERVING.value}')" if check_health
           else f") AND m.state != '{DeviceState.SERVING.value}'"))


class Engine:
    """Moves rollouts on; NOTIFY is told the devices whose desired state changed (after
    the commit); CLOCK is the time the engine judges soaks and timeouts by."""

    def __init__(self, db: Database, notify: Callable[[Iterable[str]], None], *,
                 clock: Clock = system_clock) -> None:
        self.db, self.notify, self.clock = db, notify, clock
        self._logged: set[tuple[str, str]] = set()  # errors of ended rollouts, logged once

    def _now(self) -> str:
        return format_time(self.clock())

    def tick(self, *, check_health: bool = True, check_joiners: bool = True) -> None:
        """Move every rollout that needs it one step on. CHECK_JOINERS False: no rollout
        looks for devices that joined its target this time (a scan of every device's
        tags each, 0.17 s at 10,000 devices on PostgreSQL)."""
        # An aborted rollout assigns nothing more, but its devices that were updating when
        # it was aborted are still followed to their outcome. A completed rollout is left
        # alone once a newer one of the same deployment has the same target: that one takes
        # in the joiners now, and every completed rollout kept in the tick costs a scan.
        due = self.db.query(
            "SELECT * FROM rollouts r WHERE r.state IN ('created', 'running', 'paused', 'failed')"
            " OR (r.state = 'completed' AND NOT EXISTS (SELECT 1 FROM rollouts n"
            "  WHERE n.deployment = r.deployment AND n.target = r.target AND n.seq > r.seq"
            "  AND n.state IN (SELECT value FROM json_each(?))))"
            " OR (r.state = 'aborted' AND EXISTS (SELECT 1 FROM rollout_devices d"
            "  WHERE d.rollout_id = r.id AND d.state != 'pending'"
            "  AND d.state NOT IN (SELECT value FROM json_each(?)))) ORDER BY r.seq",
            (_states(CLAIMING), _states(ANSWERED)))
        for found in due:
            try:
                self.step(store.load(self.db, found), check_health=check_health,
                          check_joiners=check_joiners)
            except errors.UNAVAILABLE as exc:  # busy or full: not the rollout's fault
                log.warning("rollout %s: %s; trying again next tick", found["id"], exc)
            except Exception as exc:  # stored on that rollout: the others go on
                self._failed(found["id"], exc)

    def _failed(self, rollout_id: str, exc: Exception) -> None:
        """Store EXC on the rollout (state failed) so the others go on and users see it."""
        if isinstance(exc, HubError | InvalidInput | ValueError):
            what = str(exc)
        else:
            what = f"internal error ({type(exc).__name__}: {exc}); see the hub's log"
        what = " ".join(what.split())[:500]
        reason = (f"{what}; fix the cause and `edgefleet rollout resume {rollout_id}`, or "
                  "abort it")
        try:
            stored = store.transition(self.db, rollout_id, Event.ERROR, reason)
        except Exception:  # the database itself: logged below, tried again next tick
            stored = False
        if stored:
            log.warning("rollout %s failed: %s", rollout_id, what,
                        exc_info=not isinstance(exc, HubError | InvalidInput | ValueError))
        elif (rollout_id, what) not in self._logged:
            self._logged.add((rollout_id, what))
            log.error("rollout %s: %s (logged once)", rollout_id, what)

    def step(self, rollout: store.Rollout, *, check_health: bool = True,
             check_joiners: bool = True) -> None:
        if rollout.state == R.CREATED:
            store.transition(self.db, rollout.id, Event.START, None)
            rollout = store.get(self.db, rollout.id)
        if check_joiners:
            self._take_in_joiners(rollout)
        self._refresh_devices(rollout, check_health=check_health)
        if rollout.state != R.RUNNING:
            return
        spec = rollout.spec
        counts = self.db.query_one(
            "SELECT COUNT(*) AS total, COALESCE(SUM(state = 'failed'), 0) AS failed"
            " FROM rollout_devices WHERE rollout_id = ?", (rollout.id,)) or {}
        total, failed = counts.get("total", 0), counts.get("failed", 0)
        if failed > spec.allowed_failures(total):
            reason = (f"{failed} device(s) failed, more than --max-failures "
                      f"{spec.max_failures} of {total} allows")
            changed: list[str] = []
            with self.db.transaction():
                if (store.transition(self.db, rollout.id, Event.TOO_MANY_FAILURES, reason)
                        and spec.auto_rollback):
                    changed = commands.roll_back_in(
                        self.db, rollout, actor="rollout-engine",
                        reason=reason + "; rolled back automatically")
            if changed:
                self.notify(changed)
            return
        if rollout.current_wave > 0:
            ends = store.soak_ends(self.db, rollout)
            if ends is None or ends > self.clock():
                return
        following = store.next_wave(self.db, rollout)
        if following is None:
            store.transition(self.db, rollout.id, Event.COMPLETE, None)
            return
        self._start_wave(rollout, following)

    def _start_wave(self, rollout: store.Rollout, wave: int) -> None:
        with self.db.transaction() as conn:
            fresh = store.row(self.db, rollout.id)  # under the write lock: not paused meanwhile
            if (fresh["state"], fresh["current_wave"]) != (R.RUNNING, rollout.current_wave):
                return
            devices = [r["device_id"] for r in self.db.query(
                "SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND wave = ?"
                " AND state = 'pending'", (rollout.id, wave))]
            assigned = self._assign(rollout, devices)
            stamp = self._now()
            conn.execute("UPDATE rollouts SET current_wave = ?, wave_started_at = ?,"
                         " updated_at = ? WHERE id = ?", (wave, stamp, stamp, rollout.id))
            audit.record(self.db, actor="rollout-engine", action="rollout.wave",
                         target=rollout.id, status=200,
                         detail=f"wave {wave}: {len(devices)} device(s)")
        if assigned:
            self.notify(assigned)

    def _assign(self, rollout: store.Rollout, devices: Sequence[str]) -> list[str]:
        """Assign the new version to DEVICES, except where a higher-priority rollout holds
        the deployment; returns the devices assigned, for the caller to notify after its
        commit."""
        if not devices:
            return []
        spec = rollout.spec
        current = {r["device_id"]: r for r in self.db.query(
            "SELECT d.device_id, d.version, d.variant, d.settings, d.rollout_id,"
            " r.priority AS owner_priority,"
            " r.state AS owner_state FROM deployments d LEFT JOIN rollouts r"
            " ON r.id = d.rollout_id WHERE d.name = ? AND d.active = 1"
            " AND d.device_id IN (SELECT value FROM json_each(?))",
            (spec.deployment, json.dumps(list(devices))))}
        skipped: dict[str, str] = {}
        for device in devices:
            owner = current.get(device)
            if (owner and owner["rollout_id"] and owner["rollout_id"] != rollout.id
                    and owner["owner_state"] in HOLDING
                    and owner["owner_priority"] > spec.priority):
                skipped[device] = (f"deployment {spec.deployment} is held by "
                                   f"{owner['rollout_id']} with priority "
                                   f"{owner['owner_priority']} > {spec.priority}")
        chosen = [d for d in devices if d not in skipped]
        if chosen and not spec.split:
            deployments.assign_many(self.db, chosen, name=spec.deployment, model=spec.model,
                                    version=spec.version, variant=spec.variant,
                                    prefer=spec.prefer, settings=spec.settings,
                                    rollout_id=rollout.id, priority=spec.priority)
        elif chosen:
            candidate = deployments.Candidate(spec.version, spec.traffic or 100, spec.shadow,
                                              spec.variant)
            by_primary: dict[tuple[int, str], list[str]] = {}
            for device in chosen:
                if device not in current:
                    skipped[device] = "an A/B or shadow rollout needs a version already serving"
                elif current[device]["version"] == spec.version:
                    skipped[device] = (f"it already serves {spec.model}:{spec.version}, so "
                                       "that cannot be its candidate")
                else:
                    serving = current[device]
                    key = (serving["version"], serving["variant"] or DEFAULT_VARIANT)
                    by_primary.setdefault(key, []).append(device)
            for (primary, variant), group in by_primary.items():
                deployments.assign_many(self.db, group, name=spec.deployment, model=spec.model,
                                        version=primary, variant=variant, candidate=candidate,
                                        prefer=spec.prefer, settings=spec.settings,
                                        rollout_id=rollout.id, priority=spec.priority)
        stamp = self._now()
        assigned = [d for d in chosen if d not in skipped]
        with self.db.transaction() as conn:
            conn.executemany(
                "UPDATE rollout_devices SET state = 'assigned', assigned_at = ?,"
                " previous_version = ?, previous_variant = ?, previous_settings = ?"
                " WHERE rollout_id = ? AND device_id = ?",
                [(stamp, current[d]["version"] if d in current else None,
                  (current[d]["variant"] or DEFAULT_VARIANT) if d in current else None,
                  (current[d]["settings"] or "{}") if d in current else None,
                  rollout.id, d) for d in assigned])
            conn.executemany(
                "UPDATE rollout_devices SET state = 'skipped', error = ? WHERE rollout_id = ?"
                " AND device_id = ?", [(why, rollout.id, d) for d, why in skipped.items()])
        return assigned

    def _take_in_joiners(self, rollout: store.Rollout) -> None:
        """Devices that match the target but joined after the rollout started get it too."""
        if rollout.state not in (R.RUNNING, R.COMPLETED):
            return
        joiners = store.target_devices(self.db, rollout.spec.target, outside=rollout.id)
        if not joiners:
            return
        # A newer rollout of the same deployment that also targets a joiner is the one to
        # give it a version: this older one would only make it fetch a superseded one first.
        claimed: set[str] = set()
        for newer in self.db.query(
                "SELECT * FROM rollouts WHERE deployment = ? AND seq > ?"
                " AND state IN (SELECT value FROM json_each(?))",
                (rollout.spec.deployment, rollout.seq, _states(CLAIMING))):
            claimed.update(store.target_devices(self.db, store.stored_spec(self.db, newer).target))
        joiners = [d for d in joiners if d not in claimed]
        if not joiners:
            return
        assigned: list[str] = []
        with self.db.transaction() as conn:
            fresh = store.row(self.db, rollout.id)  # under the write lock: not paused meanwhile
            if fresh["state"] not in (R.RUNNING, R.COMPLETED):
                return
            conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, wave, state)"
                " VALUES (?, ?, ?, 'pending') ON CONFLICT DO NOTHING",
                [(rollout.id, d, max(fresh["current_wave"], 1)) for d in joiners])
            # A rollout completed with no device (its target matched none yet) has
            # started no wave, and its joiners are assigned at once all the same.
            if fresh["current_wave"] >= 1 or fresh["state"] == R.COMPLETED:
                assigned = self._assign(rollout, joiners)
        if assigned:
            self.notify(assigned)

    def _refresh_devices(self, rollout: store.Rollout, *, check_health: bool) -> None:
        """Move the rollout's open devices by what they report (states.DEVICE_MOVES).

        A device's report counts as its answer (serving, failed) only once the device has
        applied its newest desired state: until then what it reports about this version
        may be left from an earlier attempt (a failure it still reports, say, while it is
        offline). A device failed only for not answering in time is still followed, and
        counts as serving if it does serve the version later.

        Only devices with news are read and judged (`news`): at 10,000 devices reading
        and judging every open one each tick was a fifth of the hub's time (py-spy,
        bench/README.md), and most had nothing new.
        """
        spec = rollout.spec
        stale = self._stale(rollout)
        rows = self.news(rollout, check_health=check_health)
        if not rows:
            return
        verdicts = health.unhealthy(
            self.db, spec, [r["device_id"] for r in rows if r["state"] == D.SERVING],
            since=rollout.wave_started_at or rollout.created_at) if check_health else {}
        updates = []
        for r in rows:
            device = r["device_id"]
            report = None if r["reported"] is None or r["fresh"] is None else {
                "state": r["reported"], "error": r["reported_error"], "fresh": r["fresh"]}
            holder = ("removing it by hand (undeploy)" if not r["held"]
                      else f"rollout {r['owner']}" if r["owner"] else "a manual deploy")
            change = self._judge(rollout, r, report, holder, verdicts.get(device), stale)
            if change != (r["state"], r["error"], r["serving_at"]):
                updates.append((*change, rollout.id, device))
        if updates:
            with self.db.transaction() as conn:
                conn.executemany(
                    "UPDATE rollout_devices SET state = ?, error = ?, serving_at = ?"
                    " WHERE rollout_id = ? AND device_id = ?", updates)

    def _stale(self, rollout: store.Rollout) -> str:
        """Devices assigned before this have not answered within the device timeout."""
        # Timestamps are fixed-width UTC text, so one cutoff compares them all as strings.
        return format_time(self.clock() - timedelta(seconds=rollout.spec.device_timeout.seconds))

    def news(self, rollout: store.Rollout, *, check_health: bool) -> list[dict[str, Any]]:
        """ROLLOUT's open devices with news for the engine (`_news`), each with what the
        engine judges it by: its report (reported, reported_error, fresh) and the
        holder of its deployment (held, owner)."""
        # Once a rollout has ended, what its devices served is history: a later rollout
        # taking them over does not rewrite it. Devices still on their way are followed.
        settled = {D.PENDING, D.FAILED, D.ROLLED_BACK, D.SKIPPED}
        if rollout.state in (R.COMPLETED, R.ABORTED):
            settled.add(D.SERVING)
        return self.db.query(
            _news(check_health),
            {"rollout": rollout.id, "deployment": rollout.spec.deployment,
             "version": rollout.spec.version, "settled": _states(settled),
             "timed_out": TIMED_OUT, "stale": self._stale(rollout),
             "updating": _states(UPDATING), "in_progress": _states(IN_PROGRESS)})

    def _judge(self, rollout: store.Rollout, r: dict[str, Any], report: dict[str, Any] | None,
               holder: str, unhealthy: str | None,
               stale: str) -> tuple[str, str | None, str | None]:
        """One device's next (state, error, serving_at) from the evidence of this tick."""
        answer = None
        if report is not None and (report["fresh"] or report["state"] in IN_PROGRESS):
            answer = report["state"]
        reported = FROM_REPORT.get(answer) if answer is not None else None
        evidence: set[Evidence] = set()
        if holder != f"rollout {rollout.id}":
            evidence.add(Evidence.TAKEN_OVER)
        if unhealthy is not None:
            evidence.add(Evidence.UNHEALTHY)
        if reported is not None:
            evidence.add(report_evidence(reported))
        if (r["assigned_at"] or stale) < stale:
            evidence.add(Evidence.TIMED_OUT)
        state, why = next_device_state(D(r["state"]), evidence, reported)
        errors: dict[Evidence | None, str | None] = {
            Evidence.TAKEN_OVER: f"taken over by {holder}",
            Evidence.UNHEALTHY: unhealthy,
            Evidence.REPORTS_FAILURE: (report or {}).get("error") or
            f"the device reports {answer}",
            Evidence.REPORTS_SERVING: None,
            Evidence.TIMED_OUT: f"{TIMED_OUT} ({rollout.spec.device_timeout})",
        }
        error = errors[why] if why in errors else r["error"]
        serving_at = r["serving_at"]
        if state == D.SERVING and r["state"] != D.SERVING:
            serving_at = serving_at or self._now()
        return state.value, error, serving_at
