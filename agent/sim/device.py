"""One simulated device: the real protocol, with models that exist only as numbers.

A `SimDevice` behaves as `agent.daemon.Agent` does on the wire. It logs in
with its own identity (client id and user = its device id, clean_session
False, last will "offline" retained on its status topic, birth "online"),
subscribes to its desired and commands topics, checks each desired state
with `agent.protocol.verify_desired` against the hub key pinned at
enrollment, hands each command to the agent's own `agent.commands.Commands`
(its checks, refusals, saved ids and answers over HTTPS), reports refusals
in `refusals`, decides what to update, unload and report with the agent's
own decisions (agent/decisions.py: a new version, or the same one with new
runtime preferences, is an update), moves each update through the states of
agent/updates.py (the previous version serving on until the new one has
passed its self-test) and sends sequence-numbered telemetry.

What is simulated: the download, load and self-test (each state takes
`step_latency`; `fail_rate` and `fail_versions` decide the self-test), and
the scoring load (`requests_per_second`, `error_rate`, `latency_ms`), and, for
a version whose desired state carries drift bins, its inputs and outputs
(agent/sim/inputs.py; `drift` shifts features), counted by the agent's own
sketch code. A profile command taken is answered `running`, then `failed`:
a simulated device has no runtime to measure with, and says so.

Each device is one task on the shared event loop (`run`), plus one while it
applies a desired state. The task measures every `telemetry_interval`
(also while offline, into a bounded queue, as the real agent does),
connects when it may, and sends what is waiting: the newest reported state,
then the queued telemetry. Everything else only sets `_wake`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from agent import identity as identities
from agent import trust
from agent.commands import Commands
from agent.decisions import (
    Role,
    Route,
    Running,
    Step,
    kept_statuses,
    next_step,
    recent_refusals,
    reports_refusal,
    still_serving,
    target,
    unloaded,
    wanted_route,
)
from agent.identity import Identity
from agent.mqtt import Message, MqttError
from agent.sim import inputs
from agent.sim.mqtt_lite import Client, ConnectOptions, parse_url
from agent.sim.options import SimOptions
from contract import keys
from contract.protocol import (
    MAX_TELEMETRY_POINTS,
    MAX_TEXT,
    OFFLINE,
    ONLINE,
    Command,
    Deployment,
    DeploymentStatus,
    DesiredState,
    Point,
    ProtocolError,
    ProtocolRefusal,
    Reason,
    Refusal,
    ReportedState,
    TelemetryBatch,
    UpdateState,
    build_reported,
    build_telemetry,
    commands_topic,
    desired_topic,
    device_subscriptions,
    parse_reported,
    reported_topic,
    rotation_chain,
    status_topic,
    telemetry_topic,
    verify_desired,
)
from contract.settings import Batching, Resources, Settings
from contract.signing import load_public_key
from contract.sketch import SketchSpec

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger("edgefleet.sim")
S = UpdateState

# The update path of agent/updates.py, up to the self-test that decides it.
TRYING: Final = (S.DOWNLOADING, S.VERIFYING, S.STAGED, S.STARTING, S.SELF_TEST)
UNDOING: Final = (S.FAILED, S.ROLLING_BACK)
LOADED: Final = frozenset({S.STARTING, S.SELF_TEST, S.SERVING})  # states with a runtime
QUEUE_POINTS: Final = 1000   # unsent points kept while offline; the oldest go first
# After a crash the saved sequence number may be behind what was sent; a
# restart continues this far beyond it so no number is used twice.
SEQ_MARGIN: Final = 100_000
TIMEOUT: Final = 10.0        # seconds for a CONNACK, SUBACK or PUBACK


@dataclass
class Slot:
    """What one deployment name serves."""

    model: str
    route: Route

    @classmethod
    def restore(cls, saved: dict[str, Any]) -> Slot:
        """A Slot from its `asdict`; ProtocolError if it is not one (an older sim's)."""
        try:
            r = saved["route"]
            primary, candidate = (
                Running(v["version"], v["digest"], tuple(v["prefer"]),
                        _settings(v.get("settings"))) if v else None
                for v in (r["primary"], r["candidate"]))
            if primary is None:
                raise TypeError("no primary")
            return cls(saved["model"], Route(primary, candidate, r["traffic"], r["shadow"]))
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"a saved deployment is not in this sim's format ({exc})") from None


def _settings(saved: dict[str, Any] | None) -> Settings:
    """A Running's settings from its `asdict` (none in a sim from before settings)."""
    if not saved:
        return Settings()
    r, b = saved["resources"], saved["batching"]
    return Settings(Resources(r["cpu_millis"], r["memory_bytes"],
                              tuple((name, count) for name, count in r["accelerators"])),
                    None if b is None else Batching(b["max_batch_size"], b["max_delay_ms"]))


def _status_key(item: tuple[tuple[str, int], DeploymentStatus]
                ) -> tuple[str, int, UpdateState]:
    """One of SimDevice.statuses' items as agent.decisions reads it."""
    (name, version), status = item
    return name, version, status.state


def _no_runtime(command: Command) -> list[dict[str, Any]]:
    """What a simulated device measures for a profile: nothing, and it says so."""
    raise RuntimeError("profiling is not supported on a simulated device (edgefleet sim): it "
                       f"has no runtime to measure {command.profile.model} with")


def _around(value: float) -> float:
    """VALUE +-50 %, so simulated devices do not act in lockstep."""
    return value * random.uniform(0.5, 1.5)


def _poisson_like(mean: float) -> int:
    """A count with the spread of a Poisson variable (normal approximation when large)."""
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(random.gauss(mean, math.sqrt(mean))))
    count, limit, product = 0, math.exp(-mean), random.random()
    while product > limit:
        count += 1
        product *= random.random()
    return count


def _binomial_like(n: int, p: float) -> int:
    if n <= 0 or p <= 0:
        return 0
    if n > 50:
        return min(n, max(0, round(random.gauss(n * p, math.sqrt(n * p * (1 - p))))))
    return sum(random.random() < p for _ in range(n))


class SimDevice:
    def __init__(self, identity: Identity, options: SimOptions,
                 connect_slots: asyncio.Semaphore,
                 on_connection: Callable[[SimDevice, bool], None] = lambda device, up: None,
                 *, number: int = 0) -> None:
        """NUMBER: the device's place in the fleet (sim-00012 is 12), which picks its
        broker when the sim names several."""
        self.identity = identity
        self.id = identity.device_id
        self.name = identity.name
        self.options = options
        self._slots = connect_slots
        self._on_connection = on_connection  # told of every connect (True) and loss (False)
        # As enrolled; rotations followed later are kept in memory, as all its state.
        self._trust = trust.load(options.data_dir / "devices" / identity.name, identity)
        self._public_key = load_public_key(self._trust.key)
        url = options.broker_for(number) or identity.mqtt_url
        self._broker = parse_url(url)
        self._tls = identities.mqtt_tls(options.data_dir / "devices" / identity.name, identity) \
            if url.startswith("mqtts://") else None
        status = status_topic(self.id)
        password = None if identity.mqtt_certificate else identity.mqtt_password
        self._connect_options = ConnectOptions(
            client_id=self.id, username=None if password is None else identity.mqtt_username,
            password=password, will=Message(status, OFFLINE, retain=True),
            clean_session=False, keepalive=options.keepalive)
        # What the device is and has, as reported.
        self.applied_generation = 0
        self.serving: dict[str, Slot] = {}
        # Deployment name -> its primary's drift bins, from the newest desired state.
        self.sketch_specs: dict[str, SketchSpec] = {}
        self._rng = np.random.default_rng(random.getrandbits(64))
        self.statuses: dict[tuple[str, int], DeploymentStatus] = {}
        self.refusals: list[Refusal] = []
        # Counters.
        self.sent = 0            # messages published and acknowledged
        self.received = 0        # messages received
        self.connects = 0        # successful logins
        self.drops = 0           # times it went offline ungracefully
        self.updates = 0         # updates run, whatever their outcome
        self.failed_updates = 0  # updates that ended rolled back
        self.telemetry_dropped = 0
        self.next_seq = 1
        # Machinery.
        self._client: Client | None = None
        self._queue: deque[Point] = deque()
        self._inbox: deque[bytes] = deque()
        self._updater: asyncio.Task[None] | None = None
        self._reported: bytes | None = None  # cached payload; None when the state changed
        self._report_sent = True
        self._wake = asyncio.Event()
        self._stopping = False
        self._offline_until = 0.0
        self._connected_since = 0.0

    @functools.cached_property
    def _commands(self) -> Commands:
        """The agent's command handling itself (only what a taken profile runs differs),
        made at the first command: a fleet of 100,000 rarely gets one."""
        return Commands(self.identity, self.options.data_dir / "devices" / self.name, self,
                        self._refuse, _no_runtime)

    # -- what tests and the fleet look at --------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    @property
    def updating(self) -> bool:
        return self._updater is not None and not self._updater.done()

    @property
    def hub_key(self) -> str:
        """The id of the hub key this device trusts now."""
        return self._trust.key_id

    @property
    def key(self) -> ec.EllipticCurvePublicKey:
        """The hub key this device trusts now (for `agent.commands.Trusted`)."""
        return self._public_key

    @property
    def retired(self) -> tuple[str, ...]:
        """The hub keys this device rotated away from (for `agent.commands.Trusted`)."""
        return self._trust.retired

    def versions(self) -> dict[str, int]:
        """Deployment name -> the version serving as its primary."""
        return {name: slot.route.primary.version for name, slot in self.serving.items()}

    def state_of(self, name: str, version: int) -> UpdateState | None:
        status = self.statuses.get((name, version))
        return status.state if status else None

    def go_offline(self, seconds: float) -> None:
        """Drop off the network for SECONDS without a DISCONNECT: the broker
        publishes the last will. Telemetry measured meanwhile is sent later."""
        self._offline_until = asyncio.get_running_loop().time() + seconds
        self.drops += 1
        if self._client is not None:
            self._client.abort()
        self._wake.set()

    # -- saved state -------------------------------------------------------------------

    def snapshot(self, *, final: bool) -> dict[str, Any]:
        """The state to keep across restarts. Unless FINAL (a clean stop), the
        sequence number leaves room for points measured after this snapshot."""
        return {
            "reported": self._reported_payload().decode(),
            "serving": {name: asdict(slot) for name, slot in self.serving.items()},
            "next_seq": self.next_seq if final else self.next_seq + SEQ_MARGIN,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Take back a `snapshot`; ProtocolError if its reported state no longer
        parses (saved by another protocol or sim version): then only the sequence
        number is taken, and the retained desired state brings the rest back."""
        self.next_seq = saved["next_seq"]  # first: numbers must never repeat, whatever follows
        reported = parse_reported(saved["reported"].encode(), device_id=self.id)
        serving = {name: Slot.restore(s) for name, s in saved["serving"].items()}
        self.applied_generation = reported.applied_generation
        self.statuses = {(d.name, d.version): d for d in reported.deployments}
        self.refusals = list(reported.refusals)
        self.serving = serving
        self._reported = None

    # -- the device's life ----------------------------------------------------------------

    async def run(self) -> None:
        """Live until `stop`: measure, stay connected, send; then say goodbye."""
        loop = asyncio.get_running_loop()
        o = self.options
        now = loop.time()
        next_measure = now + random.uniform(0, o.telemetry_interval)  # spread the fleet's ticks
        next_drop = now + random.expovariate(o.offline_rate / 60) if o.offline_rate else math.inf
        retry_at = now + random.uniform(0, o.connect_jitter)
        attempt = 0  # failed attempts in a row: how long the next backoff is
        was_connected = False
        while not self._stopping:
            self._wake.clear()
            now = loop.time()
            if now >= next_measure:
                self._measure()
                next_measure = now + o.telemetry_interval
            if now >= next_drop:
                self.go_offline(_around(o.offline_seconds))
                next_drop = now + random.expovariate(o.offline_rate / 60)
            if was_connected and self._client is None:
                # Only a connection that held for a while resets the backoff: two
                # devices sharing an identity would otherwise kick each other forever.
                if now - self._connected_since >= o.backoff.stable_after:
                    attempt = 0
                retry_at = now + o.backoff.delay(attempt)
                attempt += 1
                was_connected = False
            if self._client is None and now >= max(retry_at, self._offline_until):
                was_connected = await self._connect()
                if not was_connected:
                    retry_at = loop.time() + o.backoff.delay(attempt)
                    attempt += 1
            if self._client is not None:
                await self._send()
            wake_at = min(next_measure, next_drop)
            if self._client is None:
                wake_at = min(wake_at, max(retry_at, self._offline_until))
            try:
                async with asyncio.timeout_at(wake_at):
                    await self._wake.wait()
            except TimeoutError:
                pass
        await self._goodbye()

    def stop(self) -> None:
        """Ask `run` to finish: it publishes "offline" and disconnects cleanly."""
        self._stopping = True
        self._wake.set()

    async def _goodbye(self) -> None:
        if self._updater is not None:
            self._updater.cancel()
            await asyncio.gather(self._updater, return_exceptions=True)
        client = self._client
        if client is None:
            return
        try:
            await self._send(timeout=2.0)
            # A clean DISCONNECT does not fire the will: say it ourselves.
            await client.publish(Message(status_topic(self.id), OFFLINE, retain=True),
                                 timeout=2.0)
        except MqttError:
            pass  # offline already: the will or the next birth covers it
        await client.disconnect()

    # -- the connection -------------------------------------------------------------------

    async def _connect(self) -> bool:
        client = Client(*self._broker, self._connect_options, tls=self._tls,
                        on_message=self._received, on_close=lambda reason: self._lost(client))
        async with self._slots:
            try:
                await client.connect(timeout=TIMEOUT)
                await client.subscribe([(topic, 1) for topic in device_subscriptions(self.id)],
                                       timeout=TIMEOUT)
                await client.publish(Message(status_topic(self.id), ONLINE, retain=True),
                                     timeout=TIMEOUT)
            except MqttError as exc:
                log.debug("%s: cannot connect: %s", self.name, exc)
                client.abort()
                return False
        if not client.connected:
            return False
        self._client = client
        self._connected_since = asyncio.get_running_loop().time()
        self._report_sent = False  # the hub may have missed changes while we were away
        self.connects += 1
        self.sent += 1
        self._on_connection(self, True)
        return True

    def _lost(self, client: Client) -> None:
        if self._client is client:
            self._client = None
            self._on_connection(self, False)
            self._wake.set()

    def _received(self, message: Message) -> None:
        self.received += 1
        if message.topic == commands_topic(self.id):
            self._commands.handle(message.payload)  # a profile runs (fails) in its thread
            return
        if message.topic != desired_topic(self.id):
            return
        self._inbox.append(message.payload)
        if not self.updating:
            self._updater = asyncio.get_running_loop().create_task(self._apply_inbox())

    async def _send(self, *, timeout: float = TIMEOUT) -> None:
        """The newest reported state if the hub has not got it, then queued telemetry."""
        client = self._client
        if client is None:
            return
        try:
            if not self._report_sent:
                payload = self._reported_payload()
                await client.publish(Message(reported_topic(self.id), payload), timeout=timeout)
                self.sent += 1
                self._report_sent = self._reported is payload  # unchanged while we waited
            while self._queue:
                batch = TelemetryBatch(self.id, tuple(
                    self._queue[i] for i in range(min(len(self._queue), MAX_TELEMETRY_POINTS))))
                await client.publish(Message(telemetry_topic(self.id), build_telemetry(batch)),
                                     timeout=timeout)
                self.sent += 1
                while self._queue and self._queue[0].seq <= batch.seq_to:
                    self._queue.popleft()
        except MqttError as exc:
            log.debug("%s: not sent yet: %s", self.name, exc)

    # -- desired state --------------------------------------------------------------------

    async def _apply_inbox(self) -> None:
        while self._inbox:
            payload = self._inbox.popleft()
            try:
                self._follow(payload)
                desired = verify_desired(payload, public_key=self._public_key, device_id=self.id,
                                         last_generation=self.applied_generation,
                                         now=datetime.now(UTC), retired=self._trust.retired)
            except ProtocolRefusal as refusal:
                if reports_refusal(refusal):
                    self._refuse(refusal)
                continue
            await self._apply(desired)

    def _follow(self, payload: bytes) -> None:
        """The hub's key rotations in PAYLOAD, as the agent follows them (agent/trust.py)."""
        try:
            followed = keys.follow(self._trust, rotation_chain(payload))
        except keys.RotationError as exc:
            raise ProtocolRefusal(Reason.BAD_SIGNATURE, f"hub key: {exc}") from None
        if followed != self._trust:
            self._trust, self._public_key = followed, load_public_key(followed.key)
            self._changed()  # reported: the key it trusts

    def _refuse(self, refusal: ProtocolRefusal) -> None:
        log.info("%s refused: %s", self.name, refusal)
        self.refusals = recent_refusals(self.refusals, Refusal(
            refusal.generation, refusal.reason, refusal.message[:MAX_TEXT], datetime.now(UTC)))
        self._changed()

    async def _apply(self, desired: DesiredState) -> None:
        wanted = {d.name for d in desired.deployments}
        for deployment in desired.deployments:
            await self._converge(deployment)
        for name in unloaded(self.serving, wanted):
            del self.serving[name]
            self.sketch_specs.pop(name, None)
        self._prune(wanted)
        self.applied_generation = desired.generation
        self._changed()

    async def _converge(self, d: Deployment) -> None:
        if d.sketch is None:
            self.sketch_specs.pop(d.name, None)
        else:
            self.sketch_specs[d.name] = d.sketch
        slot = self.serving.get(d.name)
        step = next_step(d, slot.route if slot else None)
        if step is Step.UPDATE_PRIMARY:
            primary = target(d, Role.PRIMARY)
            if not await self._update(d.name, d.model, primary.version):
                return  # the old version (if any) serves on; the failure is reported
            slot = self.serving[d.name] = Slot(d.model, Route(primary.running()))
            step = next_step(d, slot.route)
        assert slot is not None  # serving: it was there, or its update has just succeeded
        if step is Step.UPDATE_CANDIDATE:
            candidate = target(d, Role.CANDIDATE)
            if await self._update(d.name, d.model, candidate.version):
                slot.route = Route(slot.route.primary, candidate.running(), candidate.traffic,
                                   candidate.shadow)
        elif step is Step.SET_ROUTE:
            slot.route = wanted_route(d)
        # Versions that no longer serve stop being reported as serving.
        self.statuses = dict(still_serving(list(self.statuses.items()), _status_key, d.name,
                                           slot.route))
        self._changed()

    async def _update(self, name: str, model: str, version: int) -> bool:
        """Move one version through the update states: True once it serves."""
        self.updates += 1
        for state in TRYING:
            self._set_status(name, model, version, state)
            await self._step()
        if (model, version) in self.options.fail_versions:
            error = f"self-test failed: {model}:{version} is set to fail (--fail-versions)"
        elif random.random() < self.options.fail_rate:
            error = "self-test failed: a simulated failure (--fail-rate)"
        else:
            self._set_status(name, model, version, S.SERVING)
            return True
        for state in UNDOING:
            self._set_status(name, model, version, state, error)
            await self._step()
        self._set_status(name, model, version, S.ROLLED_BACK, error)
        self.failed_updates += 1
        return False

    async def _step(self) -> None:
        if self.options.step_latency:
            await asyncio.sleep(_around(self.options.step_latency))

    def _set_status(self, name: str, model: str, version: int, state: UpdateState,
                    error: str | None = None) -> None:
        loaded = state in LOADED
        self.statuses.pop((name, version), None)  # re-inserted last: the newest
        self.statuses[name, version] = DeploymentStatus(
            name, model, version, state, datetime.now(UTC), error,
            runtime="onnxruntime" if loaded else None, device="CPU" if loaded else None)
        self._changed()

    def _prune(self, wanted: set[str]) -> None:
        routes = {name: slot.route for name, slot in self.serving.items()}
        self.statuses = dict(kept_statuses(list(self.statuses.items()), _status_key, routes,
                                           wanted))

    # -- reporting and telemetry --------------------------------------------------------

    def _changed(self) -> None:
        self._reported = None
        self._report_sent = False
        self._wake.set()

    def _reported_payload(self) -> bytes:
        if self._reported is None:
            self._reported = build_reported(ReportedState(
                device_id=self.id, applied_generation=self.applied_generation,
                deployments=tuple(self.statuses.values()), platform=self.options.platform,
                accelerators=self.options.accelerators, agent_version=self.options.agent_version,
                refusals=tuple(self.refusals),
                inventory={keys.HUB_KEY_FACT: self._trust.key_id}))
        return self._reported

    def _measure(self) -> None:
        at = datetime.now(UTC)
        points: list[tuple[str, dict[str, int | float | str]]] = [("system", {
            "cpu_percent": round(random.uniform(20, 60) if self.updating
                                 else random.uniform(2, 25), 1),
            "memory_percent": round(random.uniform(30, 50), 1),
            "memory_available_mb": round(random.uniform(800, 1200), 1),
            "disk_free_mb": round(random.uniform(9000, 10000), 1),
            "agent_rss_mb": round(random.uniform(40, 45), 1),
            "telemetry_dropped": self.telemetry_dropped,
        })]
        measured: list[tuple[str, dict[str, int | float | str], dict[str, list[int]]]] = [
            (kind, values, {}) for kind, values in points]
        measured += [("inference", values, sketches) for values, sketches in self._inference()]
        for kind, values, sketches in measured:
            if len(self._queue) >= QUEUE_POINTS:
                self._queue.popleft()
                self.telemetry_dropped += 1
            self._queue.append(Point(self.next_seq, at, kind, values,  # type: ignore[arg-type]
                                     sketches))
            self.next_seq += 1
        self._wake.set()

    def _inference(self) -> list[tuple[dict[str, int | float | str], dict[str, list[int]]]]:
        """One point per serving version, shaped like agent.telemetry.InferenceDeltas', with
        its drift sketches."""
        o = self.options
        points = []
        for name, slot in self.serving.items():
            requests = o.requests_per_second * o.telemetry_interval
            r = slot.route
            shares = [(r.primary.version, 1.0 if r.shadow else 1 - r.traffic / 100)]
            if r.candidate is not None:
                shares.append((r.candidate.version, r.traffic / 100))
            for version, share in shares:
                count = _poisson_like(requests * share)
                if count == 0:
                    continue
                errors = _binomial_like(count, o.error_rate(slot.model, version))
                mean = _around(o.latency_ms(slot.model, version))
                values: dict[str, int | float | str] = {
                    "deployment": name, "version": version, "count": count, "errors": errors}
                if count > errors:
                    values.update(mean_ms=round(mean, 3), p50_ms=round(mean * 0.9, 3),
                                  p95_ms=round(mean * 1.8, 3), p99_ms=round(mean * 2.5, 3))
                spec = self.sketch_specs.get(name)
                sketches = {}
                if spec is not None and version == r.primary.version and count > errors:
                    sketches = inputs.sketch(spec, count - errors, o.drift, self._rng)
                points.append((values, sketches))
        return points
