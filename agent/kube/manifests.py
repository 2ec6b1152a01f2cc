"""A deployment's release -> the Kubernetes objects that serve it (pure).

Per deployment the agent owns one Deployment and one Service, both named
`object_name(deployment)`, labelled as edgefleet's and as this agent's, and
annotated with model, version and package digest. The pod runs the
package's image from the hub's registry *by digest* (the tag could move),
with the scoring API key from a Secret, probes on the serving health
endpoints, node affinity to the package's platforms, and the version's drift
bins where it has a baseline (`EDGEFLEET_SERVE_SKETCH`: its pods count what
they answer into them).

The workload applied and the one before it ride along as JSON annotations of
the Deployment (not of its pod template, so they do not change the
template's hash): undoing a failed rollout re-applies exactly the previous
workload (image, resources, replicas, platforms), and the ReplicaSet still
running it takes over again without a new rollout of its own.

Every builder checks its own output (`check_workload_objects`) before it is
returned; a bad input is a ManifestError with one line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from contract.settings import Batching, SettingsError
from contract.sketch import SketchError, SketchSpec

# Who we are: server-side apply's field manager, and the managed-by label value.
MANAGER: Final = "edgefleet-agent"
# Labels (the selector uses LABEL_DEPLOYMENT only; the rest say what it is).
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_COMPONENT: Final = "app.kubernetes.io/name"
LABEL_AGENT: Final = "edgefleet.dev/agent"
LABEL_DEPLOYMENT: Final = "edgefleet.dev/deployment"
LABEL_MODEL: Final = "edgefleet.dev/model"
LABEL_VERSION: Final = "edgefleet.dev/version"
COMPONENT: Final = "edgefleet-serving"
# Annotations: the full deployment name (a label value holds at most 63
# characters), the package digest (71 characters), the release to undo to.
ANNOTATION_DEPLOYMENT: Final = "edgefleet.dev/deployment-name"
ANNOTATION_DIGEST: Final = "edgefleet.dev/package-digest"
ANNOTATION_WORKLOAD: Final = "edgefleet.dev/workload"             # Workload as JSON, lossless
ANNOTATION_PREVIOUS: Final = "edgefleet.dev/previous-workload"    # the one to undo to

CONTAINER: Final = "serving"
# As packager/build.py's image config: `edgefleet serve` on 8500, the control
# socket under /run/edgefleet, the key in EDGEFLEET_SERVE_API_KEY.
SERVING_PORT: Final = 8500
PORT_NAME: Final = "oip"
RUN_DIR: Final = "/run/edgefleet"
API_KEY_ENV: Final = "EDGEFLEET_SERVE_API_KEY"
LOAD_ENV: Final = "EDGEFLEET_SERVE_LOAD"   # as agent/serving/autoload.py reads it
BATCHING_ENV: Final = "EDGEFLEET_SERVE_BATCHING"   # `edgefleet serve --batching`
SKETCH_ENV: Final = "EDGEFLEET_SERVE_SKETCH"       # `edgefleet serve --sketch`
READY_PATH: Final = "/v2/health/ready"
LIVE_PATH: Final = "/v2/health/live"

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")           # RFC 1035: Service names
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_REGISTRY = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?")                   # host[:port]
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# CPU and memory as Kubernetes writes quantities: "500m", "2", "512Mi", "1G".
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_PREFIX = "ef-"


class ManifestError(ValueError):
    """A release or target that cannot become valid Kubernetes objects; one line."""


def _keys(value: object, expected: set[str], what: str) -> None:
    if not isinstance(value, dict) or set(value) != expected:
        raise ManifestError(f"{what} must be an object with exactly {', '.join(sorted(expected))}; "
                            f"got {value!r:.200}")


def object_name(deployment: str) -> str:
    """The Deployment's and Service's name for DEPLOYMENT: "ef-" + the name where it is a
    DNS label already, else its letters plus a hash of it, so two names never share one."""
    candidate = _PREFIX + deployment
    if _DNS_LABEL.fullmatch(candidate):
        return candidate
    cleaned = re.sub(r"[^a-z0-9-]+", "-", deployment.lower()).strip("-")[:50].rstrip("-")
    digest = hashlib.sha256(deployment.encode()).hexdigest()[:8]
    return f"{_PREFIX}{cleaned}-{digest}" if cleaned else f"{_PREFIX}{digest}"


@dataclass(frozen=True)
class Release:
    """One version of a deployment as the cluster runs it."""

    model: str
    version: int
    repository: str   # in the hub's registry, e.g. "models/diabetes"
    digest: str       # the package's image index, "sha256:..."

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version,
                "repository": self.repository, "digest": self.digest}

    @classmethod
    def from_json(cls, value: object) -> Release:
        _keys(value, {"model", "version", "repository", "digest"}, "release")
        assert isinstance(value, dict)
        release = cls(model=value["model"], version=value["version"],
                      repository=value["repository"], digest=value["digest"])
        _check_release(release)
        return release


@dataclass(frozen=True)
class Resources:
    """What each pod asks for: CPU and memory requests (memory is its limit too, so a
    pod that outgrows it is restarted rather than starving its node; CPU too when
    LIMIT_CPU: a deployment's --cpus is a limit in every mode), and extended resources
    such as {"nvidia.com/gpu": 1} (request = limit, as Kubernetes requires)."""

    cpu: str = "250m"
    memory: str = "512Mi"
    accelerators: Mapping[str, int] = field(default_factory=dict)
    limit_cpu: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {"cpu": self.cpu, "memory": self.memory,
               "accelerators": dict(sorted(self.accelerators.items()))}
        return {**out, "limit_cpu": True} if self.limit_cpu else out

    @classmethod
    def from_json(cls, value: object) -> Resources:
        keys = {"cpu", "memory", "accelerators"}
        # Workloads written before deployment settings have no limit_cpu.
        _keys(value, keys | ({"limit_cpu"} if isinstance(value, dict) and "limit_cpu" in value
                             else set()), "resources")
        assert isinstance(value, dict)
        if not isinstance(value["accelerators"], dict):
            raise ManifestError("resources.accelerators must be an object")
        if value.get("limit_cpu", True) is not True:
            raise ManifestError("resources.limit_cpu must be true when given")
        return cls(cpu=str(value["cpu"]), memory=str(value["memory"]),
                   accelerators=dict(value["accelerators"]), limit_cpu="limit_cpu" in value)


@dataclass(frozen=True)
class Target:
    """Where and how this agent deploys: the same for all its deployments."""

    namespace: str
    agent: str            # the agent's device id: its objects carry it as a label
    registry: str         # the hub's registry as the cluster's nodes reach it, host[:port]
    api_key_secret: str   # Secret with the scoring API key, in NAMESPACE
    api_key_field: str = "api-key"
    pull_secret: str | None = None   # a kubernetes.io/dockerconfigjson Secret for the registry


@dataclass(frozen=True)
class Workload:
    """One deployment of the desired state, as the cluster should run it."""

    name: str                            # the desired state's deployment name
    release: Release
    platforms: tuple[str, ...]           # the package's, e.g. ("linux/amd64", "linux/arm64")
    previous: Workload | None = None     # what an undo goes back to (its own previous unused)
    replicas: int = 1
    resources: Resources = Resources()
    progress_deadline_seconds: int = 300
    # The deployment's batching as `edgefleet serve --batching` reads it ("32:2", "off");
    # None: the package's default.
    batching: str | None = None
    # The version's drift bins (the desired state's, from its baseline); None: not sketched.
    sketch: SketchSpec | None = None

    @property
    def object_name(self) -> str:
        return object_name(self.name)

    def to_json(self) -> dict[str, Any]:
        """Everything but `previous`."""
        out = {"name": self.name, "release": self.release.to_json(),
               "platforms": list(self.platforms), "replicas": self.replicas,
               "resources": self.resources.to_json(),
               "progress_deadline_seconds": self.progress_deadline_seconds}
        if self.batching is not None:
            out["batching"] = self.batching
        if self.sketch is not None:
            out["sketch"] = self.sketch.to_json()
        return out

    @classmethod
    def from_json(cls, value: object) -> Workload:
        keys = {"name", "release", "platforms", "replicas", "resources",
                "progress_deadline_seconds"}
        # Workloads written before deployment settings (drift sketches) have no batching
        # (sketch); neither has one that does not use it.
        _keys(value, keys | ({"batching", "sketch"} & set(value) if isinstance(value, dict)
                             else set()), "workload")
        assert isinstance(value, dict)
        if not isinstance(value["platforms"], list) or not isinstance(value["name"], str):
            raise ManifestError("workload name must be a string and platforms a list")
        batching = value.get("batching")
        if batching is not None and not isinstance(batching, str):
            raise ManifestError("workload batching must be a string")
        try:
            sketch = None if value.get("sketch") is None else SketchSpec.from_json(value["sketch"])
        except SketchError as exc:
            raise ManifestError(f"workload sketch: {exc}") from None
        workload = cls(name=value["name"], release=Release.from_json(value["release"]),
                       platforms=tuple(str(p) for p in value["platforms"]),
                       replicas=value["replicas"],
                       resources=Resources.from_json(value["resources"]),
                       progress_deadline_seconds=value["progress_deadline_seconds"],
                       batching=batching, sketch=sketch)
        _check_workload(workload)
        return workload


def image_reference(target: Target, release: Release) -> str:
    return f"{target.registry}/{release.repository}@{release.digest}"


def owner_labels(target: Target) -> dict[str, str]:
    """The labels that mark an object as this agent's (also its list selector)."""
    return {LABEL_MANAGED_BY: MANAGER, LABEL_AGENT: target.agent}


def owner_selector(target: Target) -> str:
    return ",".join(f"{k}={v}" for k, v in owner_labels(target).items())


def _labels(target: Target, workload: Workload) -> dict[str, str]:
    return {
        **owner_labels(target),
        LABEL_COMPONENT: COMPONENT,
        LABEL_DEPLOYMENT: workload.object_name,
        LABEL_MODEL: workload.release.model[:63].rstrip("._-"),
        LABEL_VERSION: str(workload.release.version),
    }


def _workload_json(workload: Workload) -> str:
    return json.dumps(workload.to_json(), sort_keys=True, separators=(",", ":"))


def _annotations(workload: Workload) -> dict[str, str]:
    return {
        ANNOTATION_DEPLOYMENT: workload.name,
        ANNOTATION_WORKLOAD: _workload_json(workload),
        ANNOTATION_DIGEST: workload.release.digest,
    }


def _architectures(platforms: tuple[str, ...]) -> list[str]:
    # "linux/arm/v7" -> "arm": kubernetes.io/arch has no variant.
    archs = []
    for platform in platforms:
        parts = platform.split("/")
        if len(parts) not in (2, 3) or parts[0] != "linux" or not parts[1]:
            raise ManifestError(f"platform {platform!r} is not linux/ARCH[/VARIANT]")
        if parts[1] not in archs:
            archs.append(parts[1])
    return archs


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": 2, "failureThreshold": failures}


def _container(target: Target, workload: Workload) -> dict[str, Any]:
    res = workload.resources
    extended = {name: str(count) for name, count in sorted(res.accelerators.items())}
    return {
        "name": CONTAINER,
        "image": image_reference(target, workload.release),
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": PORT_NAME, "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "env": [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
                     "name": target.api_key_secret, "key": target.api_key_field}}},
                # The pod loads and self-tests the image's own package before it is
                # ready: no agent drives it (agent/serving/autoload.py).
                {"name": LOAD_ENV, "value": f"{workload.name}:{workload.release.version}"},
                *([] if workload.batching is None else
                  [{"name": BATCHING_ENV, "value": workload.batching}]),
                # The pods count what they answer into the version's drift bins.
                *([] if workload.sketch is None else
                  [{"name": SKETCH_ENV, "value": json.dumps(workload.sketch.to_json(),
                                                            separators=(",", ":"))}])],
        "resources": {
            "requests": {"cpu": res.cpu, "memory": res.memory, **extended},
            "limits": {**({"cpu": res.cpu} if res.limit_cpu else {}), "memory": res.memory,
                       **extended},
        },
        # A model can take long to load: the startup probe gives it up to 5
        # minutes before liveness counts; readiness holds traffic back until then.
        "startupProbe": _probe(LIVE_PATH, period=5, failures=60),
        "livenessProbe": _probe(LIVE_PATH, period=10, failures=3),
        "readinessProbe": _probe(READY_PATH, period=5, failures=2),
        "volumeMounts": [{"name": "run", "mountPath": RUN_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def deployment_manifest(target: Target, workload: Workload) -> dict[str, Any]:
    """The apps/v1 Deployment for WORKLOAD, checked."""
    _check_inputs(target, workload)
    labels = _labels(target, workload)
    annotations = _annotations(workload)
    if workload.previous is not None:
        annotations[ANNOTATION_PREVIOUS] = _workload_json(workload.previous)
    pod: dict[str, Any] = {
        "containers": [_container(target, workload)],
        "volumes": [{"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
        "automountServiceAccountToken": False,   # the scoring server never calls the API
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                {"key": "kubernetes.io/arch", "operator": "In",
                 "values": _architectures(workload.platforms)},
            ]}]}}},
    }
    if target.pull_secret is not None:
        pod["imagePullSecrets"] = [{"name": target.pull_secret}]
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": workload.object_name, "namespace": target.namespace,
                     "labels": labels, "annotations": annotations},
        "spec": {
            "replicas": workload.replicas,
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": workload.progress_deadline_seconds,
            "selector": {"matchLabels": {LABEL_DEPLOYMENT: workload.object_name}},
            # Old pods serve until new ones are ready: a failed rollout costs no capacity.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels, "annotations": _annotations(workload)},
                         "spec": pod},
        },
    }
    check_workload_objects(manifest, target)
    return manifest


def service_manifest(target: Target, workload: Workload) -> dict[str, Any]:
    """The ClusterIP Service in front of WORKLOAD's pods, checked."""
    _check_inputs(target, workload)
    labels = _labels(target, workload)
    # The Service outlives versions: no version label, so an update does not touch it.
    del labels[LABEL_VERSION]
    manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": workload.object_name, "namespace": target.namespace,
                     "labels": labels,
                     "annotations": {ANNOTATION_DEPLOYMENT: workload.name}},
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_DEPLOYMENT: workload.object_name},
            "ports": [{"name": PORT_NAME, "port": SERVING_PORT, "targetPort": PORT_NAME,
                       "protocol": "TCP"}],
        },
    }
    check_workload_objects(manifest, target)
    return manifest


def _read_workload(annotations: Mapping[str, str], key: str) -> Workload:
    try:
        document = json.loads(annotations[key])
    except ValueError:
        raise ManifestError(f"annotation {key} is not JSON") from None
    return Workload.from_json(document)


def pull_secret_manifest(target: Target, username: str, password: str) -> dict[str, Any]:
    """The kubernetes.io/dockerconfigjson Secret TARGET.pull_secret that lets the nodes
    pull from the hub's registry with the agent's own credentials, checked."""
    if target.pull_secret is None:
        raise ManifestError("the target names no pull secret")
    if not username or ":" in username or not password:
        raise ManifestError("registry credentials need a user name without ':' and a password")
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    config = {"auths": {target.registry: {"username": username, "password": password,
                                          "auth": auth}}}
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": target.pull_secret, "namespace": target.namespace,
                     "labels": owner_labels(target)},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(
            json.dumps(config, sort_keys=True).encode()).decode()},
    }
    check_workload_objects(manifest, target)
    return manifest


def workloads_of(deployment: Mapping[str, Any]) -> tuple[Workload, Workload | None]:
    """The current and previous workload written on a live Deployment of ours."""
    meta = deployment.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if ANNOTATION_WORKLOAD not in annotations:
        raise ManifestError(f"deployment {meta.get('name')!r} has no {ANNOTATION_WORKLOAD} "
                            "annotation: not made by edgefleet")
    current = _read_workload(annotations, ANNOTATION_WORKLOAD)
    if ANNOTATION_PREVIOUS not in annotations:
        return current, None
    return current, _read_workload(annotations, ANNOTATION_PREVIOUS)


# --- checks -----------------------------------------------------------------

def _check_release(release: Release) -> None:
    if not isinstance(release.version, int) or isinstance(release.version, bool) \
            or release.version < 1:
        raise ManifestError(f"version {release.version!r} is not a positive integer")
    if not isinstance(release.digest, str) or not _DIGEST.fullmatch(release.digest):
        raise ManifestError(f"package digest {release.digest!r} is not sha256:<64 hex>")
    if not isinstance(release.repository, str) or not re.fullmatch(
            r"[a-z0-9]+([._/-][a-z0-9]+)*", release.repository):
        raise ManifestError(f"repository {release.repository!r} is not a registry path")
    if not isinstance(release.model, str) or not release.model:
        raise ManifestError("model name is empty")


def _check_quantity(what: str, value: str) -> None:
    if not _QUANTITY.fullmatch(value) or Decimal(re.sub(r"[A-Za-z]+$", "", value)) <= 0:
        raise ManifestError(f"{what} {value!r} is not a positive Kubernetes quantity "
                            "(e.g. 500m, 2, 512Mi)")


def _check_inputs(target: Target, workload: Workload) -> None:
    if not _DNS_LABEL.fullmatch(target.namespace):
        raise ManifestError(f"namespace {target.namespace!r} is not a DNS label")
    if not _LABEL_VALUE.fullmatch(target.agent) or not target.agent:
        raise ManifestError(f"agent id {target.agent!r} cannot be a label value")
    if not _REGISTRY.fullmatch(target.registry):
        raise ManifestError(f"registry {target.registry!r} is not host[:port]")
    for secret in (target.api_key_secret, target.pull_secret):
        if secret is not None and not _DNS_SUBDOMAIN.fullmatch(secret):
            raise ManifestError(f"secret name {secret!r} is not a DNS subdomain")
    _check_workload(workload)
    if workload.previous is not None:
        if workload.previous.name != workload.name:
            raise ManifestError(f"the previous workload is of {workload.previous.name!r}, "
                                f"not {workload.name!r}")
        _check_workload(workload.previous)


def _check_workload(workload: Workload) -> None:
    _check_release(workload.release)
    for what, number in (("replicas", workload.replicas),
                         ("progress deadline", workload.progress_deadline_seconds)):
        if not isinstance(number, int) or isinstance(number, bool):
            raise ManifestError(f"{what} {number!r} is not an integer")
    if not workload.platforms:
        raise ManifestError(f"deployment {workload.name!r}: the package names no platform")
    _architectures(workload.platforms)
    if not 0 <= workload.replicas <= 1000:
        raise ManifestError(f"replicas {workload.replicas} is not within 0..1000")
    if not 10 <= workload.progress_deadline_seconds <= 86400:
        raise ManifestError(f"progress deadline {workload.progress_deadline_seconds} s is not "
                            "within 10..86400")
    if workload.batching is not None:
        try:
            Batching.parse(workload.batching)
        except SettingsError as exc:
            raise ManifestError(str(exc)) from None
    _check_quantity("cpu", workload.resources.cpu)
    _check_quantity("memory", workload.resources.memory)
    for name, count in workload.resources.accelerators.items():
        if "/" not in name or not _DNS_SUBDOMAIN.fullmatch(name.split("/", 1)[0]):
            raise ManifestError(f"accelerator {name!r} is not an extended resource "
                                "(e.g. nvidia.com/gpu)")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 64:
            raise ManifestError(f"accelerator {name}: count {count!r} is not within 1..64")


def check_workload_objects(manifest: Mapping[str, Any], target: Target) -> None:
    """What every object the agent applies must be: ours by label, in our namespace,
    named as a DNS label, label values valid; a Deployment's selector selects its own
    pods and its image is pinned by digest. Raises ManifestError."""
    meta = manifest["metadata"]
    kind = manifest["kind"]
    if not _DNS_LABEL.fullmatch(meta["name"]):
        raise ManifestError(f"{kind} name {meta['name']!r} is not a DNS label")
    if meta["namespace"] != target.namespace:
        raise ManifestError(f"{kind} {meta['name']} is not in namespace {target.namespace}")
    for key, value in owner_labels(target).items():
        if meta["labels"].get(key) != value:
            raise ManifestError(f"{kind} {meta['name']} lacks label {key}={value}")
    for key, value in meta["labels"].items():
        if not _LABEL_VALUE.fullmatch(value):
            raise ManifestError(f"{kind} {meta['name']}: label {key}={value!r} is not valid")
    if kind == "Deployment":
        template = manifest["spec"]["template"]
        selector = manifest["spec"]["selector"]["matchLabels"]
        if any(template["metadata"]["labels"].get(k) != v for k, v in selector.items()):
            raise ManifestError(f"Deployment {meta['name']}: selector does not match its pods")
        for container in template["spec"]["containers"]:
            if not re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", container["image"]):
                raise ManifestError(f"Deployment {meta['name']}: image {container['image']!r} "
                                    "is not pinned by digest")
