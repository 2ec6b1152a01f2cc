"""The agent in Kubernetes mode: a cluster's namespace as one device of the hub.

The same daemon as a device's (agent/daemon.py: MQTT session, desired
states checked and applied one at a time, the update state machine, the
uplink with its store-and-forward telemetry queue), with the cluster where
a device has its serving process and package store:

- the inventory is read from the API server (agent/kube/inventory.py), again
  at every start, so the hub tags the cluster `runtime.kubernetes=true`, by
  architecture and by extended resource;
- updates run through `KubeDriver` (agent/kube/driver.py): the package is
  checked in the hub's registry, then its Deployment rolls out, and a failed
  rollout is undone to the previous image digest;
- a deployment the desired state no longer names is pruned from the
  namespace (only the agent's own objects, by label);
- every `reconcile_interval` seconds, between desired states, what serves is
  applied again: hand edits (a `kubectl scale`, an edited image, a deleted
  Deployment, another version) are logged as drift, counted in telemetry and
  brought back;
- an A/B split or a shadow candidate is not run: the candidate is reported
  failed with why (docs/architecture.md, Kubernetes mode);
- telemetry: a system point for the agent and per deployment an inference
  point with its ready/desired/updated/available replicas and restarts, and
  the pods' own inference numbers read from their /metrics
  (agent/kube/scrape.py: count, errors, latency, and the drift sketches of a
  version with a baseline, summed over its pods; pods that could not be read
  counted in `metrics_failed` with the last reason in `metrics_error`).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

from agent import options as o
from agent import procfs, renewal
from agent.clock import now
from agent.daemon import Agent, device_session
from agent.decisions import Role, Step, kept_statuses, next_step, target, unloaded
from agent.identity import Identity
from agent.kube.apply import KubeError, Namespace
from agent.kube.driver import RUNTIME, KubeDriver, WorkloadSettings
from agent.kube.inventory import facts
from agent.kube.manifests import Resources, Target, object_name
from agent.kube.rollout import RolloutStatus
from agent.kube.scrape import Scraper
from agent.mqtt import MqttTimeout
from agent.state import StateFile, status_key
from agent.telemetry import system_point
from agent.telemetry_queue import TelemetryQueue
from agent.trust import TrustStore
from agent.updates import StepFailed, Updater
from agent.uplink import Uplink
from contract.protocol import (
    Deployment,
    DesiredState,
    UpdateState,
    desired_topic,
    status_topic,
)

log = logging.getLogger("edgefleet.agent")
AB_REFUSED = ("A/B split and shadow are not supported on a Kubernetes target: the "
              "candidate was not deployed (roll out to the cluster without --split/--shadow)")


@dataclass(frozen=True)
class KubeOptions:
    data_dir: Path
    namespace: str
    registry: str                    # the hub's registry as the nodes reach it, host[:port]
    kubeconfig: Path | None = None   # None: the pod's in-cluster configuration
    mqtt_url: str | None = None
    api_key_secret: str = "edgefleet-scoring-key"
    pull_secret: str | None = "edgefleet-registry"
    replicas: int = 1
    cpu: str = Resources.cpu
    memory: str = Resources.memory
    progress_deadline: int = 300
    telemetry_interval: float = o.TELEMETRY_INTERVAL.default
    telemetry_queue_points: int = o.TELEMETRY_QUEUE_POINTS.default
    poll: float = 1.0                # seconds between looks at a rollout
    reconcile_interval: float = 60.0  # seconds between drift checks
    verbose: bool = False
    pause_in: tuple[str, float] | None = None  # fault injection, see agent/updates.py

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "data_dir": str(self.data_dir),
                           "kubeconfig": str(self.kubeconfig) if self.kubeconfig else None})

    @classmethod
    def from_json(cls, text: str) -> KubeOptions:
        values = json.loads(text)
        pause_in = values.pop("pause_in")
        kubeconfig = values.pop("kubeconfig")
        return cls(**{**values, "data_dir": Path(values["data_dir"]),
                      "kubeconfig": Path(kubeconfig) if kubeconfig else None,
                      "pause_in": tuple(pause_in) if pause_in else None})


def api_client(kubeconfig: Path | None) -> client.ApiClient:
    """The API server's client: from KUBECONFIG, or in a pod its service account.
    KubeError (not retryable) if that configuration cannot be read."""
    from kubernetes import config

    try:
        if kubeconfig is not None:
            return config.new_client_from_config(config_file=str(kubeconfig))
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        where = kubeconfig or "the in-cluster service account"
        raise KubeError(f"cannot use {where}: {' '.join(str(exc).split())[:300]}",
                        400) from None
    return client.ApiClient(configuration)


def cluster_platform(inventory: dict[str, Any]) -> str:
    """The one platform a reported state names: the first of the cluster's schedulable
    nodes (all of them are in the facts and the hub's tags)."""
    platforms = inventory["platforms"]
    return str(platforms[0]) if platforms else "linux/amd64"


class KubeAgent(Agent):
    """agent/daemon.py's Agent with the cluster in place of the serving process."""

    def __init__(self, identity: Identity, options: KubeOptions, api: client.ApiClient,
                 inventory: dict[str, Any], agent_version: str) -> None:
        self.identity = identity
        self.kube_options = options
        data = self.data_dir = options.data_dir   # what the inherited registry() reads
        self.api = api
        self.platform = cluster_platform(inventory)
        self.accelerators = ()
        self.facts = facts(inventory)
        self.agent_version = agent_version
        self.state_file = StateFile(data)
        self.state = self.state_file.load()
        self.trust = TrustStore(data, identity)
        self.stop_requested = threading.Event()
        self._registry = None
        self.ns = Namespace(api, Target(
            namespace=options.namespace, agent=identity.device_id, registry=options.registry,
            api_key_secret=options.api_key_secret, pull_secret=options.pull_secret))
        self.driver = KubeDriver(
            self.ns, self.registry, lambda: self.trust.key, data / "versions",
            WorkloadSettings(options.replicas, Resources(options.cpu, options.memory),
                             options.progress_deadline),
            poll=options.poll)
        # As a device's: the pinned CA and the device certificate on an mqtts:// broker,
        # the certificate renewed before it expires.
        self.session, self.mqtt_tls = device_session(identity, data)
        self._renewal_check = time.monotonic() + renewal.FIRST_CHECK
        self.queue = TelemetryQueue(data / "telemetry.db",
                                    max_points=options.telemetry_queue_points)
        self.cpu = procfs.CpuPercent()
        self.uplink = Uplink(self.session, identity.device_id, self.queue, self._measure,
                             interval=options.telemetry_interval)
        self.updater = Updater(self.state, self.state_file, None, self.registry, None,
                               self.report, pause_in=options.pause_in, driver=self.driver)
        self.drift: dict[str, int] = {}   # deployment -> hand edits brought back so far
        # The pods' /metrics at their pod IPs (tests point it at a local server).
        self.scraper = Scraper(self.ns.metrics_addresses)
        self._scrape_errors: dict[str, str] = {}  # deployment -> last reason, logged once

    # -- lifecycle ----------------------------------------------------------------

    def run(self) -> None:
        self.report()
        self.session.start()
        self.uplink.start()
        try:
            self._set_pull_secret()
            pending = self.state.pending_payload
            if pending is not None:  # a desired state we were applying when we stopped
                self.handle_desired(pending, resuming=True)
            next_reconcile = time.monotonic() + self.kube_options.reconcile_interval
            while not self.stop_requested.is_set():
                self._renew_if_due()
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + self.kube_options.reconcile_interval
                try:
                    message = self.session.get(timeout=0.5)
                except MqttTimeout:
                    continue
                if message.topic == desired_topic(self.identity.device_id):
                    self.handle_desired(message.payload)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.uplink.stop()
        try:
            self.session.publish(status_topic(self.identity.device_id), b"offline",
                                 retain=True, timeout=2)
        except Exception:  # offline already: the will or the next birth covers it
            pass
        self.session.close()
        if self._registry is not None:
            self._registry.close()
        self.queue.close()
        self.scraper.close()
        self.api.close()

    def _set_pull_secret(self) -> None:
        """The nodes pull from the hub's registry with this agent's own credentials."""
        if self.ns.target.pull_secret is None:
            return
        try:
            self.ns.set_pull_secret(self.identity.device_id, self.identity.device_token)
        except KubeError as exc:   # reported; every pull then fails visibly in its events
            log.error("could not write the image pull secret: %s", exc)

    def reconcile(self) -> None:
        """Bring what serves back where someone changed it by hand (see the docstring)."""
        for name, serving in list(self.state.serving.items()):
            try:
                drift = self.driver.reconcile(serving)
            except (KubeError, StepFailed) as exc:   # the next round tries again
                log.error("could not check %s for drift: %s", name, exc)
                continue
            for line in drift:
                log.warning("drift brought back: %s", line)
            if drift:
                self.drift[name] = self.drift.get(name, 0) + len(drift)

    # -- desired state ------------------------------------------------------------

    def apply(self, desired: DesiredState) -> None:
        wanted = {d.name for d in desired.deployments}
        for deployment in desired.deployments:
            self._converge(deployment, desired.generation)
        for name in unloaded(self.state.serving, wanted):
            del self.state.serving[name]
        try:
            removed = self.ns.prune({object_name(name) for name in wanted})
        except KubeError as exc:  # the next desired state prunes again
            log.error("could not prune the namespace: %s", exc)
        else:
            for name in removed:
                log.info("removed deployment %s: no longer wanted", name)
        self._prune_versions(wanted)
        self.state.applied_generation = desired.generation
        self.state.pending_desired = None
        self.state_file.save(self.state)
        self.report()

    def _converge(self, d: Deployment, generation: int) -> None:
        step = next_step(d, self._route(d.name))
        if step is Step.UPDATE_PRIMARY:
            if not self.updater.run(self._update_for(d, Role.PRIMARY, generation)):
                return
            step = next_step(d, self._route(d.name))
        if d.candidate is not None and step is not Step.NOTHING:
            self._refuse_candidate(d)

    def _refuse_candidate(self, d: Deployment) -> None:
        wanted = target(d, Role.CANDIDATE)
        statuses = [s for s in self.state.statuses
                    if not (s["name"] == d.name and s["version"] == wanted.version)]
        statuses.append({"name": d.name, "model": d.model, "version": wanted.version,
                         "state": str(UpdateState.FAILED), "since": now(), "error": AB_REFUSED,
                         "runtime": RUNTIME, "device": None})
        self.state.statuses = statuses
        log.warning("deployment %s: %s", d.name, AB_REFUSED)

    def _prune_versions(self, wanted: set[str]) -> None:
        """Keep the verified serving.json of what serves and of the previous version."""
        versions = self.data_dir / "versions"
        keep = {Path(v.directory) for s in self.state.serving.values()
                for v in (s.primary, s.previous) if v is not None}
        if self.state.update is not None and self.state.update.staged is not None:
            keep.add(Path(self.state.update.staged.directory))
        for parent in versions.glob("*"):
            for child in parent.iterdir():
                if child not in keep:
                    shutil.rmtree(child, ignore_errors=True)
        routes = {name: serving.route() for name, serving in self.state.serving.items()}
        self.state.statuses = kept_statuses(self.state.statuses, status_key, routes, wanted)

    # -- telemetry ----------------------------------------------------------------

    def _measure(self) -> list[tuple[str, dict]]:
        points: list[tuple[str, dict]] = [("system", system_point(
            self.data_dir, None, self.cpu, dropped=self.queue.dropped))]
        serving = dict(self.state.serving)
        scraped = self._scrape(serving)
        for name, s in serving.items():
            version = s.primary.version
            point: dict[str, Any] = {"deployment": name, "version": version}
            try:
                status = self.ns.rollout(object_name(name))
            except KubeError as exc:  # the API server is away: no replica numbers this round
                log.debug("no rollout status for %s: %s", name, exc)
            else:
                point = replica_point(name, version, status, self.drift.get(name, 0))
            inference, read = scraped[name]
            point.update(read)
            for values in inference:   # the serving version's numbers join its replicas'
                if values["version"] == version:
                    point.update(values)
                else:
                    points.append(("inference", values))
            points.append(("inference", point))
        return points

    def _scrape(self, serving: dict[str, Any]) -> dict[str, tuple[list[dict], dict]]:
        """Per deployment: the pods' inference points and how reading them went."""
        self.scraper.forget(serving)
        if not serving:
            return {}
        try:
            key: str | None = self.ns.api_key()
        except KubeError as exc:
            key, reason = None, f"scoring key not read: {exc}"
        sketched = {name for name, s in serving.items() if s.primary.sketch is not None}
        rounds = self.scraper.scrape({name: object_name(name) for name in serving}, key,
                                     sketched) if key is not None else {}
        done: dict[str, tuple[list[dict], dict]] = {}
        for name in serving:
            if name in rounds:
                inference, read = rounds[name]
                values, reason = read.values(), read.error
            else:   # without the key the pods would only answer 401
                inference, values = [], {"metrics_error": reason[:128]}
            if reason and reason != self._scrape_errors.get(name):
                log.warning("deployment %s: pod metrics not read: %s", name, reason)
            self._scrape_errors[name] = reason
            done[name] = ([dict(v) for v in inference], values)
        return done


def replica_point(name: str, version: int, status: RolloutStatus,
                  drift: int) -> dict[str, Any]:
    """One deployment's replicas (and hand edits undone so far) as an inference point."""
    return {"deployment": name, "version": version, "ready_replicas": status.ready,
            "desired_replicas": status.desired, "updated_replicas": status.updated,
            "available_replicas": status.available, "restarts": status.restarts,
            "drift_corrected": drift}
