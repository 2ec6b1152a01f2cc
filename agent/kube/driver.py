"""The update state machine's steps on a cluster (agent/updates.py's UpdateDriver).

    state          step on the cluster
    -------------  ---------------------------------------------------------------
    downloading    nothing: the cluster's nodes pull the image, by digest
    verifying      signature, index, every platform's manifest, config and serving
                   layer checked in the hub's registry (agent/kube/package.py);
                   serving.json and the workload kept under DATA/versions
    starting       the Deployment (and Service) applied with the workload serving
                   now recorded as the one to undo to; its rollout followed until
                   complete, failed (deadline, crash loop, image or config errors)
                   or no verdict in time
    self_test      each new pod ran the package's sample request before it turned
                   ready (its readiness probe; see agent/serving/autoload.py): the
                   agent checks the cluster runs this digest with every new
                   replica ready, so the self-test passed where traffic goes
    serving        (the Deployment's rollout already moved the traffic)
    rolling_back   the Deployment undone to the workload it recorded, or removed
                   if it was the first; nothing if it does not run this digest

Every step reads the live objects, so a restarted agent resumes any of them.
An API server that is down, busy or failing is retried with backoff inside
the step; what it refuses (RBAC, quota, admission) fails the step with its
message, as does an object of our name that is not ours.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.kube.apply import KubeError, Namespace
from agent.kube.manifests import Release, Resources, Workload, object_name, workloads_of
from agent.kube.package import PackageCheckError, check_package
from agent.kube.rollout import Phase, RolloutStatus
from agent.kube.update import begin, verdict_timeout, why_failed
from agent.state import Installed, Serving, Update
from agent.updates import StepFailed, package_batching
from contract.protocol import UpdateState
from contract.settings import Batching, Settings, effective_batching, format_memory, unbatchable
from contract.settings import Resources as DeploymentResources
from contract.sketch import SketchSpec
from contract.tensors import Signature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from packager.distribution import Registry

log = logging.getLogger("edgefleet.agent")
S = UpdateState
T = TypeVar("T")
ATTEMPTS = 5
WORKLOAD_FILE = "workload.json"   # beside serving.json: the Workload this version runs as
RUNTIME = "kubernetes"   # what the reported state names as a cluster version's runtime


@dataclass(frozen=True)
class WorkloadSettings:
    """What every deployment of this agent asks of the cluster (the desired state
    says nothing about replicas or resources)."""

    replicas: int = 1
    resources: Resources = Resources()
    progress_deadline_seconds: int = 300


@dataclass
class KubeDriver:
    ns: Namespace
    registry: Callable[[], Registry]
    public_key: Callable[[], ec.EllipticCurvePublicKey]
    versions_dir: Path
    settings: WorkloadSettings = WorkloadSettings()
    poll: float = 1.0
    sleep: Callable[[float], None] = time.sleep
    # The last look at each deployment's rollout (object name -> status), for telemetry.
    looks: dict[str, RolloutStatus] = field(default_factory=dict)

    # -- the UpdateDriver interface ---------------------------------------------

    def step(self, state: UpdateState, update: Update,
             current: Serving | None) -> Installed | None:
        if state is S.VERIFYING:
            return self._verify(update)
        if state is S.STARTING:
            self._roll_out(update)
        elif state is S.SELF_TEST:
            self._confirm(update)
        elif state is S.ROLLING_BACK:
            self._back_out(update)
        return None   # downloading, staged, failed: nothing to do on the cluster

    def loaded(self, update: Update) -> dict[str, Any]:
        look = self.looks.get(object_name(update.deployment))
        where = f"{self.ns.target.namespace}: {look.ready}/{look.desired} ready" if look \
            else self.ns.target.namespace
        return {"runtime": RUNTIME, "device": where}

    def switch(self, update: Update, target: Serving) -> dict[str, Any]:
        return {"deployment": {"primary": self.loaded(update)}}

    # -- steps ------------------------------------------------------------------

    def _verify(self, update: Update) -> Installed:
        checked = self._retrying(
            f"checking {update.repository}@{update.digest}",
            lambda: check_package(self.registry(), update.repository, update.digest,
                                  public_key=self.public_key()))
        directory = (self.versions_dir / update.deployment
                     / f"{update.version}-{update.digest[7:19]}")
        settings = Settings.from_json(update.settings)
        refused = batching_refused(settings.batching, checked.serving)
        if refused is not None:
            raise StepFailed(refused)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        workload = Workload(
            name=update.deployment,
            release=Release(update.model, update.version, update.repository, update.digest),
            platforms=checked.platforms, replicas=self.settings.replicas,
            resources=pod_resources(settings.resources, self.settings.resources),
            progress_deadline_seconds=self.settings.progress_deadline_seconds,
            batching=None if settings.batching is None else str(settings.batching),
            sketch=None if update.sketch is None else SketchSpec.from_json(update.sketch))
        (tmp / "serving.json").write_text(json.dumps(checked.serving))
        (tmp / WORKLOAD_FILE).write_text(json.dumps(workload.to_json()))
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        serving = checked.serving
        return Installed(
            version=update.version, digest=update.digest, directory=str(directory),
            entrypoint=serving["entrypoint"], framework=serving["framework"],
            prefer=list(update.prefer), package_prefer=list(serving.get("prefer") or []),
            sample_request=serving.get("sample_request"), settings=dict(update.settings),
            package_batching=package_batching(serving), sketch=update.sketch,
        )

    def _roll_out(self, update: Update) -> None:
        if update.staged is None:
            raise StepFailed("the version was never verified")
        workload = staged_workload(update.staged)
        target, applied = self._retrying(f"applying {workload.object_name}",
                                         lambda: begin(self.ns, workload))
        for line in applied.drift:
            log.warning("drift brought back: %s", line)
        timeout = verdict_timeout(workload)
        status = self._retrying(f"following {workload.object_name}", lambda: self.ns.follow(
            target.object_name, timeout=timeout, poll=self.poll, on_status=self._look))
        if status.phase is not Phase.COMPLETE:
            reason, events = self._retrying(f"reading why {workload.object_name} failed",
                                            lambda: why_failed(self.ns, status, timeout))
            raise StepFailed("; ".join((reason, *events)))

    def _confirm(self, update: Update) -> None:
        name = object_name(update.deployment)
        live = self._retrying(f"reading {name}", lambda: self.ns.deployment(name))
        running, _ = workloads_of(live) if live is not None else (None, None)
        if running is None or running.release.digest != update.digest:
            raise StepFailed(f"Deployment {name} no longer runs {update.digest}: changed by "
                             "someone else during the update")
        status = self._retrying(f"reading {name}'s rollout", lambda: self.ns.rollout(name))
        self._look(status)
        if status.phase is not Phase.COMPLETE:
            raise StepFailed(f"the self-tested pods of {name} are not all ready: "
                             f"{status.message}")

    def _back_out(self, update: Update) -> None:
        name = object_name(update.deployment)
        live = self._retrying(f"reading {name}", lambda: self.ns.deployment(name))
        running, previous = workloads_of(live) if live is not None else (None, None)
        # The same digest with other settings is not this update's either.
        wanted = staged_workload(update.staged) if update.staged is not None else None
        if running is None or wanted is None or replace(running, previous=None) != wanted:
            return   # never applied, or undone already (a restart mid-rollback)
        if previous is None:
            self._retrying(f"removing {name}", lambda: self.ns.remove(name))
            log.info("removed %s: its first release failed", name)
        else:
            self._retrying(f"undoing {name}", lambda: self.ns.undo(name))
            log.info("undid %s: back to version %d", name, previous.release.version)

    # -- between updates ----------------------------------------------------------

    def reconcile(self, serving: Serving) -> tuple[str, ...]:
        """Apply SERVING's version again (as the live Deployment records it, with what
        it would undo to); the drift brought back. A Deployment deleted by hand, or left
        on another version by an undo that could not reach the API server, gets the
        verified version that serves. Raises KubeError or StepFailed."""
        name = object_name(serving.name)
        wanted = staged_workload(serving.primary)
        live = self.ns.deployment(name)
        if live is None:
            self.ns.deploy(wanted)
            return (f"Deployment {name} was gone",)
        current, previous = workloads_of(live)
        if current.release.digest != wanted.release.digest:
            self.ns.deploy(wanted)
            return (f"Deployment {name} ran version {current.release.version}, not "
                    f"{wanted.release.version}",)
        if (current.resources, current.batching, current.sketch) \
                != (wanted.resources, wanted.batching, wanted.sketch):
            self.ns.deploy(replace(wanted, previous=previous))
            return (f"Deployment {name} ran other resources, batching or drift bins than "
                    f"version {wanted.release.version}'s",)
        return self.ns.deploy(replace(current, previous=previous)).drift

    # -- helpers ----------------------------------------------------------------

    def _look(self, status: RolloutStatus) -> None:
        self.looks[status.name] = status

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """FN(), again with backoff while the API server or the registry is down or busy;
        StepFailed with the one-line reason once it refuses or the attempts are spent."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn()
            except (KubeError, PackageCheckError) as exc:
                transient = exc.retryable if isinstance(exc, KubeError) else exc.transient
                if not transient or attempt == ATTEMPTS:
                    raise StepFailed(str(exc)) from None
                delay = min(2 ** attempt, 30)
                log.warning("%s failed (%s); again in %ds", what, exc, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")


def pod_resources(wanted: DeploymentResources, default: Resources) -> Resources:
    """What each pod asks for: the deployment's resources where it gives them (its CPU a
    limit too, as in container mode), else the agent's --cpu/--memory; an accelerator of
    count 0 is none."""
    accelerators = {**default.accelerators, **dict(wanted.accelerators)}
    return Resources(
        cpu=default.cpu if wanted.cpu_millis is None else f"{wanted.cpu_millis}m",
        memory=default.memory if wanted.memory_bytes is None
        else format_memory(wanted.memory_bytes),
        accelerators={kind: count for kind, count in accelerators.items() if count},
        limit_cpu=wanted.cpu_millis is not None)


def batching_refused(batching: Batching | None, serving: dict[str, Any]) -> str | None:
    """Why the pods could not batch as asked (the model has no free batch dimension), checked
    before anything is applied; None when they can or nothing is asked."""
    package = package_batching(serving)
    chosen = effective_batching(batching, None if package is None
                                else Batching.from_json(package))
    if chosen is None:
        return None
    signature = serving.get("signature")
    why = ("the package names no model signature" if signature is None
           else unbatchable(Signature.from_dict(signature)))
    return None if why is None else f"batching was asked for, but the model cannot batch: {why}"


def staged_workload(installed: Installed) -> Workload:
    """The workload a verified version runs as (kept beside its serving.json)."""
    try:
        return Workload.from_json(json.loads(
            (Path(installed.directory) / WORKLOAD_FILE).read_text()))
    except (OSError, ValueError) as exc:   # ManifestError is a ValueError
        raise StepFailed(f"version {installed.version} has no readable {WORKLOAD_FILE}: "
                         f"{exc}") from None
