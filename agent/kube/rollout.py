"""A Deployment's rollout as one outcome: complete, still progressing, or failed and why.

`rollout_status` is pure: it reads the Deployment, its ReplicaSets and their
pods as the API serves them (dicts) and decides as `kubectl rollout status`
does, plus what kubectl leaves to the reader: pods of the new revision that
crash-loop, cannot pull their image or cannot be configured have failed
already, however much of the progress deadline is left.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

REVISION: Final = "deployment.kubernetes.io/revision"
TEMPLATE_HASH: Final = "pod-template-hash"
# Waiting reasons of a container that will not become ready by waiting longer.
FATAL_WAITING: Final = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
# Restarts of one container of the new revision that count as a crash loop
# even before the kubelet says CrashLoopBackOff.
CRASH_RESTARTS: Final = 3


class Phase(StrEnum):
    PROGRESSING = "progressing"
    COMPLETE = "complete"
    DEADLINE_EXCEEDED = "deadline_exceeded"   # the controller gave up: progressDeadlineSeconds
    FAILING = "failing"                        # new pods crash-loop or cannot start


@dataclass(frozen=True)
class RolloutStatus:
    phase: Phase
    desired: int
    updated: int
    ready: int
    available: int
    restarts: int                  # of the new revision's containers
    message: str                   # one line, for the reported state
    failing_pods: tuple[str, ...] = ()
    unready_pods: tuple[str, ...] = ()   # of the new revision, failing or not
    name: str = ""                 # the Deployment's

    @property
    def done(self) -> bool:
        return self.phase is not Phase.PROGRESSING

    @property
    def failed(self) -> bool:
        return self.phase in (Phase.DEADLINE_EXCEEDED, Phase.FAILING)


def new_replica_set(deployment: Mapping[str, Any],
                    replica_sets: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The ReplicaSet of the Deployment's current revision, if the controller made it yet."""
    revision = (deployment["metadata"].get("annotations") or {}).get(REVISION)
    uid = deployment["metadata"].get("uid")
    for rs in replica_sets:
        meta = rs["metadata"]
        owned = any(ref.get("uid") == uid and ref.get("controller")
                    for ref in meta.get("ownerReferences") or ())
        if owned and revision is not None and (meta.get("annotations") or {}).get(REVISION) \
                == revision:
            return rs
    return None


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _container_failure(pod: Mapping[str, Any]) -> tuple[int, str | None]:
    """(restarts, why the pod has failed or None) from its container statuses."""
    status = pod.get("status") or {}
    restarts = 0
    reason = None
    for c in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        restarts += int(c.get("restartCount") or 0)
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            detail = waiting.get("message") or ""
            reason = f"{c.get('name')}: {waiting['reason']}" + (f" ({detail})" if detail else "")
        elif int(c.get("restartCount") or 0) >= CRASH_RESTARTS and not c.get("ready"):
            last = ((c.get("lastState") or {}).get("terminated") or {})
            reason = (f"{c.get('name')}: restarted {c['restartCount']} times"
                      + (f", last exit code {last['exitCode']}" if "exitCode" in last else ""))
    return restarts, reason


def _about_another_replica_set(condition: Mapping[str, Any],
                               rs: Mapping[str, Any] | None) -> bool:
    """Whether a timed-out condition names a ReplicaSet other than the current one: after
    an undo the controller keeps the old verdict until its next sync."""
    named = re.match(r'ReplicaSet "([^"]+)"', str(condition.get("message", "")))
    return rs is not None and named is not None and named.group(1) != rs["metadata"]["name"]


def rollout_status(deployment: Mapping[str, Any], replica_sets: Sequence[Mapping[str, Any]],
                   pods: Sequence[Mapping[str, Any]]) -> RolloutStatus:
    """Where DEPLOYMENT's rollout is, given its namespace's REPLICA_SETS and PODS
    (those of other Deployments are ignored)."""
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    total = int(status.get("replicas") or 0)
    name = deployment["metadata"]["name"]

    rs = new_replica_set(deployment, replica_sets)
    restarts = 0
    failing: list[tuple[str, str]] = []
    unready: list[str] = []
    if rs is not None:
        template_hash = (rs["metadata"].get("labels") or {}).get(TEMPLATE_HASH)
        for pod in pods:
            meta = pod["metadata"]
            if (meta.get("labels") or {}).get(TEMPLATE_HASH) != template_hash \
                    or meta.get("deletionTimestamp"):
                continue
            pod_restarts, reason = _container_failure(pod)
            restarts += pod_restarts
            if reason is not None:
                failing.append((meta["name"], reason))
            if not _ready(pod):
                unready.append(meta["name"])

    def result(phase: Phase, message: str) -> RolloutStatus:
        return RolloutStatus(phase, desired, updated, ready, available, restarts,
                             message, tuple(p for p, _ in failing), tuple(unready), name)

    generation = deployment["metadata"].get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return result(Phase.PROGRESSING, f"deployment {name}: change not yet seen by the "
                      "controller")
    for condition in status.get("conditions") or ():
        if condition.get("type") == "Progressing" \
                and condition.get("reason") == "ProgressDeadlineExceeded" \
                and not _about_another_replica_set(condition, rs):
            return result(Phase.DEADLINE_EXCEEDED, f"deployment {name} missed its progress "
                          f"deadline: {condition.get('message', '')}".rstrip(": "))
    if failing:
        pod_name, reason = failing[0]
        more = f" (and {len(failing) - 1} more pods)" if len(failing) > 1 else ""
        return result(Phase.FAILING, f"pod {pod_name} of deployment {name} fails: {reason}{more}")
    if updated < desired:
        return result(Phase.PROGRESSING, f"{updated} of {desired} new replicas updated")
    if total > updated:
        return result(Phase.PROGRESSING, f"{total - updated} old replicas still terminating")
    if available < updated:
        return result(Phase.PROGRESSING, f"{available} of {updated} new replicas available")
    return result(Phase.COMPLETE, f"{available} of {desired} replicas ready and available")


def describe_events(events: Sequence[Mapping[str, Any]], limit: int = 5) -> list[str]:
    """The last LIMIT warning events as "Pod NAME: REASON: MESSAGE", newest last."""
    warnings = [e for e in events if e.get("type") == "Warning"]
    warnings.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime")
                  or (e.get("metadata") or {}).get("creationTimestamp") or "")
    lines = []
    for e in warnings[-limit:]:
        obj = e.get("involvedObject") or {}
        message = " ".join(str(e.get("message", "")).split())[:300]
        lines.append(f"{obj.get('kind', '?')} {obj.get('name', '?')}: {e.get('reason', '?')}: "
                     f"{message}")
    return lines
