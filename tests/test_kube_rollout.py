"""Kubernetes mode's pure readers: rollout status and cluster inventory from API documents."""

from __future__ import annotations

from typing import Any

from agent.kube.inventory import facts, summarize
from agent.kube.rollout import Phase, describe_events, rollout_status

UID = "d-uid"


def deployment(*, replicas: int = 2, generation: int = 2, observed: int = 2, updated: int = 2,
               total: int = 2, available: int = 2, conditions: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    return {
        "metadata": {"name": "ef-m", "uid": UID, "generation": generation,
                     "annotations": {"deployment.kubernetes.io/revision": "2"}},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": observed, "updatedReplicas": updated,
                   "replicas": total, "readyReplicas": available,
                   "availableReplicas": available, "conditions": conditions or []},
    }


def replica_set(revision: str, template_hash: str) -> dict[str, Any]:
    return {"metadata": {"name": f"ef-m-{template_hash}",
                         "labels": {"pod-template-hash": template_hash},
                         "annotations": {"deployment.kubernetes.io/revision": revision},
                         "ownerReferences": [{"uid": UID, "controller": True}]}}


def pod(name: str, template_hash: str, *, restarts: int = 0, waiting: str | None = None,
        ready: bool = True) -> dict[str, Any]:
    state = {"waiting": {"reason": waiting, "message": "back-off 40s"}} if waiting \
        else {"running": {}}
    return {"metadata": {"name": name, "labels": {"pod-template-hash": template_hash}},
            "status": {"conditions": [{"type": "Ready", "status": str(ready)}],
                       "containerStatuses": [{"name": "serving", "restartCount": restarts,
                                              "ready": ready, "state": state,
                                              "lastState": {"terminated": {"exitCode": 3}}}]}}


RS = [replica_set("1", "old"), replica_set("2", "new")]


def test_complete_when_every_new_replica_is_available() -> None:
    status = rollout_status(deployment(), RS, [pod("a", "new"), pod("b", "new")])
    assert status.phase is Phase.COMPLETE and status.done and not status.failed


def test_progressing_states() -> None:
    assert rollout_status(deployment(observed=1), RS, []).phase is Phase.PROGRESSING
    assert rollout_status(deployment(updated=1), RS, []).phase is Phase.PROGRESSING
    old_left = rollout_status(deployment(total=3), RS, [])
    assert old_left.phase is Phase.PROGRESSING and "old replicas" in old_left.message
    assert rollout_status(deployment(available=1), RS, []).phase is Phase.PROGRESSING


def test_deadline_exceeded_from_the_controllers_condition() -> None:
    status = rollout_status(deployment(available=0, conditions=[{
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "ef-m-new" has timed out progressing.'}]), RS, [])
    assert status.phase is Phase.DEADLINE_EXCEEDED and status.failed
    assert "timed out progressing" in status.message


def test_a_deadline_verdict_about_the_replica_set_undone_is_stale() -> None:
    # Right after an undo, the condition still names the failed ReplicaSet.
    undone = deployment(total=3, conditions=[{
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "ef-m-bad" has timed out progressing.'}])
    assert rollout_status(undone, RS, []).phase is Phase.PROGRESSING


def test_crash_loop_of_a_new_pod_fails_before_the_deadline() -> None:
    pods = [pod("old-1", "old", restarts=9, waiting="CrashLoopBackOff"),   # not the new revision
            pod("new-1", "new", restarts=4, waiting="CrashLoopBackOff", ready=False)]
    status = rollout_status(deployment(available=0), RS, pods)
    assert status.phase is Phase.FAILING and status.failing_pods == ("new-1",)
    assert status.unready_pods == ("new-1",)
    assert status.restarts == 4
    assert "CrashLoopBackOff" in status.message and "\n" not in status.message


def test_restarts_count_as_a_crash_loop_and_image_pull_failures_fail() -> None:
    restarting = rollout_status(deployment(available=0), RS,
                                [pod("n", "new", restarts=3, ready=False)])
    assert restarting.phase is Phase.FAILING and "exit code 3" in restarting.message
    pulling = rollout_status(deployment(available=0), RS,
                             [pod("n", "new", waiting="ImagePullBackOff", ready=False)])
    assert pulling.phase is Phase.FAILING


def test_events_are_one_line_each_warnings_only_newest_last() -> None:
    events = [
        {"type": "Normal", "reason": "Scheduled", "message": "ok",
         "involvedObject": {"kind": "Pod", "name": "p"}, "lastTimestamp": "2026-01-01T00:00:01Z"},
        {"type": "Warning", "reason": "BackOff", "message": "Back-off\nrestarting",
         "involvedObject": {"kind": "Pod", "name": "p"}, "lastTimestamp": "2026-01-01T00:00:03Z"},
        {"type": "Warning", "reason": "FailedScheduling", "message": "0/2 nodes",
         "involvedObject": {"kind": "Pod", "name": "p"}, "lastTimestamp": "2026-01-01T00:00:02Z"},
    ]
    assert describe_events(events) == ["Pod p: FailedScheduling: 0/2 nodes",
                                       "Pod p: BackOff: Back-off restarting"]


def node(name: str, arch: str, allocatable: dict[str, str], *, ready: bool = True,
         cordoned: bool = False) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/arch": arch}},
            "spec": {"unschedulable": cordoned},
            "status": {"nodeInfo": {"architecture": arch, "operatingSystem": "linux"},
                       "conditions": [{"type": "Ready", "status": str(ready)}],
                       "allocatable": allocatable}}


def test_inventory_counts_schedulable_nodes_and_accelerators() -> None:
    nodes = [
        node("a", "amd64", {"cpu": "3900m", "memory": "15Gi", "pods": "110",
                            "nvidia.com/gpu": "2", "hugepages-2Mi": "0",
                            "ephemeral-storage": "100Gi"}),
        node("b", "arm64", {"cpu": "2", "memory": "8Gi", "gpu.intel.com/i915": "1"}),
        node("c", "arm64", {"cpu": "8", "memory": "32Gi"}, cordoned=True),
        node("d", "riscv64", {"cpu": "8", "memory": "32Gi"}, ready=False),
    ]
    inv = summarize(nodes, {"gitVersion": "v1.37.2"})
    assert inv["nodes"] == {"total": 4, "schedulable": 2}
    assert inv["platforms"] == ["linux/amd64", "linux/arm64"]
    assert inv["cpu"]["allocatable_millicores"] == 5900
    assert inv["memory"]["allocatable_bytes"] == 23 * 2**30
    assert inv["accelerators"] == {"gpu.intel.com/i915": 1, "nvidia.com/gpu": 2}
    flat = facts(inv)
    assert flat["node_count"] == 4 and flat["cpu_count"] == 5.9
    assert flat["accelerator.nvidia.com_gpu"] == 2 and flat["kubernetes_version"] == "v1.37.2"
    assert flat["accelerator.gpu.intel.com_i915"] == 1
    assert flat["platforms"] == "linux/amd64,linux/arm64"
    # What a reported state carries must pass the protocol's own reader.
    from contract.protocol import _read_values
    assert _read_values("inventory", flat) == flat
