"""The agent's objects in its namespace: apply, read, follow, undo, prune.

Everything goes through server-side apply with field manager `edgefleet-agent`
and force: fields someone changed by hand (a `kubectl scale`, an edited image)
come back to the desired state, and that difference is reported as drift. An
object of the same name that is not the agent's (no `managed-by` and agent
labels of ours) is never touched: the deployment is refused instead.

Objects are plain dicts as the API serves them (`_preload_content=False`), so
`manifests` and `rollout` stay pure.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from agent.kube.manifests import (
    ANNOTATION_DEPLOYMENT,
    ANNOTATION_DIGEST,
    CONTAINER,
    LABEL_DEPLOYMENT,
    MANAGER,
    SERVING_PORT,
    Target,
    Workload,
    deployment_manifest,
    owner_labels,
    owner_selector,
    pull_secret_manifest,
    service_manifest,
    workloads_of,
)
from agent.kube.rollout import RolloutStatus, describe_events, rollout_status
from agent.kube.scrape import PodAddress

APPLY_PATCH: Final = "application/apply-patch+yaml"
_T = TypeVar("_T")


class KubeError(Exception):
    """A call to the API server that failed; str() is one line with the server's message.
    `status` is the HTTP status (None: the server was not reached)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Worth the same call again later: the server was down, busy or failing."""
        return self.status is None or self.status == 429 or self.status >= 500


class NotOurs(KubeError):
    """An object of the name the agent needs exists and belongs to someone else."""


def _status_message(e: ApiException) -> str:
    try:
        body = json.loads(e.body) if e.body else {}
    except ValueError:
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return " ".join(str(message or e.reason or "no message").split())[:500]


def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """FN(*ARGS, **KWARGS) with failures as one KubeError line naming WHAT was attempted."""
    try:
        return fn(*args, **kwargs)
    except ApiException as e:
        raise KubeError(f"{what}: {e.status} {_status_message(e)}", e.status) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise KubeError(f"{what}: API server not reached ({e.__class__.__name__}: "
                        f"{str(e)[:200]})") from None


def call_json(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """call() of an API method, with the server's JSON document as the result."""
    return json.loads(call(what, fn, *args, _preload_content=False, **kwargs).data)


@dataclass(frozen=True)
class Applied:
    deployment: dict[str, Any]       # as the server returned it after apply
    drift: tuple[str, ...]           # what had changed by hand, now brought back


class Namespace:
    """The agent's objects in TARGET's namespace, through API_CLIENT."""

    def __init__(self, api_client: client.ApiClient, target: Target) -> None:
        self.target = target
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    # --- reading ---------------------------------------------------------

    def _read(self, kind: str, name: str) -> dict[str, Any] | None:
        read = {"Deployment": self._apps.read_namespaced_deployment,
                "Service": self._core.read_namespaced_service,
                "Secret": self._core.read_namespaced_secret}[kind]
        try:
            found: dict[str, Any] = call_json(f"read {kind} {self.target.namespace}/{name}",
                                              read, name, self.target.namespace)
            return found
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def _is_ours(self, obj: Mapping[str, Any]) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in owner_labels(self.target).items())

    def deployment(self, name: str) -> dict[str, Any] | None:
        """The live Deployment named NAME (an object name), if it is there and ours."""
        live = self._read("Deployment", name)
        return live if live is not None and self._is_ours(live) else None

    def deployments(self) -> list[dict[str, Any]]:
        """Every Deployment of this agent in the namespace."""
        listed = call_json(f"list Deployments in {self.target.namespace}",
                            self._apps.list_namespaced_deployment, self.target.namespace,
                            label_selector=owner_selector(self.target))
        items: list[dict[str, Any]] = listed["items"]
        return items

    # --- applying --------------------------------------------------------

    def _apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        patch = {"Deployment": self._apps.patch_namespaced_deployment,
                 "Service": self._core.patch_namespaced_service,
                 "Secret": self._core.patch_namespaced_secret}[kind]
        applied: dict[str, Any] = call_json(
            f"apply {kind} {self.target.namespace}/{name}", patch, name, self.target.namespace,
            manifest, field_manager=MANAGER, force=True, field_validation="Strict",
            _content_type=APPLY_PATCH)
        return applied

    def _claim(self, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        live = self._read(kind, name)
        if live is not None and not self._is_ours(live):
            raise NotOurs(f"{kind} {self.target.namespace}/{name} exists and is not this "
                          f"agent's ({owner_selector(self.target)}): rename the deployment "
                          "or remove that object", 409)
        return live

    def deploy(self, workload: Workload) -> Applied:
        """Apply WORKLOAD's Deployment and Service. Raises NotOurs before touching
        anything if either name is taken; a KubeError after the Deployment was
        applied says so, since the Service is then missing."""
        deployment = deployment_manifest(self.target, workload)
        service = service_manifest(self.target, workload)
        live = self._claim(deployment)
        self._claim(service)
        drift = _drift(live, deployment) if live is not None else ()
        applied = self._apply(deployment)
        try:
            self._apply(service)
        except KubeError as e:
            raise KubeError(f"Deployment {workload.object_name} applied but its Service "
                            f"not: {e}", e.status) from None
        return Applied(applied, drift)

    def set_pull_secret(self, username: str, password: str) -> None:
        """Create or update the image pull secret the target names (only ever that one)."""
        manifest = pull_secret_manifest(self.target, username, password)
        self._claim(manifest)
        self._apply(manifest)

    def undo(self, name: str) -> Workload:
        """Back to the workload before the current one of Deployment NAME (an object
        name), as written on it, so this works after a restart too. Returns the
        workload now applied; KubeError if there is nothing to go back to."""
        live = self.deployment(name)
        if live is None:
            raise KubeError(f"undo {self.target.namespace}/{name}: no such Deployment of ours",
                            404)
        _, previous = workloads_of(live)
        if previous is None:
            raise KubeError(f"undo {self.target.namespace}/{name}: no previous workload "
                            "recorded", 409)
        self.deploy(previous)
        return previous

    def remove(self, name: str) -> None:
        """Delete this agent's Deployment and Service named NAME (an object name), if there;
        objects of that name that are not ours are left alone."""
        ns = self.target.namespace
        for kind, delete in (("Deployment", self._apps.delete_namespaced_deployment),
                             ("Service", self._core.delete_namespaced_service)):
            live = self._read(kind, name)
            if live is None or not self._is_ours(live):
                continue
            try:
                call_json(f"delete {kind} {ns}/{name}", delete, name, ns)
            except KubeError as e:
                if e.status != 404:   # gone already: what we wanted
                    raise

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete this agent's Deployments and Services whose object name is not in KEEP;
        returns the deployment names (as the desired state had them) removed."""
        keep = set(keep)
        services = call_json(f"list Services in {self.target.namespace}",
                             self._core.list_namespaced_service, self.target.namespace,
                             label_selector=owner_selector(self.target))["items"]
        removed = []
        names = {d["metadata"]["name"]: (d["metadata"].get("annotations") or {})
                 .get(ANNOTATION_DEPLOYMENT, d["metadata"]["name"]) for d in self.deployments()}
        for name in sorted(set(names) | {s["metadata"]["name"] for s in services}):
            if name in keep:
                continue
            self.remove(name)
            if name in names:
                removed.append(names[name])
        return removed

    # --- following -------------------------------------------------------

    def rollout(self, name: str) -> RolloutStatus:
        """One look at Deployment NAME's rollout."""
        live = self.deployment(name)
        if live is None:
            raise KubeError(f"rollout of {self.target.namespace}/{name}: no such Deployment "
                            "of ours", 404)
        selector = ",".join(f"{k}={v}" for k, v in
                            live["spec"]["selector"]["matchLabels"].items())
        ns = self.target.namespace
        replica_sets = call_json(f"list ReplicaSets in {ns}",
                                 self._apps.list_namespaced_replica_set, ns,
                                 label_selector=selector)["items"]
        pods = call_json(f"list Pods in {ns}", self._core.list_namespaced_pod, ns,
                         label_selector=selector)["items"]
        return rollout_status(live, replica_sets, pods)

    def follow(self, name: str, *, timeout: float, poll: float = 1.0,
               on_status: Callable[[RolloutStatus], None] | None = None,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> RolloutStatus:
        """Look at NAME's rollout every POLL seconds until it is done (complete or
        failed) or TIMEOUT passed; returns the last look. ON_STATUS sees every look
        (ready/desired replicas and restarts, for telemetry)."""
        deadline = clock() + timeout
        while True:
            status = self.rollout(name)
            if on_status is not None:
                on_status(status)
            if status.done or clock() >= deadline:
                return status
            sleep(poll)

    # --- metrics -----------------------------------------------------------

    def metrics_addresses(self, name: str) -> list[PodAddress]:
        """Where the running pods of Deployment NAME (an object name) serve /metrics: the
        pod IPs, so the agent reaches them from inside the cluster network."""
        ns = self.target.namespace
        selector = f"{owner_selector(self.target)},{LABEL_DEPLOYMENT}={name}"
        pods = call_json(f"list Pods in {ns}", self._core.list_namespaced_pod, ns,
                         label_selector=selector)["items"]
        found = []
        for pod in pods:
            status = pod.get("status") or {}
            try:
                ip = ipaddress.ip_address(status.get("podIP") or "")
            except ValueError:
                continue   # not scheduled or not started yet
            if status.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
                host = f"[{ip}]" if ip.version == 6 else str(ip)
                found.append(PodAddress(pod["metadata"]["name"],
                                        f"http://{host}:{SERVING_PORT}/metrics"))
        return found

    def api_key(self) -> str:
        """The scoring API key in the target's Secret: the pods' /metrics want it."""
        name, field = self.target.api_key_secret, self.target.api_key_field
        secret = self._read("Secret", name)
        value = ((secret or {}).get("data") or {}).get(field)
        if value is None:
            raise KubeError(f"Secret {self.target.namespace}/{name} has no {field}", 404)
        try:
            return base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise KubeError(f"{field} of Secret {self.target.namespace}/{name} is not "
                            "base64 of text", 422) from None

    def events(self, pod_names: Iterable[str], limit: int = 5) -> list[str]:
        """The last warning events of these pods, one line each: why they fail."""
        ns = self.target.namespace
        found: list[dict[str, Any]] = []
        for pod in pod_names:
            found += call_json(f"list events of pod {ns}/{pod}",
                               self._core.list_namespaced_event, ns,
                               field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}"
                               )["items"]
        return describe_events(found, limit)


def _drift(live: Mapping[str, Any], desired: Mapping[str, Any]) -> tuple[str, ...]:
    """What differs in LIVE from what the agent applied last time, if the live object is
    of the same release as DESIRED (a new release changing things is no drift)."""
    live_meta, want_meta = live["metadata"], desired["metadata"]
    if (live_meta.get("annotations") or {}).get(ANNOTATION_DIGEST) \
            != want_meta["annotations"][ANNOTATION_DIGEST]:
        return ()
    found = []
    name = want_meta["name"]
    if live["spec"].get("replicas") != desired["spec"]["replicas"]:
        found.append(f"Deployment {name}: replicas {live['spec'].get('replicas')}, "
                     f"desired {desired['spec']['replicas']}")
    live_images = {c["name"]: c.get("image") for c in
                   live["spec"]["template"]["spec"].get("containers", [])}
    want_image = desired["spec"]["template"]["spec"]["containers"][0]["image"]
    if live_images.get(CONTAINER) != want_image:
        found.append(f"Deployment {name}: image {live_images.get(CONTAINER)}, "
                     f"desired {want_image}")
    return tuple(found)
