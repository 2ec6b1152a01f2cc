"""Kubernetes mode against a real API server (etcd, kube-apiserver, controller manager,
scheduler) with kwok's fake nodes: the fixture, inventory, apply, drift, undo, RBAC."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, utils

from agent.kube.apply import KubeError, Namespace, NotOurs
from agent.kube.driver import pod_resources
from agent.kube.inventory import read_inventory
from agent.kube.manifests import Release, Resources, Target, Workload
from agent.kube.rollout import Phase
from contract.settings import GPU, Batching, Settings
from contract.settings import Resources as DeploymentResources
from kube import KubeCluster, apps_v1, core_v1, kube_cluster  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kubernetes"
REGISTRY = "hub.test:5000"
PLATFORMS = ("linux/amd64", "linux/arm64")


def release(version: int) -> Release:
    return Release("tiny", version, "models/tiny", f"sha256:{version:064x}")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.3)


@pytest.fixture
def admin(kube_cluster: KubeCluster) -> Iterator[client.ApiClient]:  # noqa: F811
    with kube_cluster.admin_client() as api:
        yield api


@pytest.fixture
def namespace(admin: client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = core_v1(admin)
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_secret(name, {"metadata": {"name": "scoring-key"},
                                         "stringData": {"api-key": "k" * 32}})
    yield name
    core.delete_namespace(name)


def test_a_deployment_becomes_ready_on_kwok_nodes(admin: client.ApiClient,
                                                  namespace: str) -> None:
    apps = apps_v1(admin)
    labels = {"app": "smoke"}
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "smoke"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
    })
    ready = wait_for("2 ready replicas", lambda: apps.read_namespaced_deployment(
        "smoke", namespace).status.ready_replicas == 2)
    assert ready
    pods = core_v1(admin).list_namespaced_pod(namespace).items
    assert {p.spec.node_name for p in pods} <= {"kwok-amd64", "kwok-arm64"}


def test_inventory_reads_nodes_architectures_and_accelerators(admin: client.ApiClient) -> None:
    inv = read_inventory(admin)
    assert inv["kubernetes_version"] == "v1.37.2"
    assert inv["nodes"] == {"total": 2, "schedulable": 2}
    assert inv["platforms"] == ["linux/amd64", "linux/arm64"]
    assert inv["cpu"]["allocatable_millicores"] == 6000
    assert inv["memory"]["allocatable_bytes"] == 24 * 2**30
    assert inv["accelerators"] == {"nvidia.com/gpu": 1}


def target(namespace: str) -> Target:
    return Target(namespace=namespace, agent="cluster-1", registry=REGISTRY,
                  api_key_secret="scoring-key")


def test_deploy_update_drift_and_prune(admin: client.ApiClient, namespace: str) -> None:
    ns = Namespace(admin, target(namespace))
    v1 = Workload("tiny", release(1), PLATFORMS)
    applied = ns.deploy(v1)
    assert applied.drift == ()
    assert ns.follow(v1.object_name, timeout=60, poll=0.3).phase is Phase.COMPLETE

    v2 = Workload("tiny", release(2), PLATFORMS, previous=v1)
    ns.deploy(v2)
    status = ns.follow(v2.object_name, timeout=60, poll=0.3)
    assert status.phase is Phase.COMPLETE, status.message
    live = apps_v1(admin).read_namespaced_deployment(v2.object_name, namespace)
    assert live.spec.template.spec.containers[0].image == \
        f"{REGISTRY}/models/tiny@{release(2).digest}"

    # Someone scales by hand (as kubectl scale does, through the scale subresource):
    apps_v1(admin).patch_namespaced_deployment_scale(
        v2.object_name, namespace, {"spec": {"replicas": 3}}, field_manager="kubectl")
    again = ns.deploy(v2)
    assert again.drift == (f"Deployment {v2.object_name}: replicas 3, desired 1",)
    assert again.deployment["spec"]["replicas"] == 1
    # ... and edits the image (as kubectl set image does, a strategic merge patch):
    apps_v1(admin).patch_namespaced_deployment(v2.object_name, namespace, {"spec": {
        "template": {"spec": {"containers": [{"name": "serving", "image": "evil:latest"}]}}}},
        field_manager="kubectl-set")
    again = ns.deploy(v2)
    assert again.drift == (f"Deployment {v2.object_name}: image evil:latest, desired "
                           f"{REGISTRY}/models/tiny@{release(2).digest}",)
    assert again.deployment["spec"]["template"]["spec"]["containers"][0]["image"] \
        .endswith(release(2).digest)

    # A second deployment, then the desired state drops the first.
    other = Workload("other.model", release(1), PLATFORMS)
    ns.deploy(other)
    assert ns.prune(keep={other.object_name}) == ["tiny"]
    assert [d["metadata"]["name"] for d in ns.deployments()] == [other.object_name]
    assert core_v1(admin).list_namespaced_service(namespace).items[0].metadata.name \
        == other.object_name


def test_objects_of_someone_else_are_never_touched(admin: client.ApiClient,
                                                   namespace: str) -> None:
    apps = apps_v1(admin)
    labels = {"app": "theirs"}
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "ef-tiny"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
    })
    ns = Namespace(admin, target(namespace))
    with pytest.raises(NotOurs, match="is not this agent's"):
        ns.deploy(Workload("tiny", release(1), PLATFORMS))
    assert apps.read_namespaced_deployment("ef-tiny", namespace).spec.template.spec \
        .containers[0].image == "busybox"
    assert ns.prune(keep=()) == []
    assert apps.read_namespaced_deployment("ef-tiny", namespace)


def test_a_release_that_never_gets_ready_is_undone(admin: client.ApiClient,
                                                   namespace: str) -> None:
    ns = Namespace(admin, target(namespace))
    good = Workload("tiny", release(1), PLATFORMS, progress_deadline_seconds=10)
    ns.deploy(good)
    assert ns.follow(good.object_name, timeout=60, poll=0.3).phase is Phase.COMPLETE

    # Asks for more GPUs than any node has: its pods stay Pending, the deadline passes.
    bad = Workload("tiny", release(2), PLATFORMS, previous=good,
                   resources=Resources(accelerators={"nvidia.com/gpu": 4}),
                   progress_deadline_seconds=10)
    ns.deploy(bad)
    status = ns.follow(bad.object_name, timeout=90, poll=0.5)
    assert status.phase is Phase.DEADLINE_EXCEEDED, status.message
    assert status.available == 1   # the old pod kept serving all along
    pods = core_v1(admin).list_namespaced_pod(
        namespace, field_selector="status.phase=Pending").items
    events = wait_for("scheduling events", lambda: ns.events([p.metadata.name for p in pods]))
    assert any("FailedScheduling" in e and "nvidia.com/gpu" in e for e in events), events

    back = ns.undo(bad.object_name)
    assert back == good
    status = ns.follow(bad.object_name, timeout=60, poll=0.3)
    assert status.phase is Phase.COMPLETE, status.message
    live = apps_v1(admin).read_namespaced_deployment(bad.object_name, namespace)
    assert live.spec.template.spec.containers[0].image.endswith(release(1).digest)
    with pytest.raises(KubeError, match="no previous workload"):
        ns.undo(bad.object_name)


def test_install_manifests_apply_and_the_agent_is_refused_outside_its_namespace(
        kube_cluster: KubeCluster, admin: client.ApiClient, tmp_path: Path) -> None:  # noqa: F811
    for name in ("namespace.yaml", "rbac.yaml", "secret.yaml", "agent.yaml"):
        utils.create_from_yaml(admin, str(EXAMPLES / name))
    kubeconfig = kube_cluster.service_account_kubeconfig("edgefleet", "edgefleet-agent",
                                                         tmp_path / "agent.kubeconfig")
    with kube_cluster.client(kubeconfig) as agent_api:
        # Everything the agent does in its namespace is allowed ...
        ns = Namespace(agent_api, Target(namespace="edgefleet", agent="cluster-1",
                                         registry=REGISTRY, pull_secret="edgefleet-registry",
                                         api_key_secret="edgefleet-scoring-key"))
        ns.set_pull_secret("device-1", "first")
        ns.set_pull_secret("device-1", "second")   # updated in place
        workload = Workload("tiny", release(1), PLATFORMS)
        ns.deploy(workload)
        assert ns.follow(workload.object_name, timeout=60, poll=0.3).phase is Phase.COMPLETE
        assert ns.events(["no-such-pod"]) == []
        # The pods' metrics: the scoring key (that one Secret, read only) and the pod IPs.
        assert ns.api_key() == "REPLACE_ME_WITH_A_LONG_RANDOM_KEY"
        [pod] = ns.metrics_addresses(workload.object_name)
        assert pod.pod.startswith(f"{workload.object_name}-")
        assert re.fullmatch(r"http://[0-9.]+:8500/metrics", pod.url), pod.url
        assert read_inventory(agent_api)["nodes"]["total"] == 2
        # ... and nothing outside it, nor other secrets inside it.
        outside = Namespace(agent_api, Target(namespace="default", agent="cluster-1",
                                              registry=REGISTRY, api_key_secret="k"))
        with pytest.raises(KubeError, match="403") as refused:
            outside.deploy(workload)
        assert "cannot get resource" in str(refused.value)
        other_secret = Namespace(agent_api, Target(
            namespace="edgefleet", agent="cluster-1", registry=REGISTRY,
            pull_secret="someone-elses", api_key_secret="k"))
        with pytest.raises(KubeError, match="403"):
            other_secret.set_pull_secret("device-1", "pw")
        core = core_v1(agent_api)
        for attempt in (lambda: core.list_namespaced_pod("kube-system"),
                        lambda: core.list_pod_for_all_namespaces(),
                        lambda: core.read_namespaced_secret("edgefleet-agent", "edgefleet"),
                        lambda: core.delete_node("kwok-amd64")):
            with pytest.raises(client.ApiException) as caught:
                attempt()
            assert caught.value.status == 403
        assert ns.prune(keep=()) == ["tiny"]
    secret = core_v1(admin).read_namespaced_secret("edgefleet-registry", "edgefleet")
    assert secret.type == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(secret.data[".dockerconfigjson"]))
    assert config["auths"][REGISTRY]["password"] == "second"


def test_an_api_server_that_is_down_is_one_retryable_line(kube_cluster: KubeCluster,  # noqa: F811
                                                         tmp_path: Path) -> None:
    from hubproc import free_port
    from kube import write_kubeconfig

    kubeconfig = write_kubeconfig(tmp_path / "down.kubeconfig",
                                  server=f"https://127.0.0.1:{free_port()}",
                                  ca=kube_cluster.pki.ca, user={"token": "x"})
    with kube_cluster.client(kubeconfig) as api:
        with pytest.raises(KubeError) as caught:
            Namespace(api, target("edge")).deploy(Workload("tiny", release(1), PLATFORMS))
    assert caught.value.retryable and caught.value.status is None
    assert "API server not reached" in str(caught.value) and "\n" not in str(caught.value)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def play_kubelet(core: Any, pod: Any, *, crash: bool) -> None:
    """Report POD's status as a kubelet would: serving, or crash-looping after 3 restarts."""
    container: dict[str, Any] = {"name": "serving", "image": pod.spec.containers[0].image,
                                 "imageID": "", "ready": not crash}
    if crash:
        container.update(restartCount=3, started=False,
                         state={"waiting": {"reason": "CrashLoopBackOff",
                                            "message": "back-off 40s restarting failed container"}},
                         lastState={"terminated": {"exitCode": 1, "reason": "Error",
                                                   "startedAt": _now(), "finishedAt": _now()}})
    else:
        container.update(restartCount=0, started=True, state={"running": {"startedAt": _now()}})
    ready = "False" if crash else "True"
    core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": {
        "phase": "Running", "startTime": _now(), "hostIP": "10.244.9.1", "podIP": "10.244.9.2",
        "conditions": [{"type": t, "status": s, "lastTransitionTime": _now()} for t, s in
                       (("PodScheduled", "True"), ("Initialized", "True"),
                        ("ContainersReady", ready), ("Ready", ready))],
        "containerStatuses": [container]}})


def test_a_crash_looping_release_is_undone(admin: client.ApiClient, namespace: str) -> None:
    # A node kwok leaves alone: the test is its kubelet, to make a pod crash-loop.
    core = core_v1(admin)
    node = "kubelet-riscv64"
    capacity = {"cpu": "4", "memory": "8Gi", "pods": "10"}
    core.create_node({"metadata": {"name": node, "labels": {"kubernetes.io/arch": "riscv64",
                                                            "kubernetes.io/os": "linux"}},
                      "status": {"capacity": capacity, "allocatable": capacity,
                                 "conditions": [{"type": "Ready", "status": "True",
                                                 "lastHeartbeatTime": _now(),
                                                 "lastTransitionTime": _now()}]}})
    try:
        ns = Namespace(admin, target(namespace))

        def pods_to_run(crash: bool) -> None:
            pending = wait_for("a pod on the node", lambda: [
                p for p in core.list_namespaced_pod(namespace).items
                if p.spec.node_name == node and not p.status.container_statuses
                and p.metadata.deletion_timestamp is None])
            for pod in pending:
                play_kubelet(core, pod, crash=crash)

        good = Workload("tiny", release(1), ("linux/riscv64",))
        ns.deploy(good)
        pods_to_run(crash=False)
        assert ns.follow(good.object_name, timeout=60, poll=0.3).phase is Phase.COMPLETE

        bad = Workload("tiny", release(2), ("linux/riscv64",), previous=good)
        ns.deploy(bad)
        pods_to_run(crash=True)
        status = ns.follow(bad.object_name, timeout=60, poll=0.3)
        assert status.phase is Phase.FAILING, status.message
        assert "CrashLoopBackOff" in status.message and status.restarts == 3
        assert status.ready == 1   # the old pod still serves

        assert ns.undo(bad.object_name) == good
        # The kubelet confirms the crashing pod is gone once the controller deletes it.
        doomed = wait_for("the crashing pod deleted", lambda: [
            p for p in core.list_namespaced_pod(namespace).items
            if p.metadata.deletion_timestamp is not None])
        for pod in doomed:
            core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
        status = ns.follow(bad.object_name, timeout=60, poll=0.3)
        assert status.phase is Phase.COMPLETE, status.message
    finally:
        core.delete_node(node)


def test_update_outcomes_serving_rolled_back_failed(admin: client.ApiClient,
                                                   namespace: str) -> None:
    from agent.kube.update import Result, update

    ns = Namespace(admin, target(namespace))
    looks: list[Any] = []
    v1 = Workload("tiny", release(1), PLATFORMS, progress_deadline_seconds=10)
    first = update(ns, v1, poll=0.3, on_status=looks.append)
    assert first.result is Result.SERVING and first.workload == v1
    assert looks[-1].ready == looks[-1].desired == 1

    v2 = replace(v1, release=release(2))
    second = update(ns, v2, poll=0.3)
    assert second.result is Result.SERVING and second.workload.previous == v1

    # Asks for 4 GPUs: never scheduled, the deadline passes, back to v2 with the reason.
    v3 = replace(v1, release=release(3), resources=Resources(accelerators={"nvidia.com/gpu": 4}))
    third = update(ns, v3, poll=0.3)
    assert third.result is Result.ROLLED_BACK, third.message
    assert third.workload == v2 and "progress deadline" in third.message
    assert any("FailedScheduling" in e and "nvidia.com/gpu" in e for e in third.events), \
        third.events
    live = apps_v1(admin).read_namespaced_deployment(v1.object_name, namespace)
    assert live.spec.template.spec.containers[0].image.endswith(release(2).digest)

    # The same workload again (an agent restarted mid-update): followed, still serving.
    again = update(ns, v2, poll=0.3)
    assert again.result is Result.SERVING and again.workload == v2   # undo kept no previous

    # A first release that fails leaves nothing behind.
    lone = Workload("lone", release(1), ("linux/s390x",), progress_deadline_seconds=10)
    failed = update(ns, lone, poll=0.3)
    assert failed.result is Result.FAILED and "objects were removed" in failed.message
    assert ns.deployment(lone.object_name) is None
    assert [d["metadata"]["name"] for d in ns.deployments()] == [v1.object_name]


def test_a_deployments_settings_are_its_pods_resources(admin: client.ApiClient,
                                                       namespace: str) -> None:
    """The deployment's settings (as the driver turns them into a workload) reach the live
    Deployment: CPU request = limit, memory, the GPU limit, and the batching env the pod's
    `edgefleet serve --load` reads; a settings-only change is a rollout of its own, and an
    undo goes back to the old settings."""
    ns = Namespace(admin, target(namespace))
    default = Resources("250m", "512Mi")
    before = Workload("tiny", release(1), PLATFORMS, resources=default)
    ns.deploy(before)
    assert ns.follow(before.object_name, timeout=60, poll=0.3).phase is Phase.COMPLETE

    wanted = Settings(DeploymentResources(500, 768 * 2**20, ((GPU, 1),)), Batching(32, 2))
    after = Workload("tiny", release(1), PLATFORMS, previous=before,
                     resources=pod_resources(wanted.resources, default),
                     batching=str(wanted.batching))
    ns.deploy(after)
    status = ns.follow(after.object_name, timeout=60, poll=0.3)
    assert status.phase is Phase.COMPLETE, status.message   # kwok-amd64 has one GPU
    live = apps_v1(admin).read_namespaced_deployment(after.object_name, namespace)
    container = live.spec.template.spec.containers[0]
    assert container.resources.requests == {"cpu": "500m", "memory": "768Mi",
                                            "nvidia.com/gpu": "1"}
    assert container.resources.limits == {"cpu": "500m", "memory": "768Mi",
                                          "nvidia.com/gpu": "1"}
    assert {e.name: e.value for e in container.env if e.value is not None}[
        "EDGEFLEET_SERVE_BATCHING"] == "32:2"
    pods = core_v1(admin).list_namespaced_pod(namespace).items
    assert {p.spec.node_name for p in pods if p.metadata.deletion_timestamp is None} == {
        "kwok-amd64"}   # the GPU is on that node only
    # Batching off: the env says so (the package's default does not apply).
    off = replace(after, previous=replace(after, previous=None), batching=str(Batching.OFF))
    ns.deploy(off)
    live = apps_v1(admin).read_namespaced_deployment(after.object_name, namespace)
    assert {e.name: e.value for e in live.spec.template.spec.containers[0].env}[
        "EDGEFLEET_SERVE_BATCHING"] == "off"
    back = ns.undo(off.object_name)
    assert back.resources == after.resources and back.batching == "32:2"
