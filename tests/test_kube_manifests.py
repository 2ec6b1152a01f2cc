"""Kubernetes mode's pure builders: release -> Deployment + Service, and back."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from agent.kube.driver import batching_refused, pod_resources
from agent.kube.manifests import (
    ANNOTATION_DIGEST,
    ANNOTATION_PREVIOUS,
    LABEL_DEPLOYMENT,
    ManifestError,
    Release,
    Resources,
    Target,
    Workload,
    check_workload_objects,
    deployment_manifest,
    object_name,
    pull_secret_manifest,
    service_manifest,
    workloads_of,
)
from contract.settings import GPU, Batching, Settings
from contract.settings import Resources as DeploymentResources
from contract.sketch import Feature, SketchSpec

DIGEST_1 = "sha256:" + "1" * 64
DIGEST_2 = "sha256:" + "2" * 64
TARGET = Target(namespace="edge", agent="cluster-a", registry="hub.example:5000",
                api_key_secret="scoring-key", pull_secret="hub-pull")
RELEASE_1 = Release("diabetes", 1, "models/diabetes", DIGEST_1)
RELEASE_2 = Release("diabetes", 2, "models/diabetes", DIGEST_2)


PREVIOUS = Workload("diabetes", RELEASE_1, ("linux/amd64",), replicas=3,
                    resources=Resources(cpu="1", memory="2Gi"))


def workload(**changes: object) -> Workload:
    base: dict[str, object] = {"name": "diabetes", "release": RELEASE_2,
                               "platforms": ("linux/amd64", "linux/arm/v7"),
                               "previous": PREVIOUS}
    return Workload(**{**base, **changes})  # type: ignore[arg-type]


def test_deployment_runs_the_package_by_digest_with_key_probes_and_affinity() -> None:
    d = deployment_manifest(TARGET, workload(
        replicas=2, resources=Resources(cpu="500m", memory="1Gi",
                                        accelerators={"nvidia.com/gpu": 1})))
    assert d["metadata"]["name"] == "ef-diabetes" and d["metadata"]["namespace"] == "edge"
    assert d["metadata"]["annotations"][ANNOTATION_DIGEST] == DIGEST_2
    assert json.loads(d["metadata"]["annotations"][ANNOTATION_PREVIOUS])["release"]["digest"] \
        == DIGEST_1
    spec = d["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = spec["template"]["spec"]
    # The previous release is not in the template: going back reuses the old ReplicaSet.
    assert ANNOTATION_PREVIOUS not in spec["template"]["metadata"]["annotations"]
    (container,) = pod["containers"]
    assert container["image"] == f"hub.example:5000/models/diabetes@{DIGEST_2}"
    assert pod["imagePullSecrets"] == [{"name": "hub-pull"}]
    assert container["env"] == [
        {"name": "EDGEFLEET_SERVE_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": "scoring-key", "key": "api-key"}}},
        {"name": "EDGEFLEET_SERVE_LOAD", "value": f"diabetes:{RELEASE_2.version}"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "1Gi", "nvidia.com/gpu": "1"},
    }
    (term,) = pod["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm"]} \
        in term["matchExpressions"]
    assert spec["selector"]["matchLabels"] == {LABEL_DEPLOYMENT: "ef-diabetes"}


def test_service_selects_the_deployments_pods_and_has_no_version() -> None:
    w = workload()
    s = service_manifest(TARGET, w)
    d = deployment_manifest(TARGET, w)
    assert s["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert "edgefleet.dev/version" not in s["metadata"]["labels"]
    assert s["spec"]["ports"][0]["port"] == 8500


def test_object_names_are_dns_labels_and_never_shared() -> None:
    assert object_name("diabetes") == "ef-diabetes"
    names = {object_name(n) for n in ("a.b", "a-b", "a_b", "x" * 64, "x" * 63 + "y")}
    assert len(names) == 5
    for n in names:
        assert len(n) <= 63 and n[0].isalpha()


def test_workloads_read_back_from_the_live_object() -> None:
    w = workload(resources=Resources(accelerators={"nvidia.com/gpu": 2}))
    current, previous = workloads_of(deployment_manifest(TARGET, w))
    assert current == Workload(w.name, w.release, w.platforms, resources=w.resources)
    assert previous == PREVIOUS
    first = deployment_manifest(TARGET, workload(previous=None))
    assert workloads_of(first)[1] is None
    with pytest.raises(ManifestError, match="previous workload is of 'other'"):
        deployment_manifest(
            TARGET, workload(previous=Workload("other", RELEASE_1, ("linux/amd64",)))
        )


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda p: p["release"].update(digest="sha256:nothex"), "not sha256"),
    (lambda p: p.update(replicas="3"), "not an integer"),
    (lambda p: p.update(platforms=["plan9/amd64"]), "not linux/ARCH"),
    (lambda p: p.update(extra=1), "exactly"),
    (lambda p: p["resources"].update(accelerators=[]), "must be an object"),
])
def test_a_tampered_previous_annotation_is_refused(tamper: Any, message: str) -> None:
    d = deployment_manifest(TARGET, workload())
    previous = json.loads(d["metadata"]["annotations"][ANNOTATION_PREVIOUS])
    tamper(previous)
    d["metadata"]["annotations"][ANNOTATION_PREVIOUS] = json.dumps(previous)
    with pytest.raises(ManifestError, match=message):
        workloads_of(d)


def test_an_annotation_that_is_not_json_is_refused() -> None:
    d = deployment_manifest(TARGET, workload())
    d["metadata"]["annotations"][ANNOTATION_PREVIOUS] = "{"
    with pytest.raises(ManifestError, match="not JSON"):
        workloads_of(d)


@pytest.mark.parametrize(("change", "message"), [
    ({"release": Release("m", 1, "models/m", "sha256:abc")}, "not sha256"),
    ({"release": Release("m", 0, "models/m", DIGEST_1)}, "not a positive integer"),
    ({"release": Release("m", 1, "Models/../x", DIGEST_1)}, "not a registry path"),
    ({"platforms": ()}, "names no platform"),
    ({"platforms": ("windows/amd64",)}, "not linux/ARCH"),
    ({"replicas": -1}, "not within 0..1000"),
    ({"progress_deadline_seconds": 1}, "progress deadline"),
    ({"resources": Resources(cpu="lots")}, "cpu 'lots' is not"),
    ({"resources": Resources(memory="0")}, "memory '0' is not"),
    ({"resources": Resources(accelerators={"gpu": 1})}, "not an extended resource"),
    ({"resources": Resources(accelerators={"nvidia.com/gpu": 0})}, "not within 1..64"),
])
def test_bad_workloads_are_one_line_errors(change: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        deployment_manifest(TARGET, workload(**change))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("target", "message"), [
    (Target("Edge", "a", "hub:5000", "key"), "namespace"),
    (Target("edge", "a b", "hub:5000", "key"), "agent id"),
    (Target("edge", "a", "hub/evil path", "key"), "registry"),
    (Target("edge", "a", "hub:5000", "Key_1"), "secret name"),
])
def test_bad_targets_are_refused(target: Target, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        service_manifest(target, workload())


def test_the_self_check_catches_what_a_builder_must_never_produce() -> None:
    d = deployment_manifest(TARGET, workload())
    d["spec"]["template"]["spec"]["containers"][0]["image"] = "hub.example:5000/models/x:latest"
    with pytest.raises(ManifestError, match="not pinned by digest"):
        check_workload_objects(d, TARGET)
    d = deployment_manifest(TARGET, workload())
    d["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "someone"
    with pytest.raises(ManifestError, match="lacks label"):
        check_workload_objects(d, TARGET)
    d = deployment_manifest(TARGET, workload())
    d["spec"]["selector"]["matchLabels"][LABEL_DEPLOYMENT] = "other"
    with pytest.raises(ManifestError, match="selector"):
        check_workload_objects(d, TARGET)


def test_pull_secret_holds_the_agents_registry_login() -> None:
    import base64

    secret = pull_secret_manifest(TARGET, "device-1", "s3cret")
    assert secret["metadata"]["name"] == "hub-pull"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    login = config["auths"]["hub.example:5000"]
    assert base64.b64decode(login["auth"]) == b"device-1:s3cret"
    with pytest.raises(ManifestError, match="user name"):
        pull_secret_manifest(TARGET, "a:b", "pw")
    with pytest.raises(ManifestError, match="no pull secret"):
        pull_secret_manifest(Target("edge", "a", "hub", "key"), "u", "p")


def test_a_deployments_settings_in_the_pod_and_its_annotation() -> None:
    settings = Settings(DeploymentResources(500, 3 * 2**30, ((GPU, 1), ("x.io/npu", 0))),
                        Batching(32, 2))
    resources = pod_resources(settings.resources, Resources("250m", "512Mi"))
    assert resources == Resources("500m", "3Gi", {GPU: 1}, limit_cpu=True)  # 0: none
    given = workload(resources=resources, batching=str(settings.batching))
    container = deployment_manifest(TARGET, given)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "3Gi", GPU: "1"},
        "limits": {"cpu": "500m", "memory": "3Gi", GPU: "1"}}
    assert {"name": "EDGEFLEET_SERVE_BATCHING", "value": "32:2"} in container["env"]
    live = deployment_manifest(TARGET, given)
    assert workloads_of(live)[0] == replace(given, previous=None)
    # The agent's defaults: CPU a request only, no batching env (the package's default).
    plain = deployment_manifest(TARGET, workload())["spec"]["template"]["spec"]["containers"][0]
    assert "cpu" not in plain["resources"]["limits"]
    assert not any(e["name"] == "EDGEFLEET_SERVE_BATCHING" for e in plain["env"])
    assert pod_resources(DeploymentResources(), Resources("250m", "512Mi")) == Resources(
        "250m", "512Mi")


def test_a_versions_drift_bins_reach_its_pods_and_its_annotation() -> None:
    spec = SketchSpec((Feature("input", "x", 0, (-1.0, 0.0, 1.5)),
                       Feature("output", "y", 1, (0.25,))))
    given = workload(sketch=spec)
    live = deployment_manifest(TARGET, given)
    env = {e["name"]: e.get("value") for e in
           live["spec"]["template"]["spec"]["containers"][0]["env"]}
    # What `edgefleet serve --sketch` reads: the desired state's spec, as JSON.
    assert SketchSpec.from_json(json.loads(env["EDGEFLEET_SERVE_SKETCH"])) == spec
    assert workloads_of(live)[0] == replace(given, previous=None)
    plain = deployment_manifest(TARGET, workload())["spec"]["template"]["spec"]["containers"][0]
    assert "EDGEFLEET_SERVE_SKETCH" not in {e["name"] for e in plain["env"]}
    assert "sketch" not in workload().to_json()
    with pytest.raises(ManifestError, match="workload sketch: sketch feature 0"):
        Workload.from_json({**given.to_json(), "sketch": [{"side": "input"}]})


def test_workloads_written_before_settings_still_read() -> None:
    old = {"name": "diabetes", "release": RELEASE_1.to_json(), "platforms": ["linux/amd64"],
           "replicas": 1, "progress_deadline_seconds": 300,
           "resources": {"cpu": "250m", "memory": "512Mi", "accelerators": {}}}
    read = Workload.from_json(old)
    assert read.batching is None and not read.resources.limit_cpu
    assert read.to_json() == old
    with pytest.raises(ManifestError, match="batching 'lots'"):
        Workload.from_json({**old, "batching": "lots"})
    with pytest.raises(ManifestError, match="limit_cpu must be true"):
        Workload.from_json({**old, "resources": {**old["resources"], "limit_cpu": False}})


def test_batching_a_model_that_cannot_is_refused_before_any_apply() -> None:
    fixed = {"signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3]}],
                           "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2]}]}}
    free = {"signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                          "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}}
    assert batching_refused(Batching(8), fixed) == (
        "batching was asked for, but the model cannot batch: input 'x' has shape [1, 3], not "
        "a free first (batch) dimension")
    assert batching_refused(Batching(8), free) is None
    assert batching_refused(Batching.OFF, fixed) is None
    assert batching_refused(None, fixed) is None
    assert "names no model signature" in (batching_refused(Batching(8), {"signature": None})
                                          or "")
