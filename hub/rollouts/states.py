"""The states of a rollout and of each of its devices, and the tables that move them.

A rollout moves only by an event of TRANSITIONS, from one of the event's
source states; `store.transition` checks the source in the same write
transaction as the change, so the engine and a user acting at once cannot
undo each other.

    event          from                                      to
    -------------  ----------------------------------------  -----------
    start          created                                   running
    complete       running                                   completed
    too_many       running                                   paused  (failures over threshold)
    pause          created, running                          paused
    resume         paused, failed                            running
    abort          created, running, paused, failed          aborted
    roll_back      created, running, paused, failed,         rolled_back
                   completed, aborted
    error          created, running, paused, completed       failed  (the engine met an error)

A rollout device is pending until its wave is assigned, then follows what
the device reports about the new version (the agent's update states), until
it serves, fails or is skipped. DEVICE_MOVES says what each piece of
evidence the engine gathers makes of a device in each state; the engine
applies the strongest evidence the table has an entry for (EVIDENCE order).
"""

from __future__ import annotations

from enum import StrEnum

from contract.protocol import UpdateState


class RolloutState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FAILED = "failed"        # the engine met an error; the reason says which
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    START = "start"
    COMPLETE = "complete"
    TOO_MANY_FAILURES = "too_many"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLL_BACK = "roll_back"
    ERROR = "error"


R = RolloutState
TRANSITIONS: dict[Event, tuple[frozenset[RolloutState], RolloutState]] = {
    Event.START: (frozenset({R.CREATED}), R.RUNNING),
    Event.COMPLETE: (frozenset({R.RUNNING}), R.COMPLETED),
    Event.TOO_MANY_FAILURES: (frozenset({R.RUNNING}), R.PAUSED),
    Event.PAUSE: (frozenset({R.CREATED, R.RUNNING}), R.PAUSED),
    Event.RESUME: (frozenset({R.PAUSED, R.FAILED}), R.RUNNING),
    Event.ABORT: (frozenset({R.CREATED, R.RUNNING, R.PAUSED, R.FAILED}), R.ABORTED),
    Event.ROLL_BACK: (frozenset(R) - {R.ROLLED_BACK}, R.ROLLED_BACK),
    Event.ERROR: (frozenset({R.CREATED, R.RUNNING, R.PAUSED, R.COMPLETED}), R.FAILED),
}
# The rollout still holds the deployment on its devices (priorities compare against it).
HOLDING = frozenset({R.RUNNING, R.PAUSED, R.FAILED})
# A rollout that takes (or may still take) devices of its target: a newer one of these
# supersedes an older rollout of the same deployment for joiners.
CLAIMING = frozenset({R.CREATED, R.RUNNING, R.PAUSED, R.FAILED, R.COMPLETED})
# Done for good: `rollout watch` stops at these and at PAUSED and FAILED.
ENDED = frozenset({R.COMPLETED, R.ABORTED, R.ROLLED_BACK})


class DeviceState(StrEnum):
    PENDING = "pending"          # its wave has not started
    ASSIGNED = "assigned"        # the new version is in its desired state
    DOWNLOADING = UpdateState.DOWNLOADING.value
    VERIFYING = UpdateState.VERIFYING.value
    STAGED = UpdateState.STAGED.value
    STARTING = UpdateState.STARTING.value
    SELF_TEST = UpdateState.SELF_TEST.value
    SERVING = UpdateState.SERVING.value
    FAILED = UpdateState.FAILED.value
    ROLLED_BACK = UpdateState.ROLLED_BACK.value  # given its previous version back
    SKIPPED = "skipped"          # another rollout holds or took the deployment


D = DeviceState
# What the agent reports while an update is under way; the rollout shows the same state.
IN_PROGRESS = frozenset({D.DOWNLOADING, D.VERIFYING, D.STAGED, D.STARTING, D.SELF_TEST})
UPDATING = frozenset({D.ASSIGNED, *IN_PROGRESS})
# A device in one of these has answered: its wave waits for it no longer.
ANSWERED = frozenset({D.SERVING, D.FAILED, D.ROLLED_BACK, D.SKIPPED})
# What a device's own report about the new version (an UpdateState) says of it.
FROM_REPORT: dict[str, DeviceState] = {
    **{UpdateState(s.value).value: s for s in IN_PROGRESS},
    UpdateState.SERVING.value: D.SERVING,
    UpdateState.FAILED.value: D.FAILED,
    UpdateState.ROLLING_BACK.value: D.FAILED,
    UpdateState.ROLLED_BACK.value: D.FAILED,
}


class Evidence(StrEnum):
    """What the engine learns about a device in one tick, strongest first."""

    TAKEN_OVER = "taken_over"    # another rollout owns its deployment now
    UNHEALTHY = "unhealthy"      # its telemetry on the new version
    REPORTS_FAILURE = "reports_failure"
    REPORTS_SERVING = "reports_serving"
    TIMED_OUT = "timed_out"      # no answer within the device timeout
    REPORTS_PROGRESS = "reports_progress"


EVIDENCE = tuple(Evidence)
# (state now, evidence) -> state next; None: the state the device reports. A pair not in
# the table changes nothing: a serving device does not time out, and one failed for
# not answering in time changes only when it serves after all.
_UPDATING_MOVES: dict[Evidence, DeviceState | None] = {
    Evidence.TAKEN_OVER: D.SKIPPED,
    Evidence.REPORTS_FAILURE: D.FAILED,
    Evidence.REPORTS_SERVING: D.SERVING,
    Evidence.TIMED_OUT: D.FAILED,
    Evidence.REPORTS_PROGRESS: None,
}
DEVICE_MOVES: dict[tuple[DeviceState, Evidence], DeviceState | None] = {
    **{(s, e): to for s in UPDATING for e, to in _UPDATING_MOVES.items()},
    (D.SERVING, Evidence.TAKEN_OVER): D.SKIPPED,
    (D.SERVING, Evidence.UNHEALTHY): D.FAILED,
    (D.SERVING, Evidence.REPORTS_FAILURE): D.FAILED,
    (D.SERVING, Evidence.REPORTS_PROGRESS): None,
    (D.FAILED, Evidence.TAKEN_OVER): D.SKIPPED,
    (D.FAILED, Evidence.REPORTS_SERVING): D.SERVING,
}


def report_evidence(reported: DeviceState) -> Evidence:
    """What a report that says REPORTED of a device (FROM_REPORT) tells the engine."""
    if reported == D.FAILED:
        return Evidence.REPORTS_FAILURE
    if reported == D.SERVING:
        return Evidence.REPORTS_SERVING
    return Evidence.REPORTS_PROGRESS


def moving_reports(state: DeviceState) -> list[str]:
    """The reports (FROM_REPORT's keys) that DEVICE_MOVES lets move a device in STATE."""
    return sorted(said for said, means in FROM_REPORT.items()
                  if (state, report_evidence(means)) in DEVICE_MOVES)


def next_device_state(state: DeviceState, evidence: set[Evidence],
                      reported: DeviceState | None) -> tuple[DeviceState, Evidence | None]:
    """The state DEVICE_MOVES gives a device in STATE, and the evidence that decided it
    (None: nothing applied). REPORTED is the state its report maps to (FROM_REPORT)."""
    for seen in EVIDENCE:
        if seen in evidence and (state, seen) in DEVICE_MOVES:
            target = DEVICE_MOVES[(state, seen)]
            if target is None:
                assert reported is not None, "REPORTS_PROGRESS comes with the reported state"
                target = reported
            return target, seen
    return state, None
