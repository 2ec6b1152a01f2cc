"""`edgefleet agent run --mode kubernetes` end to end: a real hub (TLS, its own Mosquitto), a real
API server (etcd, controller manager, scheduler; kwok's nodes) and the agent process.

Enroll with the cluster's inventory, deploy and update through the hub, a hub rollout
over the cluster and a native device, a version whose pods never get ready undone, a
tampered package never applied, the agent killed mid-update and resumed, telemetry
(replicas, and the pods' /metrics read from a real serving process), hand edits brought
back; the agent runs with the install manifests' least-privilege Role.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes import client, utils

from agent.kube.apply import Namespace
from agent.kube.manifests import Target, workloads_of
from agentproc import AgentProcess, deploy, enrollment_token, publish_version, start_agent, wait_for
from hubproc import EDGEFLEET, HubProcess, free_port, start_hub, stop_process
from kube import KubeAgentProcess, KubeCluster, apps_v1, core_v1, kube_cluster  # noqa: F401
from kube import start_kube_agent as start
from modelgen import make_onnx
from test_serving_autoload import image_root
from test_serving_process import start_serve

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kubernetes"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """With TLS and its own broker: the agent verifies the hub's REST, registry and
    broker with the CA its token pinned, and is known to the broker by its certificate."""
    process = start_hub(tmp_path_factory.mktemp("hub") / "data")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def versions(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """tiny:1, tiny:2 and tiny:3: the same function, different bytes."""
    work = tmp_path_factory.mktemp("models")
    made = []
    for n in (1, 2, 3):
        (work / str(n)).mkdir()
        made.append(publish_version(hub, "tiny", make_onnx(work / str(n) / "model.onnx",
                                                            batch=n)))
    return made


@pytest.fixture(scope="module")
def admin(kube_cluster: KubeCluster) -> Iterator[client.ApiClient]:  # noqa: F811
    with kube_cluster.admin_client() as api:
        yield api


@pytest.fixture(scope="module")
def namespace(admin: client.ApiClient) -> Iterator[str]:
    name = f"ka-{uuid.uuid4().hex[:8]}"
    core = core_v1(admin)
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_secret(name, {"metadata": {"name": "edgefleet-scoring-key"},
                                         "stringData": {"api-key": "k" * 32}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def agent_kubeconfig(kube_cluster: KubeCluster, admin: client.ApiClient,  # noqa: F811
                     namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The install manifests' ServiceAccount and least-privilege Role, in NAMESPACE (the
    cluster-wide read of nodes under names of its own): the agent runs with only that."""
    documents = list(yaml.safe_load_all((EXAMPLES / "rbac.yaml").read_text()))
    for document in documents:
        meta = document["metadata"]
        if "namespace" in meta:
            meta["namespace"] = namespace
        else:
            meta["name"] = f"{namespace}-nodes"
        if document["kind"] == "ClusterRoleBinding":
            document["roleRef"]["name"] = f"{namespace}-nodes"
        for subject in document.get("subjects", ()):
            subject["namespace"] = namespace
        utils.create_from_dict(admin, document)
    return kube_cluster.service_account_kubeconfig(
        namespace, "edgefleet-agent", tmp_path_factory.mktemp("sa") / "agent.kubeconfig")


def api(hub: HubProcess, path: str, **kwargs: Any) -> Any:
    answer = httpx.request(kwargs.pop("method", "GET"), f"{hub.url}/api/v1{path}",
                           headers={"Authorization": f"Bearer {hub.admin_token}"}, timeout=30,
                           **kwargs)
    answer.raise_for_status()
    return answer.json()


def start_kube_agent(hub: HubProcess, kubeconfig: Path, namespace: str, data_dir: Path, *,
                     env: dict[str, str] | None = None) -> KubeAgentProcess:
    return start(hub, kubeconfig, namespace, data_dir, tags={"site": "lab"}, env=env,
                 extra_args=("--progress-deadline", "10", "--telemetry-interval", "1",
                             "--reconcile-interval", "2"))


@pytest.fixture(scope="module")
def cluster_agent(hub: HubProcess, agent_kubeconfig: Path, namespace: str,
                  versions: list[int], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[KubeAgentProcess]:
    agent = start_kube_agent(hub, agent_kubeconfig, namespace,
                             tmp_path_factory.mktemp("kube-agent") / "data")
    yield agent
    if agent.process.poll() is None:
        assert agent.stop() == 0, agent.log()


def reported(hub: HubProcess, device_id: str, version: int, state: str) -> dict | None:
    rows = api(hub, f"/devices/{device_id}/deployments")["reported"]
    return next((r for r in rows if r["version"] == version and r["state"] == state), None)


def wait_state(hub: HubProcess, agent: KubeAgentProcess, version: int, state: str,
               timeout: float = 120) -> dict:
    def seen() -> dict | None:
        if agent.process.poll() is not None:   # a crashed agent reports nothing: say so now
            raise AssertionError(f"the cluster agent exited with {agent.process.returncode}:"
                                 f"\n{agent.log()[-3000:]}")
        return reported(hub, agent.device_id, version, state)

    return wait_for(seen, timeout=timeout,
                    what=f"tiny:{version} {state} on the cluster\n{agent.log()[-3000:]}")


def live_image(admin: client.ApiClient, namespace: str) -> str:
    live = apps_v1(admin).read_namespaced_deployment("ef-tiny", namespace)
    return str(live.spec.template.spec.containers[0].image)


def digest_of(hub: HubProcess, version: int) -> str:
    return str(api(hub, f"/packages/tiny/{version}")["digest"])


def test_the_cluster_enrolls_with_its_inventory_and_is_tagged(
        hub: HubProcess, cluster_agent: KubeAgentProcess) -> None:
    record = api(hub, f"/devices/{cluster_agent.device_id}")
    assert record["platform"] == "linux/amd64"
    inventory = record["inventory"]
    assert inventory["kubernetes_version"] == "v1.37.2"
    assert inventory["node_count"] == 2 and inventory["platforms"] == "linux/amd64,linux/arm64"
    assert inventory["accelerator.nvidia.com_gpu"] == 1 and inventory["cpu_count"] == 6
    tags = record["tags"]
    assert tags["runtime.kubernetes"] == "true" and tags["site"] == "lab"
    assert tags["arch.amd64"] == tags["arch.arm64"] == "yes"
    assert tags["accel.kubernetes.nvidia.com_gpu"] == "1"


def test_deploy_and_update_roll_the_deployment_and_report_replicas(
        hub: HubProcess, cluster_agent: KubeAgentProcess, admin: client.ApiClient, namespace: str,
        versions: list[int]) -> None:
    first, second, _ = versions
    deploy(hub, cluster_agent.device_id, f"tiny:{first}")
    # Reported with where it runs from its first "serving" report (the rollout's look,
    # carried until the switch's).
    row = wait_state(hub, cluster_agent, first, "serving")
    assert row["runtime"] == "kubernetes" and row["device"] == f"{namespace}: 1/1 ready"
    assert live_image(admin, namespace) == \
        f"{urlsplit(hub.url).netloc}/models/tiny@{digest_of(hub, first)}"
    live = apps_v1(admin).read_namespaced_deployment("ef-tiny", namespace)
    env = {e.name: e.value for e in live.spec.template.spec.containers[0].env}
    assert env["EDGEFLEET_SERVE_LOAD"] == f"tiny:{first}"
    secret = core_v1(admin).read_namespaced_secret("edgefleet-registry", namespace)
    assert secret.type == "kubernetes.io/dockerconfigjson"

    deploy(hub, cluster_agent.device_id, f"tiny:{second}")
    wait_state(hub, cluster_agent, second, "serving")
    assert live_image(admin, namespace).endswith(digest_of(hub, second))

    # A round read during the pods' rollout may count the old pod too: wait for one after it.
    points = wait_for(lambda: [p for p in api(hub, f"/devices/{cluster_agent.device_id}"
                                                   "/telemetry?kind=inference")
                               if p["values"].get("version") == second
                               and p["values"].get("ready_replicas") == 1
                               and p["values"].get("desired_replicas") == 1], timeout=30,
                      what="replica telemetry, 1 of 1 ready")
    values = points[-1]["values"]
    assert values["deployment"] == "tiny"
    assert values["restarts"] == 0


def test_a_settings_only_change_rolls_the_pods(
        hub: HubProcess, cluster_agent: KubeAgentProcess, admin: client.ApiClient, namespace: str,
        versions: list[int]) -> None:
    second = versions[1]
    deploy(hub, cluster_agent.device_id, f"tiny:{second}")
    wait_state(hub, cluster_agent, second, "serving")
    deploy(hub, cluster_agent.device_id, f"tiny:{second}", "--cpus", "0.5", "--memory",
           "768Mi")

    def pod() -> Any:
        return apps_v1(admin).read_namespaced_deployment("ef-tiny", namespace).spec.template \
            .spec.containers[0]

    wait_for(lambda: pod().resources.limits.get("cpu") == "500m", timeout=60,
             what="the deployment's resources on the pods")
    assert pod().resources.requests == {"cpu": "500m", "memory": "768Mi"}
    def rolled() -> bool:
        live = apps_v1(admin).read_namespaced_deployment("ef-tiny", namespace)
        return (live.status.observed_generation == live.metadata.generation
                and live.status.updated_replicas == live.status.ready_replicas == 1
                and not live.status.unavailable_replicas)

    wait_for(rolled, timeout=60, what="the settings' rollout complete")
    row = wait_state(hub, cluster_agent, second, "serving")
    assert row["error"] is None
    assert f"update of tiny to {second} failed" not in cluster_agent.log()
    # Batching on this model (its batch is fixed at 2): refused before anything is applied.
    deploy(hub, cluster_agent.device_id, f"tiny:{second}", "--cpus", "0.5", "--memory",
           "768Mi", "--batch-size", "16")
    row = wait_state(hub, cluster_agent, second, "rolled_back")
    assert "the model cannot batch: input 'x' has shape [2, 3]" in row["error"]
    assert pod().resources.limits["cpu"] == "500m"
    assert "EDGEFLEET_SERVE_BATCHING" not in {e.name for e in pod().env}


def test_hand_edits_are_brought_back_and_counted(
        hub: HubProcess, cluster_agent: KubeAgentProcess, admin: client.ApiClient,
        namespace: str, versions: list[int]) -> None:
    first = versions[0]
    deploy(hub, cluster_agent.device_id, f"tiny:{first}")
    wait_state(hub, cluster_agent, first, "serving")
    apps = apps_v1(admin)
    apps.patch_namespaced_deployment_scale("ef-tiny", namespace, {"spec": {"replicas": 3}},
                                           field_manager="kubectl")
    apps.patch_namespaced_deployment("ef-tiny", namespace, {"spec": {"template": {"spec": {
        "containers": [{"name": "serving", "image": "evil:latest"}]}}}},
        field_manager="kubectl-set")
    wait_for(lambda: (live := apps.read_namespaced_deployment("ef-tiny", namespace)).spec
             .replicas == 1 and live.spec.template.spec.containers[0].image.endswith(
                 digest_of(hub, first)), timeout=30, what="the hand edits undone")
    assert "drift brought back: Deployment ef-tiny: replicas 3, desired 1" in \
        cluster_agent.log()
    wait_for(lambda: [p for p in api(hub, f"/devices/{cluster_agent.device_id}"
                                          "/telemetry?kind=inference")
                      if p["values"].get("drift_corrected", 0) >= 1], timeout=30,
             what="drift counted in telemetry")
    # A Deployment deleted by hand comes back too.
    apps.delete_namespaced_deployment("ef-tiny", namespace)
    wait_for(lambda: apps.list_namespaced_deployment(namespace).items, timeout=30,
             what="the deleted Deployment back")
    wait_for(lambda: "Deployment ef-tiny was gone" in cluster_agent.log(), timeout=10,
             what="the deletion logged as drift")
    # Another version left applied (as an undo that could not reach the API server would):
    # the version the agent reports serving comes back.
    ours = Namespace(admin, Target(namespace, cluster_agent.device_id, "elsewhere:5000",
                                   "edgefleet-scoring-key"))
    current, _ = workloads_of(wait_for(lambda: ours.deployment("ef-tiny"), timeout=10))
    ours.deploy(replace(current, release=replace(current.release, version=99,
                                                 digest="sha256:" + "9" * 64)))
    wait_for(lambda: live_image(admin, namespace).endswith(digest_of(hub, first)), timeout=30,
             what="the serving version back")
    assert f"Deployment ef-tiny ran version 99, not {first}" in cluster_agent.log()


def test_a_version_whose_pods_never_get_ready_is_undone(
        hub: HubProcess, cluster_agent: KubeAgentProcess, admin: client.ApiClient, namespace: str,
        versions: list[int]) -> None:
    first, second, third = versions
    deploy(hub, cluster_agent.device_id, f"tiny:{second}")
    wait_state(hub, cluster_agent, second, "serving")
    # A quota of one pod: the new version's pod cannot even be created, so the
    # rollout misses its 10 s progress deadline while the old pod serves on.
    core = core_v1(admin)
    core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "one-pod"},
                                                      "spec": {"hard": {"pods": "1"}}})
    try:
        deploy(hub, cluster_agent.device_id, f"tiny:{third}")
        row = wait_state(hub, cluster_agent, third, "rolled_back")
        assert "progress deadline" in row["error"], row
        assert live_image(admin, namespace).endswith(digest_of(hub, second))
        assert reported(hub, cluster_agent.device_id, second, "serving")
    finally:
        core.delete_namespaced_resource_quota("one-pod", namespace)


def test_a_tampered_package_never_reaches_the_cluster(
        hub: HubProcess, cluster_agent: KubeAgentProcess, admin: client.ApiClient, namespace: str,
        versions: list[int], tmp_path: Path) -> None:
    deploy(hub, cluster_agent.device_id, f"tiny:{versions[0]}")
    wait_state(hub, cluster_agent, versions[0], "serving")
    version = publish_version(hub, "tiny", make_onnx(tmp_path / "model.onnx", batch=7))
    package = api(hub, f"/packages/tiny/{version}")
    layer = next(x for x in package["images"][0]["layers"] if x["role"] == "serving")
    blob = next((hub.data_dir / "blobs").rglob(layer["digest"].removeprefix("sha256:")))
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        deploy(hub, cluster_agent.device_id, f"tiny:{version}")
        row = wait_state(hub, cluster_agent, version, "rolled_back")
        assert "verification" in row["error"] and "digest" in row["error"], row
        live = apps_v1(admin).read_namespaced_deployment("ef-tiny", namespace)
        assert live.spec.template.spec.containers[0].image.endswith(digest_of(hub, versions[0]))
        assert package["digest"] not in str(live.metadata.annotations)
    finally:
        blob.write_bytes(original)


def test_an_agent_killed_mid_update_resumes_it(
        hub: HubProcess, agent_kubeconfig: Path, cluster_agent: KubeAgentProcess,
        admin: client.ApiClient, namespace: str, versions: list[int]) -> None:
    first, second, _ = versions
    deploy(hub, cluster_agent.device_id, f"tiny:{first}")
    wait_state(hub, cluster_agent, first, "serving")
    assert cluster_agent.stop() == 0, cluster_agent.log()
    # Paused once the Deployment is rolled out and self_test is saved: killed there.
    paused = start_kube_agent(hub, agent_kubeconfig, namespace, cluster_agent.data_dir,
                              env={"EDGEFLEET_AGENT_PAUSE_IN": "self_test:60"})
    deploy(hub, cluster_agent.device_id, f"tiny:{second}")
    wait_for(lambda: (paused.data_dir / "state.json").exists()
             and '"state": "self_test"' in (paused.data_dir / "state.json").read_text(),
             timeout=60, what="the update paused in self_test")
    assert live_image(admin, namespace).endswith(digest_of(hub, second))
    paused.stop(signal.SIGKILL)
    resumed = start_kube_agent(hub, agent_kubeconfig, namespace, cluster_agent.data_dir)
    cluster_agent.process = resumed.process   # the fixture stops this one
    wait_state(hub, resumed, second, "serving")
    # Followed again, not rolled again: one ReplicaSet per version.
    replica_sets = apps_v1(admin).list_namespaced_replica_set(namespace).items
    images = sorted(rs.spec.template.spec.containers[0].image.rsplit("@", 1)[1]
                    for rs in replica_sets)
    assert len(images) == len(set(images)), images


def test_an_api_server_that_is_away_is_waited_for_not_exited_on(
        hub: HubProcess, kube_cluster: KubeCluster, cluster_agent: KubeAgentProcess,  # noqa: F811
        agent_kubeconfig: Path, namespace: str, tmp_path: Path) -> None:
    assert cluster_agent.stop() == 0, cluster_agent.log()
    down = tmp_path / "down.kubeconfig"   # the agent's own, with nothing at the address
    down.write_text(agent_kubeconfig.read_text().replace(
        kube_cluster.url, f"https://127.0.0.1:{free_port()}"))
    log_path = tmp_path / "down-agent.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*EDGEFLEET, "agent", "run", "--mode", "kubernetes", "--data-dir",
             str(cluster_agent.data_dir), "--kubeconfig", str(down), "--namespace", namespace],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: log_path.read_text().count("API server not reached") >= 2,
                 timeout=30, what=f"retries logged\n{log_path.read_text()}")
        assert process.poll() is None, log_path.read_text()
    finally:
        stop_process(process)
    restarted = start_kube_agent(hub, agent_kubeconfig, namespace, cluster_agent.data_dir)
    cluster_agent.process = restarted.process   # the fixture stops this one


def test_a_b_split_and_shadow_are_refused_for_clusters(
        hub: HubProcess, cluster_agent: KubeAgentProcess, versions: list[int]) -> None:
    first, second, _ = versions
    # Deployed by hand: the cluster serves the primary and reports the candidate failed.
    deploy(hub, cluster_agent.device_id, f"tiny:{first}", "--candidate", str(second),
           "--traffic", "10")
    row = wait_state(hub, cluster_agent, second, "failed")
    assert "not supported on a Kubernetes target" in row["error"], row
    assert reported(hub, cluster_agent.device_id, first, "serving")
    # A rollout with a split is refused before it starts when its target has a cluster.
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token}
    done = subprocess.run([*EDGEFLEET, "rollout", "create", f"tiny:{second}", "--target",
                           "site=lab", "--traffic", "10"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "Kubernetes clusters" in done.stderr, done.stderr
    deploy(hub, cluster_agent.device_id, f"tiny:{first}")   # no candidate: back to normal


def test_a_hub_rollout_over_the_cluster_and_a_native_device(
        hub: HubProcess, cluster_agent: KubeAgentProcess, admin: client.ApiClient, namespace: str,
        versions: list[int], tmp_path: Path) -> None:
    first, second, _ = versions
    native: AgentProcess = start_agent(hub, tmp_path / "native",
                                       token=enrollment_token(hub, tags={"site": "lab"}))
    try:
        for device in (cluster_agent.device_id, native.device_id):
            deploy(hub, device, f"tiny:{first}")
        wait_state(hub, cluster_agent, first, "serving")
        env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token}
        done = subprocess.run([*EDGEFLEET, "rollout", "create", f"tiny:{second}", "--target",
                               "site=lab", "--waves", "100%", "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        wait_state(hub, cluster_agent, second, "serving")
        wait_for(lambda: reported(hub, native.device_id, second, "serving"), timeout=120,
                 what="the native device serving the rollout's version")
        assert live_image(admin, namespace).endswith(digest_of(hub, second))
    finally:
        assert native.stop() == 0, native.log()


def test_the_pods_inference_metrics_and_drift_sketches_reach_the_hub(
        hub: HubProcess, agent_kubeconfig: Path, cluster_agent: KubeAgentProcess,
        admin: client.ApiClient, namespace: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kwok's pods run nothing: the agent reads the pod list from the API server and each
    pod's /metrics and drift counts from a real `edgefleet serve` (what the package image's
    pod runs), started with the env the Deployment gives its pods. The version has a
    baseline: the pod counts what it answers into its bins, and the hub sees x[0] shifted,
    x[1] not."""
    version = publish_version(hub, "tiny", make_onnx(tmp_path / "model.onnx"))
    sample = np.random.default_rng(5).normal(size=(1000, 3))
    np.save(tmp_path / "sample.npy", sample)
    subprocess.run([*EDGEFLEET, "model", "baseline", f"tiny:{version}",
                    str(tmp_path / "sample.npy")], check=True, capture_output=True,
                   env={**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
                        **({"EDGEFLEET_CA": str(hub.ca_path)} if hub.tls else {})})
    port = free_port()   # the pod's, once the Deployment says how to start it
    started = datetime.now(UTC)
    assert cluster_agent.stop() == 0, cluster_agent.log()
    agent = start_kube_agent(hub, agent_kubeconfig, namespace, cluster_agent.data_dir,
                             env={"EDGEFLEET_KUBE_METRICS_URL":
                                  f"http://127.0.0.1:{port}/metrics"})
    cluster_agent.process = agent.process   # the fixture stops this one
    deploy(hub, agent.device_id, f"tiny:{version}")
    wait_state(hub, agent, version, "serving")
    container = apps_v1(admin).read_namespaced_deployment(
        "ef-tiny", namespace).spec.template.spec.containers[0]
    env = {e.name: e.value for e in container.env if e.value is not None}
    assert env["EDGEFLEET_SERVE_LOAD"] == f"tiny:{version}" and "EDGEFLEET_SERVE_SKETCH" in env
    for name in ("EDGEFLEET_SERVE_LOAD", "EDGEFLEET_SERVE_SKETCH"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("EDGEFLEET_SERVING", str(image_root(tmp_path / "opt", make_onnx)))
    pod = start_serve(tmp_path / "pod", "--port", str(port),   # the last --port counts
                      auth=("--api-key", "k" * 32))   # the namespace's scoring key
    try:
        shifted = sample[:400] + [3.0, 0.0, 0.0]
        with pod.client("k" * 32) as scoring:
            for rows in np.split(shifted, 4):
                assert scoring.post("/v2/models/tiny/infer", json={"inputs": [
                    {"name": "x", "datatype": "FP32", "shape": list(rows.shape),
                     "data": rows.ravel().tolist()}]}).status_code == 200

        def inference(since: datetime = started) -> list[dict]:
            return [p["values"] for p in api(hub, f"/devices/{agent.device_id}/telemetry",
                                             params={"kind": "inference",
                                                     "since": since.isoformat()})
                    if p["values"].get("version") == version]

        counted = wait_for(lambda: sum(v.get("count", 0) for v in inference()) >= 4 and
                           [v for v in inference() if "count" in v], timeout=30,
                           what="the pod's requests in the hub's telemetry")
        point = counted[-1]
        # One point per deployment: the replicas and the pods' numbers together.
        assert point["deployment"] == "tiny" and point["ready_replicas"] == 1
        assert point["metrics_pods"] == 1 and point["metrics_failed"] == 0
        assert point["p50_ms"] > 0 and point["errors"] == 0

        def drift() -> dict[str, dict]:
            report = api(hub, f"/models/tiny/versions/{version}/drift")
            return {f["feature"]: f for f in report["features"]}

        found = wait_for(lambda: (d := drift())["x[0]"]["observed"] >= 400 and d, timeout=30,
                         what="the pod's sketches of 400 rows at the hub")
        assert found["x[0]"]["observed"] == found["x[1]"]["observed"] == 400   # once each
        assert found["x[0]"]["drifted"] and not found["x[1]"]["drifted"]
        # A pod that stops answering is counted and named, and the agent keeps going.
        since = datetime.now(UTC)
        pod.process.terminate()
        pod.process.wait(30)
        failed = wait_for(lambda: [v for v in inference(since) if v.get("metrics_failed") == 1],
                          timeout=30, what="the unreadable pod reported")
        assert "metrics_error" in failed[-1] and agent.process.poll() is None
    finally:
        if pod.process.poll() is None:
            pod.process.terminate()
            pod.process.wait(30)
