"""The hub's side of Kubernetes mode, in process: clusters tagged from their reported
inventory, and split or shadow rollouts refused for targets that hold a cluster."""

from __future__ import annotations

import pytest

from agent.kube.inventory import facts, summarize
from hub.ingest import cluster_tags
from hubapp import InProcessHub


def test_a_cluster_s_facts_become_tags() -> None:
    node = {"metadata": {"labels": {}}, "spec": {}, "status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "nodeInfo": {"architecture": "arm64", "operatingSystem": "linux"},
        "allocatable": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"}}}
    inventory = facts(summarize([node], {"gitVersion": "v1.37.2"}))
    assert cluster_tags(inventory) == {"runtime.kubernetes": "true", "arch.arm64": "yes",
                                       "accel.kubernetes.nvidia.com_gpu": "2"}
    assert cluster_tags({"cpu_count": 4, "platforms": "linux/amd64"}) == {}


@pytest.fixture
def hub(inproc: InProcessHub) -> InProcessHub:
    inproc.publish("tiny", 1)
    inproc.publish("tiny", 2)
    inproc.add_devices(["dev-a"], site="lab")
    inproc.add_devices(["cluster-a"], site="lab", **{"runtime.kubernetes": "true"})
    inproc.deploy(["dev-a", "cluster-a"], "tiny", 1, "tiny")
    return inproc


@pytest.mark.parametrize("split", [{"traffic": 10}, {"shadow": True}])
def test_split_and_shadow_rollouts_are_refused_when_the_target_holds_a_cluster(
        hub: InProcessHub, split: dict[str, object]) -> None:
    answer = hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 2, "target": {"site": "lab"}, **split})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "1 target device(s) are Kubernetes clusters (cluster-a)" in detail, detail
    # Without the split, or with a target without the cluster, it goes ahead.
    plain = hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 2, "target": {"site": "lab"}})
    assert plain.status_code in (200, 201), plain.text
