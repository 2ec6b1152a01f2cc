"""One deployment's update on the cluster, start to outcome: what the update state
machine drives in Kubernetes mode.

`update()` applies the workload with the one serving now recorded as its
previous (read from the live Deployment, so nothing needs remembering across
agent restarts: a workload applied already is followed again, with the
previous it recorded), follows the rollout, and on failure (progress deadline,
crash loop, image or config errors, or no verdict in time) undoes it and
says why, with the failing pods' warning events. A first release that fails
has nothing to go back to: its objects are removed, so nothing half-applied
stays behind. Kubernetes API failures are not caught here: they are the
caller's to report and retry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from agent.kube.apply import Applied, Namespace
from agent.kube.manifests import Workload, workloads_of
from agent.kube.rollout import Phase, RolloutStatus

# How long past the Deployment's own progress deadline the agent waits for the
# controller's verdict before deciding itself.
VERDICT_GRACE_SECONDS = 30.0


class Result(StrEnum):
    SERVING = "serving"            # the new workload's rollout completed
    ROLLED_BACK = "rolled_back"    # it failed; the previous workload is applied again
    FAILED = "failed"              # it failed and there was nothing to go back to


@dataclass(frozen=True)
class Outcome:
    result: Result
    workload: Workload             # what the cluster now runs (or was asked to, if FAILED)
    message: str                   # one line: why, for the reported state
    drift: tuple[str, ...] = ()    # hand edits found and undone by this apply
    events: tuple[str, ...] = ()   # the failing pods' warning events, one line each


def begin(ns: Namespace, workload: Workload) -> tuple[Workload, Applied]:
    """Apply WORKLOAD (its `previous` is ignored: the live one is used); returns what
    was applied, with the workload an undo goes back to, and the drift found."""
    live = ns.deployment(workload.object_name)
    serving, previous = workloads_of(live) if live is not None else (None, None)
    if serving is not None and _same(serving, workload):
        # Applied already (an agent restarted mid-update, or nothing new): re-applying
        # brings back hand edits, and the rollout is followed to its end all the same.
        target = replace(workload, previous=previous)
    else:
        target = replace(workload, previous=serving)
    return target, ns.deploy(target)


def verdict_timeout(workload: Workload) -> float:
    """How long to follow WORKLOAD's rollout before deciding without the controller."""
    return workload.progress_deadline_seconds + VERDICT_GRACE_SECONDS


def why_failed(ns: Namespace, status: RolloutStatus, timeout: float) -> tuple[str, tuple[str, ...]]:
    """A rollout that did not complete: the reason in one line, and its pods' warnings."""
    reason = status.message if status.failed else \
        f"no verdict within {timeout:.0f} s: {status.message}"
    return reason, tuple(ns.events(status.failing_pods or status.unready_pods))


def update(ns: Namespace, workload: Workload, *, poll: float = 1.0,
           on_status: Callable[[RolloutStatus], None] | None = None) -> Outcome:
    """Take WORKLOAD's deployment to WORKLOAD (its `previous` is ignored: the live
    one is used). ON_STATUS sees every look at the rollout (for telemetry)."""
    target, applied = begin(ns, workload)
    timeout = verdict_timeout(workload)
    status = ns.follow(target.object_name, timeout=timeout, poll=poll, on_status=on_status)
    if status.phase is Phase.COMPLETE:
        return Outcome(Result.SERVING, target, status.message, applied.drift)
    reason, events = why_failed(ns, status, timeout)
    if target.previous is None:
        ns.remove(target.object_name)
        return Outcome(Result.FAILED, target, f"{reason}; its objects were removed",
                       applied.drift, events)
    ns.undo(target.object_name)
    return Outcome(Result.ROLLED_BACK, target.previous, reason, applied.drift, events)


def _same(a: Workload, b: Workload) -> bool:
    return replace(a, previous=None) == replace(b, previous=None)
