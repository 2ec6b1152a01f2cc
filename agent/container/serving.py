"""Container mode's serving side: the front at the device's address, one container per version.

`ContainerServing` is what the update state machine (agent/updates.py) and
the daemon drive in container mode, with the same calls as native mode's
serving process. The device's scoring address stays the agent's own serving
process (the front); every version runs in its own container on a private
loopback port, and the front proxies to it (agent/serving/upstream.py).

A PUT of a deployment therefore

1. makes sure each of its versions has a running container, adopting one
   that is already running under the version's name (after an agent
   restart) or starting one from the version's image, waits for its control
   socket and loads the version in it (reporting the container's exit code,
   OOM and last log lines if it dies first);
2. puts the deployment on the front with each version as an upstream: the
   front connects, self-tests where asked, and swaps the route in one step;
3. waits until the versions the front dropped have finished their in-flight
   requests (the front's draining list) and removes their containers, and
   any other container of the deployment (an interrupted update's).

Engine failures become `ContainerError`s, a ServingError the state machine
rolls back on; `transient` ones (engine down) are worth another try.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from agent.container.engine import (
    CONTROL_SOCKET,
    ContainerEngine,
    ContainerStatus,
    EngineError,
    Limits,
    RunSpec,
)
from agent.serving.body import DeploymentBody, VersionBody
from agent.state import Installed
from agent.supervisor import ControlClient, ServingError, ServingProcess
from contract.settings import GPU

log = logging.getLogger("edgefleet.agent")
T = TypeVar("T")
START_SECONDS = 120.0  # container start to control socket: 3.5-4.3 s measured, loaded hosts more
DRAIN_SECONDS = 30.0


class ContainerError(ServingError):
    """A container could not be started, loaded or removed; TRANSIENT when the engine is down."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ContainerServing:
    def __init__(self, front: ServingProcess, engine: ContainerEngine,
                 installed: Callable[[str, str], Installed | None], *, data_dir: Path,
                 api_key_file: Path, limits: Limits | None = None, gpus: bool = False) -> None:
        """INSTALLED finds the staged version of a deployment by (name, version). LIMITS and
        GPUS (every GPU: the inventory found one) are the defaults for a deployment whose
        settings do not say."""
        self.front = front
        self.engine = engine
        self.installed = installed
        self.runs_dir = data_dir / "containers"
        self.api_key_file = api_key_file
        self.limits = limits or Limits()
        self.gpus = gpus

    # -- the front: supervised by the daemon as the native serving process is ----

    @property
    def process(self) -> Any:
        return self.front.process

    def start(self) -> None:
        self.front.start()

    def stop(self) -> None:
        self.front.stop()  # containers keep running: a restarted agent adopts them

    def crashed(self) -> bool:
        return self.front.crashed()

    def restart(self) -> None:
        self.front.restart()

    def stats(self) -> Any:
        return self.front.stats()

    # -- ServingControl -----------------------------------------------------------

    def put(self, name: str, body: DeploymentBody) -> dict[str, Any]:
        versions = [body.primary] + ([body.candidate] if body.candidate else [])
        specs, fronted, inside = [], [], {}
        for version in versions:
            spec, described = self._ensure(name, version)
            specs.append(spec)
            inside[version.version] = described
            # Batching happens in the container, where the model runs; the front proxies.
            fronted.append(replace(version, batching=None, upstream=(
                f"http://127.0.0.1:{spec.port}/v2/models/{name}/versions/{version.version}")))
        answer: dict[str, Any] = self.front.put(name, DeploymentBody(
            fronted[0], fronted[1] if len(fronted) > 1 else None, body.traffic, body.shadow))
        for role in ("primary", "candidate"):
            described = answer["deployment"].get(role)
            if described:  # what the model runs on inside its container, not "container"
                container = inside[described["version"]]
                described.update(runtime=container.get("runtime"), device=container.get("device"))
        self._remove_others(name, keep={spec.name for spec in specs})
        return answer

    def delete(self, name: str) -> Any:
        try:
            return self.front.delete(name)
        finally:
            self._remove_others(name, keep=set())

    def self_test(self, name: str, version: str, sample: Any) -> Any:
        return self.front.self_test(name, version, sample)  # through the front and the proxy

    # -- containers ---------------------------------------------------------------

    def containers(self) -> list[ContainerStatus]:
        """The agent's containers; ContainerError if the engine cannot say."""
        return self._engine(self.engine.find)

    def measure(self) -> dict[str, int | float]:
        """Totals over the agent's containers for telemetry: running, restarts, CPU (percent
        of one CPU) and memory from the engine's stats. Empty if the engine cannot say."""
        try:
            found = self.engine.find()
            running = [c for c in found if c.running]
            usage = [self.engine.usage(c.name) for c in running]
        except EngineError:
            return {}
        return {
            "containers": len(found),
            "containers_running": len(running),
            "container_restarts": sum(c.restarts for c in found),
            "container_cpu_percent": round(sum(u.cpu_percent for u in usage), 2),
            "container_memory_bytes": sum(u.memory_bytes for u in usage),
        }

    def keep_only(self, names: set[str]) -> list[str]:
        """Remove every container of the agent's but NAMES (after a restart: orphans)."""
        return self._engine(lambda: self.engine.prune(names))

    def name_of(self, name: str, installed: Installed) -> str:
        return self.run_spec(name, installed, port=0).name

    def run_spec(self, name: str, installed: Installed, port: int) -> RunSpec:
        """The container INSTALLED runs as: its deployment's limits and GPUs, where its
        settings give them, else the agent's (--container-cpus, --container-memory-mb)."""
        if installed.image is None:
            raise ContainerError(f"{name} version {installed.version} has no container image "
                                 "(staged by an agent in native mode): deploy it again")
        wanted = installed.deployment_settings.resources
        cpus = None if wanted.cpu_millis is None else wanted.cpu_millis / 1000
        limits = Limits(cpus=self.limits.cpus if cpus is None else cpus,
                        memory_bytes=(self.limits.memory_bytes if wanted.memory_bytes is None
                                      else wanted.memory_bytes))
        gpus = (-1 if self.gpus else 0) if wanted.gpus is None else wanted.gpus
        spec = RunSpec(deployment=name, version=installed.version, package=installed.digest,
                       image=installed.image, port=port, api_key=self._api_key(),
                       control_dir=Path(), limits=limits, owner=self.engine.owner,
                       gpus=gpus)
        # Short: a unix socket path must fit in 108 bytes.
        short = hashlib.sha256(spec.name.encode()).hexdigest()[:12]
        return replace(spec, control_dir=self.runs_dir / short)

    def _ensure(self, name: str, version: VersionBody) -> tuple[RunSpec, dict[str, Any]]:
        """A running container of VERSION with the version loaded in it: its spec and the
        container's own description of the loaded version."""
        installed = self.installed(name, version.version)
        if installed is None:
            raise ContainerError(f"{name} version {version.version} is not staged")
        others = [f"{kind}={count}" for kind, count
                  in installed.deployment_settings.resources.accelerators if kind != GPU and count]
        if others:
            raise ContainerError(f"container mode gives containers NVIDIA GPUs ({GPU}) only, "
                                 f"not {', '.join(others)}: deploy it to a Kubernetes target")
        wanted = self.run_spec(name, installed, port=0)
        found = next((c for c in self.containers() if c.name == wanted.name), None)
        if found is not None and found.running and found.port:
            spec = replace(wanted, port=found.port)  # adopted: it kept running without us
        else:
            spec = replace(wanted, port=free_port())
            self._engine(lambda: self.engine.run(spec))
            log.info("started %s on 127.0.0.1:%d", spec.name, spec.port)
        self._engine(lambda: self.engine.wait_control(
            spec, timeout=START_SECONDS))
        client = ControlClient(spec.control_dir / CONTROL_SOCKET)
        try:
            answer = client.put(name, DeploymentBody(replace(version, upstream=None)))
        except (ServingError, OSError) as exc:
            raise ContainerError(f"{spec.name} did not load version {version.version}: {exc}; "
                                 f"last log lines:\n{self.engine.logs(spec.name)}") from None
        return spec, dict(answer["deployment"]["primary"])

    def _remove_others(self, name: str, keep: set[str]) -> None:
        """Remove NAME's containers not in KEEP once the front has drained them."""
        stale = [c for c in self.containers() if c.deployment == name and c.name not in keep]
        if not stale:
            return
        versions = {c.version for c in stale}
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            try:
                draining = self.front.state()["draining"]
            except (ServingError, OSError):
                break  # the front is gone: nothing in flight through it
            if not any(d["name"] == name and d["version"] in versions for d in draining):
                break
            time.sleep(0.05)
        for container in stale:
            self._stop(container.name)
            log.info("removed %s", container.name)

    def _stop(self, name: str) -> None:
        self._engine(lambda: self.engine.stop(name))

    def _api_key(self) -> str:
        return self.api_key_file.read_text().strip()

    def _engine(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except EngineError as exc:
            raise ContainerError(str(exc), transient=exc.transient) from None
