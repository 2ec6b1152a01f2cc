"""The agent daemon: one device's link to the hub, and what it runs.

Start-up: load the identity and the saved state, take the scoring port and,
if versions are deployed, start the serving process with the last known
good versions (with nothing deployed none runs: agent/supervisor.py), then
connect to the broker. The main
thread takes desired states from the MQTT session one at a time, checks
each (signature, generation, expiry; contract.protocol), and converges the
device on it through the update state machine (agent/updates.py). Commands
(agent/commands.py) are checked on the main thread too and run in a thread
of their own. An
update interrupted by a crash is resumed from its saved state. The uplink
thread reports state and telemetry; a supervisor check restarts the serving
process if it dies.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agent import heap, inventory, procfs, renewal
from agent import identity as identities
from agent import options as o
from agent.clock import now
from agent.commands import Commands, Profiler
from agent.decisions import (
    Role,
    Route,
    Step,
    kept_statuses,
    next_step,
    recent_refusals,
    reports_refusal,
    target,
    unloaded,
    wanted_route,
)
from agent.identity import Identity
from agent.loading import deployment_body
from agent.mqtt import Message, MqttTimeout, Session
from agent.state import AgentState, Installed, Serving, StateFile, Update, status_key
from agent.supervisor import ServingError, ServingOptions, ServingProcess
from agent.telemetry import InferenceDeltas, system_point
from agent.telemetry_queue import TelemetryQueue
from agent.trust import TrustStore
from agent.uplink import Uplink
from contract.errors import PackageError
from contract.files import write_secret
from contract.keys import HUB_KEY_FACT, RotationError
from contract.protocol import (
    MAX_TEXT,
    Deployment,
    DeploymentStatus,
    DesiredState,
    ProtocolRefusal,
    Reason,
    Refusal,
    ReportedState,
    UpdateState,
    build_reported,
    commands_topic,
    desired_topic,
    device_subscriptions,
    parse_time,
    rotation_chain,
    status_topic,
    verify_desired,
)

# The update machinery (agent.updates, agent.package_store: tarfile, the OCI layout) is
# imported where an update needs it, not at start: an idle agent never does, and each
# module it keeps out is memory it does not hold (bench/agent.py counts it).
if TYPE_CHECKING:
    import ssl

    from agent.container.serving import ContainerServing
    from agent.container.store import ContainerStore
    from agent.container.watch import ContainerWatch
    from agent.package_store import PackageStore
    from agent.updates import Updater
    from packager.distribution import Registry

log = logging.getLogger("edgefleet.agent")


def probe_inventory(data_dir: Path) -> dict:
    """What the device offers, found in a child process (see agent/inventory.py)."""
    done = subprocess.run([sys.executable, "-m", "agent.inventory", str(data_dir)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"probing the device's runtimes failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def device_session(identity: Identity, data_dir: Path) -> tuple[Session, ssl.SSLContext | None]:
    """The MQTT session to the hub's broker (desired states in; birth, will, state out) and,
    over mqtts://, its TLS context: the pinned CA, and the device certificate if the broker
    knows the device by it (the context renewal loads a new certificate into)."""
    session = Session(
        identity.mqtt_url, client_id=identity.device_id,
        username=None if identity.mqtt_certificate else identity.mqtt_username,
        password=None if identity.mqtt_certificate else identity.mqtt_password,
        will=Message(status_topic(identity.device_id), b"offline", retain=True),
        birth=Message(status_topic(identity.device_id), b"online", retain=True),
        subscriptions=list(device_subscriptions(identity.device_id)),
    )
    if not identity.mqtt_url.startswith("mqtts://"):
        return session, None
    context = identities.mqtt_tls(data_dir, identity)
    session.use_tls(context)
    return session, context


@dataclass(frozen=True)
class AgentOptions:
    data_dir: Path
    mqtt_url: str | None = None  # instead of the broker named at enrollment
    serve_host: str = o.SERVE_HOST.default
    serve_port: int = o.SERVE_PORT.default
    telemetry_interval: float = o.TELEMETRY_INTERVAL.default
    telemetry_queue_points: int = o.TELEMETRY_QUEUE_POINTS.default
    max_concurrency: int = o.MAX_CONCURRENCY.default
    max_queue: int = o.MAX_QUEUE.default
    max_wait_ms: int = o.MAX_WAIT_MS.default
    serve_grpc_port: int | None = o.SERVE_GRPC_PORT.default
    max_body_bytes: int = o.MAX_BODY_BYTES.default
    serve_start_timeout: float = o.SERVE_START_TIMEOUT.default
    verbose: bool = False
    pause_in: tuple[str, float] | None = None  # fault injection, see agent/updates.py
    mode: str = o.MODE.default  # "native" or "container"
    docker_host: str | None = None  # container mode: the engine (else DOCKER_HOST)
    engine_certs_dir: str = o.ENGINE_CERTS_DIR.default  # container mode: agent/container/trust.py
    container_cpus: float | None = None
    container_memory_mb: int | None = None

    def to_json(self) -> str:
        """How `edgefleet agent run` hands the options to `python -m agent`."""
        return json.dumps({**self.__dict__, "data_dir": str(self.data_dir)})

    @classmethod
    def from_json(cls, text: str) -> AgentOptions:
        values = json.loads(text)
        pause_in = values.pop("pause_in")
        return cls(**{**values, "data_dir": Path(values["data_dir"]),
                      "pause_in": tuple(pause_in) if pause_in else None})


class Agent:
    def __init__(self, identity: Identity, options: AgentOptions) -> None:
        self.identity = identity
        self.options = options
        data = self.data_dir = options.data_dir
        self.platform = inventory.oci_platform()
        found = probe_inventory(data)
        self.accelerators = tuple(found["accelerators"])
        self.facts = inventory.facts(found)
        self.agent_version = found["agent_version"]
        self.state_file = StateFile(data)
        self.state: AgentState = self.state_file.load()
        self.trust = TrustStore(data, identity)
        self.stop_requested = threading.Event()
        key_file = data / "serving-api-key"
        if not key_file.exists():  # the first start: later ones need no random module
            import secrets

            write_secret(key_file, secrets.token_urlsafe(24), replace=False)
        front = ServingProcess(data, ServingOptions(
            options.serve_host, options.serve_port, key_file,
            options.max_concurrency, options.max_queue, options.max_wait_ms,
            options.serve_grpc_port, options.max_body_bytes, options.serve_start_timeout,
        ))
        self._registry: Registry | None = None
        self.front = front  # the scoring address, in both modes
        self.serving: ServingProcess | ContainerServing = front
        self.watch: ContainerWatch | None = None
        self._not_loaded: set[str] = set()  # good versions a (re)start could not load
        if options.mode == "container":
            self.serving, self.store, self.watch = self._container_mode(front, key_file)
        self.session, self.mqtt_tls = device_session(identity, data)
        # When to look at the broker certificate's expiry next (monotonic).
        self._renewal_check = time.monotonic() + renewal.FIRST_CHECK
        self.queue = TelemetryQueue(data / "telemetry.db",
                                    max_points=options.telemetry_queue_points)
        self.deltas = InferenceDeltas()
        self.cpu = procfs.CpuPercent()
        self.uplink = Uplink(self.session, identity.device_id, self.queue, self._measure,
                             interval=options.telemetry_interval)
        self.commands = Commands(identity, data, self.trust, self._refuse,
                                 Profiler(data, self.trust, self.registry))

    @functools.cached_property
    def store(self) -> PackageStore | ContainerStore:
        """Native mode's package store, made when an update or a prune first needs it
        (container mode sets its own at start)."""
        from agent.package_store import PackageStore

        return PackageStore(self.data_dir, platform=self.platform,
                            public_key=lambda: self.trust.key)

    @functools.cached_property
    def updater(self) -> Updater:
        """The update state machine, made at the first update."""
        from agent.updates import Updater

        return Updater(self.state, self.state_file, self.store, self.registry,
                       self.serving, self.report, pause_in=self.options.pause_in)

    def _container_mode(self, front: ServingProcess, key_file: Path
                        ) -> tuple[ContainerServing, ContainerStore, ContainerWatch]:
        """Versions run as containers of the package images; FRONT stays the scoring address."""
        from agent.container.engine import ContainerEngine, Limits
        from agent.container.serving import ContainerServing
        from agent.container.store import ContainerStore
        from agent.container.trust import RegistryTrust
        from agent.container.watch import ContainerWatch

        o, identity = self.options, self.identity
        engine = ContainerEngine.connect(o.docker_host, owner=identity.device_id)
        memory = o.container_memory_mb * 2**20 if o.container_memory_mb else None
        # A CUDA device found by the inventory's runtimes: containers get the GPUs.
        gpus = any(a.partition(":")[2].upper().startswith(("CUDA", "TENSORRT"))
                   for a in self.accelerators)
        serving = ContainerServing(front, engine, self._installed, data_dir=o.data_dir,
                                   api_key_file=key_file, gpus=gpus,
                                   limits=Limits(cpus=o.container_cpus, memory_bytes=memory))
        store = ContainerStore(o.data_dir, engine, registry=self.registry,
                               hub_url=identity.hub_url, username=identity.device_id,
                               password=identity.device_token, platform=self.platform,
                               public_key=lambda: self.trust.key,
                               trust=RegistryTrust(o.data_dir / identities.CA_FILE,
                                                   urlsplit(identity.hub_url).netloc,
                                                   o.engine_certs_dir)
                               if identity.tls else None)
        return serving, store, ContainerWatch(serving)

    def _installed(self, name: str, version: str) -> Installed | None:
        """The staged version VERSION of deployment NAME (container mode runs it)."""
        update = self.state.update
        # An update being undone is not what a put means: the route goes back to the
        # serving version (which may be this version with its old settings).
        undoing = update is not None and update.state in (
            UpdateState.FAILED, UpdateState.ROLLING_BACK, UpdateState.ROLLED_BACK)
        if update and update.deployment == name and update.staged and not undoing \
                and str(update.staged.version) == version:
            return update.staged
        serving = self.state.serving.get(name)
        for installed in (serving.primary, serving.candidate, serving.previous) if serving else ():
            if installed is not None and str(installed.version) == version:
                return installed
        return None

    def registry(self) -> Registry:
        """The hub's OCI registry client, made at the first download."""
        if self._registry is None:
            from packager.distribution import Registry

            self._registry = Registry(self.identity.hub_url, self.identity.device_token,
                                      verify=identities.hub_tls(self.data_dir, self.identity))
        return self._registry

    # -- lifecycle ----------------------------------------------------------------

    def run(self) -> None:
        """Run until stop_requested is set (SIGTERM/SIGINT), then shut down cleanly."""
        self.front.open()
        if self.state.serving:
            self.serving.start()
            self._load_good_versions()
        if self.watch is not None:
            self._watch_containers(self.watch)  # orphans of a killed agent go first thing
        self.report()
        self.session.start()
        self.uplink.start()
        heap.trim()  # start-up's garbage
        try:
            pending = self.state.pending_payload
            if pending is not None:  # a desired state we were applying when we stopped
                self.handle_desired(pending, resuming=True)
            while not self.stop_requested.is_set():
                self._supervise()
                try:
                    message = self.session.get(timeout=0.5)
                except MqttTimeout:
                    continue
                if message.topic == desired_topic(self.identity.device_id):
                    self.handle_desired(message.payload)
                elif message.topic == commands_topic(self.identity.device_id):
                    self.commands.handle(message.payload)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.uplink.stop()
        try:
            # A clean disconnect does not fire the last will: say it ourselves.
            self.session.publish(status_topic(self.identity.device_id), b"offline",
                                 retain=True, timeout=2)
        except Exception:  # offline already: the will or the next birth covers it
            pass
        self.session.close()
        self.serving.stop()  # container mode: the containers keep running
        self.front.close()
        if self._registry is not None:
            self._registry.close()
        self.queue.close()

    def _supervise(self) -> None:
        self._renew_if_due()
        if self.serving.crashed():
            self.serving.restart()
            self._load_good_versions()
            self.report()
        if self.watch is not None and self.watch.due():
            self._watch_containers(self.watch)

    def _renew_if_due(self) -> None:
        if time.monotonic() >= self._renewal_check:
            self._renewal_check = time.monotonic() + renewal.CHECK_EVERY
            renewal.renew_if_due(self.data_dir, self.identity, self.mqtt_tls)

    def _watch_containers(self, watch: ContainerWatch) -> None:
        """Orphans removed, crashed containers started again (container mode)."""
        from agent.container.serving import ContainerServing

        assert isinstance(self.serving, ContainerServing)
        serving = self.serving
        was = (dict(watch.engine), watch.error)
        # A version staged in native mode has no image: loading it says so ("deploy it again").
        wanted = {name: {serving.name_of(name, v) for v in (s.primary, s.candidate)
                         if v and v.image}
                  for name, s in self.state.serving.items()}
        broken = watch.check(wanted)
        if watch.error is None:  # the engine answers: load what could not be loaded before
            broken |= {name: "" for name in self._not_loaded - broken.keys()
                       if name in self.state.serving}
        for name, why in broken.items():
            log.warning("%s: %s; loading it again", name, why or "not loaded")
            self._load(name, self.state.serving[name], note=why or None)
        if broken or (dict(watch.engine), watch.error) != was:
            self.facts = {**{k: v for k, v in self.facts.items()
                             if not k.startswith("container_engine")}, **watch.facts()}
            self.report()

    def _load_good_versions(self) -> None:
        for name, serving in list(self.state.serving.items()):
            self._load(name, serving)

    def _load(self, name: str, serving: Serving, note: str | None = None) -> None:
        """Load NAME's good versions again; NOTE (why) goes on their reported status."""
        try:
            self.serving.put(name, deployment_body(serving))
            self._not_loaded.discard(name)
        except ServingError as exc:
            log.error("could not load %s again: %s", name, exc)
            self._not_loaded.add(name)
            note = f"{note + '; ' if note else ''}could not load it again: {exc}"
        if note is not None:
            for status in self.state.statuses:
                if status["name"] == name and status["state"] == str(UpdateState.SERVING):
                    status["error"] = note[:MAX_TEXT]

    # -- desired state ------------------------------------------------------------

    def handle_desired(self, payload: bytes, *, resuming: bool = False) -> None:
        last = self.state.applied_generation
        try:
            # Rotations first: a state signed by a key the hub rotated to since this
            # device last heard from it carries the statements that lead there.
            if self.trust.follow(rotation_chain(payload)):
                self.report()  # the hub counts which devices trust which key
            desired = verify_desired(payload, public_key=self.trust.key,
                                     device_id=self.identity.device_id, last_generation=last,
                                     now=datetime.now(UTC), retired=self.trust.retired)
        except RotationError as exc:
            self._refuse(ProtocolRefusal(Reason.BAD_SIGNATURE, f"hub key: {exc}"))
            return
        except OSError as exc:  # the new trust not saved: the retained state comes again
            log.error("could not save the hub's key rotation: %s", exc)
            return
        except ProtocolRefusal as refusal:
            if reports_refusal(refusal):
                self._refuse(refusal)
            if resuming:
                self.state.pending_desired = None
                self.state_file.save(self.state)
            return
        log.info("applying desired state generation %d", desired.generation)
        try:
            self.state.pending_desired = base64.b64encode(payload).decode()
            self.state_file.save(self.state)
            self.apply(desired)
        except OSError as exc:
            # The disk (full, or failing) refused a state save. What serves keeps
            # serving; the broker keeps the desired state for the next start.
            log.error("could not apply desired state generation %d: %s", desired.generation, exc)

    def _refuse(self, refusal: ProtocolRefusal) -> None:
        """Report a refused desired state or command (agent/commands.py)."""
        log.warning("refused: %s", refusal)
        self.state.refusals = recent_refusals(self.state.refusals, {
            "generation": refusal.generation, "reason": str(refusal.reason),
            "message": refusal.message[:MAX_TEXT], "at": now(),
        })
        self.state_file.save(self.state)
        self.report()

    def apply(self, desired: DesiredState) -> None:
        wanted = {d.name for d in desired.deployments}
        if wanted:
            self.front.warm()  # its start overlaps the download
        for deployment in desired.deployments:
            self._converge(deployment, desired.generation)
        for name in unloaded(self.state.serving, wanted):
            try:
                self.serving.delete(name)
            except ServingError as exc:
                log.warning("unloading %s: %s", name, exc)
            del self.state.serving[name]
        self._prune(wanted)
        self.state.applied_generation = desired.generation
        self.state.pending_desired = None
        self.state_file.save(self.state)
        if not self.state.serving and self.front.on_demand:
            self.serving.stop()  # nothing left to serve: the idle front answers the port
        self.report()
        heap.trim()  # the update's garbage (downloads, unpacking)

    def _update_for(self, d: Deployment, role: Role, generation: int) -> Update:
        """The saved update for this version if one was interrupted, else a new one."""
        t = target(d, role)
        saved = self.state.update
        settings = t.settings.to_json()
        if saved and (saved.deployment, saved.role, saved.digest, saved.settings) == (
                d.name, role, t.package.digest, settings):
            return saved
        return Update(
            generation=generation, deployment=d.name, model=d.model, role=str(role),
            version=t.version, repository=t.package.repository, digest=t.package.digest,
            size=t.package.size, prefer=list(t.prefer), state=str(UpdateState.DOWNLOADING),
            since=now(), traffic=t.traffic, shadow=t.shadow, settings=settings,
            sketch=None if t.sketch is None else t.sketch.to_json(),
        )

    def _route(self, name: str) -> Route | None:
        serving = self.state.serving.get(name)
        return serving.route() if serving is not None else None

    def _converge(self, d: Deployment, generation: int) -> None:
        step = next_step(d, self._route(d.name))
        if step is Step.UPDATE_PRIMARY:
            if not self.updater.run(self._update_for(d, Role.PRIMARY, generation)):
                return  # the old version (if any) serves on; the failure is reported
            step = next_step(d, self._route(d.name))
        if step is Step.UPDATE_CANDIDATE:
            self.updater.run(self._update_for(d, Role.CANDIDATE, generation))
        elif step is Step.SET_ROUTE:
            current, wanted = self.state.serving[d.name], wanted_route(d)
            if wanted.candidate is None:
                current.candidate = None
            current.traffic, current.shadow = wanted.traffic, wanted.shadow
            self._put(current)

    def _put(self, serving: Serving) -> None:
        self.state_file.save(self.state)
        try:
            self.serving.put(serving.name, deployment_body(serving))
        except ServingError as exc:
            log.error("could not change %s: %s", serving.name, exc)

    def _prune(self, wanted: set[str]) -> None:
        """Keep on disk what serves and the previous primary (for rollback); drop the rest.
        Report what serves and the newest failure of each wanted deployment."""
        from agent.package_store import StageError

        packages = {self.state.update.digest} if self.state.update else set()
        for name, serving in self.state.serving.items():
            kept = [v for v in (serving.primary, serving.candidate, serving.previous) if v]
            self.store.prune(name, {Path(v.directory) for v in kept})
            packages |= {v.digest for v in kept}
        for name in {s["name"] for s in self.state.statuses} - set(self.state.serving):
            self.store.prune(name, set())
        try:
            freed = self.store.prune_packages(packages)
        except (PackageError, StageError, OSError) as exc:  # housekeeping: next apply tries again
            log.warning("could not prune the package store: %s", exc)
        else:
            if freed:
                log.info("pruned the package store: %d bytes freed", freed)
        routes = {name: serving.route() for name, serving in self.state.serving.items()}
        self.state.statuses = kept_statuses(self.state.statuses, status_key, routes, wanted)

    # -- reporting ----------------------------------------------------------------

    def report(self) -> None:
        state = ReportedState(
            device_id=self.identity.device_id,
            applied_generation=self.state.applied_generation,
            deployments=tuple(
                DeploymentStatus(
                    name=s["name"], model=s["model"], version=s["version"],
                    state=UpdateState(s["state"]), since=parse_time(s["since"]),
                    error=(s["error"] or None) and s["error"][:MAX_TEXT], runtime=s["runtime"],
                    device=s["device"],
                )
                for s in self.state.statuses
            ),
            platform=self.platform,
            accelerators=self.accelerators,
            agent_version=self.agent_version,
            refusals=tuple(
                Refusal(r["generation"], Reason(r["reason"]), r["message"], parse_time(r["at"]))
                for r in self.state.refusals
            ),
            inventory={**self.facts, HUB_KEY_FACT: self.trust.key_id},
        )
        self.uplink.report(build_reported(state))

    def _measure(self) -> list[tuple[str, dict]]:
        process = self.serving.process
        points: list[tuple[str, dict]] = [("system", system_point(
            self.data_dir, process.pid if process else None, self.cpu,
            dropped=self.queue.dropped,
        ))]
        stats = []
        if self.state.serving:  # else no serving process to ask (nor http.client to hold)
            try:
                stats = self.serving.stats()
            except Exception:  # serving restarting: no inference numbers this round
                pass
        points += [("inference", values) for values in self.deltas.points(stats)]
        if self.watch is not None:
            points[0][1].update(self._container_values(self.watch))
        return points

    def _container_values(self, watch: ContainerWatch) -> dict[str, int | float]:
        """Container mode's part of the system point: the engine and its containers."""
        from agent.container.serving import ContainerServing

        assert isinstance(self.serving, ContainerServing)
        if watch.error is not None:
            return {"container_engine_up": 0}
        return {"container_engine_up": 1, **self.serving.measure()}
