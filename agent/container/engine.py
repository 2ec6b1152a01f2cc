"""The agent's container driver: package images run by an engine through the Docker API.

One `ContainerEngine` wraps a docker SDK client on the engine's socket
(DOCKER_HOST: dockerd, or podman's `podman system service`). It

- pulls an image by manifest digest with the device's registry credentials
  and checks the engine's image id is the config digest the signed package
  names (see `agent.container.images` for why that completes the check);
- runs a version as one container: host network with the scoring API on a
  private loopback port (bridges leave iptables state behind, and the agent
  fronts the device's one scoring address), the API key in the environment,
  a host directory at /run/edgefleet for the control socket, CPU and memory
  limits, a restart policy, labels naming deployment, version and package,
  and bounded logs;
- finds its own containers by label (after a kill -9 of the agent, to adopt
  or remove them), and reports each one's state, exit code, restarts,
  CPU and memory, and last log lines.

Every engine failure is one `EngineError` line; `transient` ones (engine
down or unreachable) are worth retrying with backoff.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker  # type: ignore[import-untyped]  # docker 7 ships no types
import docker.errors  # type: ignore[import-untyped]
import requests.exceptions
from docker.models.containers import Container  # type: ignore[import-untyped]
from docker.types import DeviceRequest, LogConfig  # type: ignore[import-untyped]

LABEL = "dev.edgefleet"
MANAGED = f"{LABEL}.managed"
DEPLOYMENT = f"{LABEL}.deployment"
VERSION = f"{LABEL}.version"
PACKAGE = f"{LABEL}.package"
OWNER = f"{LABEL}.owner"  # the device (agent) that started it: agents may share an engine
PORT = f"{LABEL}.port"  # its private scoring port: a restarted agent adopts it by that
CONTROL_DIR = "/run/edgefleet"
CONTROL_SOCKET = "control.sock"
API_KEY_ENV = "EDGEFLEET_SERVE_API_KEY"
ENDED = frozenset({"exited", "dead"})
STOP_SECONDS = 30  # the serving process finishes in-flight requests on SIGTERM
# Docker 20.10's API, which podman 4's compatible API serves too; fixed so that making a
# client asks the engine nothing.
API_VERSION = "1.41"
DEFAULT_HOST = "unix:///var/run/docker.sock"


class EngineError(Exception):
    """The engine refused or failed; TRANSIENT when it is down or unreachable."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Limits:
    """Resources of one container, from the deployment. None: no limit."""

    cpus: float | None = None
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.cpus is not None and not self.cpus > 0:
            raise ValueError(f"cpus must be above 0, not {self.cpus}")
        if self.memory_bytes is not None and self.memory_bytes < 6 * 1024 * 1024:
            raise ValueError(
                f"memory must be at least 6 MiB (engines refuse less), not {self.memory_bytes}"
            )


@dataclass(frozen=True)
class RunSpec:
    """One version of a deployment, as a container."""

    deployment: str
    version: int | str
    package: str  # the signed package index digest
    image: str  # the engine's image id (the config digest)
    port: int  # scoring API on 127.0.0.1:PORT
    api_key: str
    control_dir: Path  # host directory mounted at /run/edgefleet (the control socket)
    limits: Limits = Limits()
    restart_retries: int = 3  # on-failure restarts before the container stays exited
    # NVIDIA GPUs through the engine's device requests (the NVIDIA toolkit): a count, 0 none,
    # -1 every one.
    gpus: int = 0
    log_bytes: int = 1024 * 1024  # per log file; two are kept
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    owner: str = ""  # the device id of the agent that runs it, when agents share an engine

    @property
    def name(self) -> str:
        """Names the limits too (when there are any), so a version whose limits change
        gets a new container beside the old one, and the front switches between them."""
        limited = (self.limits.cpus, self.limits.memory_bytes, self.gpus)
        tag = "" if limited == (None, None, 0) else "-" + hashlib.sha256(
            repr(limited).encode()).hexdigest()[:6]
        return (
            f"edgefleet-{self.owner + '-' if self.owner else ''}{self.deployment}-{self.version}"
            f"-{self.package.removeprefix('sha256:')[:12]}{tag}"
        )


@dataclass(frozen=True)
class ContainerStatus:
    id: str
    name: str
    deployment: str
    version: str
    package: str
    port: int | None  # its private scoring port
    state: str  # created, running, restarting, exited, ...
    exit_code: int | None
    oom_killed: bool
    restarts: int
    error: str  # the engine's own error (e.g. the entrypoint could not start), or ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def ended(self) -> bool:
        """Exited for good: engines pass through other states (podman: stopped) while restarting."""
        return self.state in ENDED


@dataclass(frozen=True)
class Usage:
    cpu_percent: float  # of one CPU
    memory_bytes: int
    memory_limit_bytes: int | None


class ContainerEngine:
    def __init__(self, client: docker.DockerClient, socket_path: Path | None = None, *,
                 owner: str = "") -> None:
        self.client = client
        self.socket_path = socket_path  # the engine's unix socket, when it has one
        self.owner = owner  # set: only containers labelled with this owner are this agent's

    @classmethod
    def connect(cls, docker_host: str | None = None, *, timeout: float = 60,
                owner: str = "") -> ContainerEngine:
        """The engine at DOCKER_HOST (a unix:// URL), or at the DOCKER_HOST environment variable.

        Nothing is asked of the engine yet: an agent starts while its engine is down.
        """
        host = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        try:
            client = docker.DockerClient(base_url=host, timeout=int(timeout), version=API_VERSION)
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot use the container engine at {host}: {exc}") from None
        return cls(
            client, Path(host.removeprefix("unix://")) if host.startswith("unix://") else None,
            owner=owner,
        )

    def close(self) -> None:
        self.client.close()

    def describe(self) -> dict[str, str]:
        """Engine name and version, for the inventory: {"engine": "podman", "version": "4.3.1"}."""
        version = self._call("ask the engine's version", self.client.version)
        names = [c.get("Name", "") for c in version.get("Components") or []]
        engine = "podman" if any("podman" in n.lower() for n in names) else "docker"
        return {"engine": engine, "version": str(version.get("Version", ""))}

    # -- images ---------------------------------------------------------------

    def pull(self, registry: str, repository: str, manifest: str, config: str, *,
             username: str, password: str) -> str:
        """Pull REGISTRY/REPOSITORY@MANIFEST and return its image id, which must be CONFIG.

        REGISTRY is host:port of the hub's registry. The engine checks every
        blob of a pull by digest; a different id means the engine holds a
        different image under that digest, and it is refused.
        """
        reference = f"{registry}/{repository}"
        auth = {"username": username, "password": password}
        what = f"pull {reference}@{manifest}"
        try:
            progress = self._call(what, self.client.api.pull, reference, tag=manifest,
                                  auth_config=auth, stream=True, decode=True)
            # A failed pull is a line of the progress stream, not an HTTP error.
            for line in self._call(what, list, progress):
                if isinstance(line, dict) and line.get("error"):
                    said = " ".join(str(line["error"]).split())[:500]
                    raise EngineError(f"the engine could not pull {reference}@{manifest}: {said}")
        except EngineError as exc:
            if "x509" in str(exc) or "certificate" in str(exc):
                # Another try will not change whom the engine trusts.
                raise EngineError(f"{exc} (the engine does not trust the hub's CA for "
                                  f"{registry}: see --engine-certs-dir)") from None
            raise
        return self.check_image(registry, repository, manifest, config)

    def check_image(self, registry: str, repository: str, manifest: str, config: str) -> str:
        """The id of the image pulled as REGISTRY/REPOSITORY@MANIFEST, which must be CONFIG."""
        reference = f"{registry}/{repository}"
        image = self._call(f"inspect {reference}@{manifest}",
                           self.client.images.get, f"{reference}@{manifest}")
        if _digest(image.id) != config:
            raise EngineError(
                f"the engine's image for {reference}@{manifest} is {image.id}, not the signed "
                f"config {config}: refusing to run it"
            )
        return str(image.id)

    def remove_image(self, image: str) -> int | None:
        """Remove IMAGE; the bytes it took (0 if it was gone), None while a container uses it."""
        try:
            size = int(self._call(f"inspect image {image}", self.client.images.get,
                                  image).attrs.get("Size") or 0)
            self.client.images.remove(image, force=False)
        except EngineError as exc:
            if "not found" in str(exc):
                return 0
            raise
        except docker.errors.NotFound:
            return 0
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # still used by a container: kept until that is removed
                return None
            raise EngineError(f"cannot remove image {image}: {_explain(exc)}",
                              transient=_is_transient(exc)) from None
        return size

    # -- containers -----------------------------------------------------------

    def run(self, spec: RunSpec) -> ContainerStatus:
        """Start SPEC's container (replacing a stopped one of the same name)."""
        spec.control_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_named(spec.name)
        labels = {**spec.extra_labels, MANAGED: "1", DEPLOYMENT: spec.deployment,
                  VERSION: str(spec.version), PACKAGE: spec.package, PORT: str(spec.port),
                  **({OWNER: spec.owner} if spec.owner else {})}
        limits: dict[str, Any] = {}
        if spec.limits.cpus is not None:
            limits["nano_cpus"] = int(spec.limits.cpus * 1e9)
        if spec.gpus:
            limits["device_requests"] = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
        if spec.limits.memory_bytes is not None:
            # Equal to the memory limit: no swap on top, so an OOM shows as an OOM.
            limits.update(
                mem_limit=spec.limits.memory_bytes, memswap_limit=spec.limits.memory_bytes
            )
        try:
            container = self._call(
                f"start {spec.name}", self.client.containers.run, spec.image,
                command=["--host", "127.0.0.1", "--port", str(spec.port),
                         "--control-socket", f"{CONTROL_DIR}/{CONTROL_SOCKET}"],
                name=spec.name, detach=True, network_mode="host", labels=labels,
                environment={API_KEY_ENV: spec.api_key},
                volumes={str(spec.control_dir): {"bind": CONTROL_DIR, "mode": "rw"}},
                restart_policy={"Name": "on-failure",
                                "MaximumRetryCount": spec.restart_retries},
                log_config=LogConfig(type="json-file",
                                     config={"max-size": str(spec.log_bytes), "max-file": "2"}),
                stop_signal="SIGTERM", **limits,
            )
        except EngineError:
            try:  # created but not started (a refused device request...): not left behind
                self._remove_named(spec.name)
            except EngineError:
                pass
            raise
        if spec.gpus and not (container.attrs.get("HostConfig") or {}).get("DeviceRequests"):
            # podman 4's Docker API takes device requests and drops them: never run on the
            # CPU while the deployment counts on a GPU.
            self._remove_named(spec.name)
            raise EngineError("the engine dropped the GPU device request (podman's Docker API "
                              "does not pass them on): use dockerd with the NVIDIA container "
                              "toolkit for GPUs")
        return self.status(container.id)

    def wait_control(self, spec: RunSpec, timeout: float = 60) -> None:
        """Until the serving process in SPEC's container accepts control connections.

        EngineError with the container's last log lines if it exits first or
        TIMEOUT passes: the reason a rollback reports.
        """
        path = spec.control_dir / CONTROL_SOCKET
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
            try:
                status = self.status(spec.name)
            except EngineError as exc:
                # podman fails an inspect racing a dying container ("read /proc/PID/cgroup").
                if not exc.transient or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            if status.ended:
                raise EngineError(f"{spec.name} {_ended(status)} before serving; last log lines:\n"
                                  f"{self.logs(spec.name)}")
            if time.monotonic() > deadline:
                raise EngineError(f"{spec.name} did not open its control socket in {timeout:.0f}s; "
                                  f"last log lines:\n{self.logs(spec.name)}")
            time.sleep(0.1)

    def stop(self, name: str, *, timeout: int = STOP_SECONDS) -> None:
        """Stop (SIGTERM, then SIGKILL after TIMEOUT) and remove the container NAME."""
        try:
            container = self.client.containers.get(name)
            container.stop(timeout=timeout)
            container.remove(force=True)
        except docker.errors.NotFound:
            return
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"cannot stop {name}: {_explain(exc)}",
                              transient=_is_transient(exc)) from None

    def find(self, deployment: str | None = None) -> list[ContainerStatus]:
        """The agent's own containers (by label), of DEPLOYMENT or all, oldest first."""
        labels = [f"{MANAGED}=1"] + ([f"{DEPLOYMENT}={deployment}"] if deployment else []) \
            + ([f"{OWNER}={self.owner}"] if self.owner else [])
        listed = self._call("list containers", self.client.api.containers,
                            all=True, filters={"label": labels})
        found = []
        for summary in listed:
            try:
                found.append(self.status(summary["Id"]))
            except EngineError as exc:
                # Removed between the list and its inspection (podman answers 500 for that).
                if "no such container" not in str(exc) and "not found" not in str(exc):
                    raise
        return sorted(found, key=lambda s: s.name)

    def prune(self, keep: Collection[str]) -> list[str]:
        """Stop and remove the agent's containers not named in KEEP; the names removed.

        After a restart (even a kill -9) the agent keeps the containers of the
        versions its saved state serves and ends every other one it started.
        """
        removed = []
        for found in self.find():
            if found.name not in keep:
                self.stop(found.name)
                removed.append(found.name)
        return removed

    def status(self, name: str) -> ContainerStatus:
        container = self._call(f"inspect {name}", self.client.containers.get, name)
        return _status(container)

    def usage(self, name: str) -> Usage:
        """CPU (over the engine's sampling interval) and memory of the running container NAME."""
        container = self._call(f"inspect {name}", self.client.containers.get, name)
        stats = self._call(f"read the stats of {name}", container.stats, stream=False)
        cpu, before = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
        used = (
            _nested(cpu, "cpu_usage", "total_usage") - _nested(before, "cpu_usage", "total_usage")
        )
        system = int(cpu.get("system_cpu_usage") or 0) - int(before.get("system_cpu_usage") or 0)
        cpus = int(cpu.get("online_cpus") or 1)
        memory = stats.get("memory_stats") or {}
        inactive = int((memory.get("stats") or {}).get("total_inactive_file") or 0)
        limit = int(memory.get("limit") or 0)
        return Usage(
            cpu_percent=round(100.0 * used / system * cpus, 2) if used > 0 and system > 0 else 0.0,
            memory_bytes=max(0, int(memory.get("usage") or 0) - inactive),
            # Without a limit engines report the host's memory (or an absurd number).
            memory_limit_bytes=limit if 0 < limit < 2**62 else None,
        )

    def logs(self, name: str, lines: int = 20) -> str:
        try:
            container = self.client.containers.get(name)
            return str(container.logs(tail=lines).decode("utf-8", "replace").rstrip())
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            return f"(no logs: {_explain(exc)})"

    # -- helpers --------------------------------------------------------------

    def _remove_named(self, name: str) -> None:
        try:
            self.client.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"cannot remove the old {name}: {_explain(exc)}",
                              transient=_is_transient(exc)) from None

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        if self.socket_path is not None and not self.socket_path.exists():
            # Said plainly, and without docker-py's connection attempt (it leaks the socket).
            raise EngineError(f"cannot {what}: the engine is not running (no socket "
                              f"{self.socket_path})", transient=True)
        try:
            return function(*args, **kwargs)
        except docker.errors.NotFound as exc:
            raise EngineError(f"cannot {what}: not found ({_explain(exc)})") from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"cannot {what}: {_explain(exc)}",
                              transient=_is_transient(exc)) from None


def _status(container: Container) -> ContainerStatus:
    attrs = container.attrs
    state = attrs.get("State") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    status = str(state.get("Status") or "unknown")
    exit_code = state.get("ExitCode")
    return ContainerStatus(
        id=str(attrs.get("Id", container.id)),
        name=str(attrs.get("Name", "")).lstrip("/"),
        deployment=labels.get(DEPLOYMENT, ""),
        version=labels.get(VERSION, ""),
        package=labels.get(PACKAGE, ""),
        port=int(labels[PORT]) if str(labels.get(PORT, "")).isdigit() else None,
        state=status,
        exit_code=int(exit_code) if status in ENDED and exit_code is not None else None,
        oom_killed=bool(state.get("OOMKilled")),
        restarts=int(attrs.get("RestartCount") or 0),
        error=str(state.get("Error") or ""),
    )


def _ended(status: ContainerStatus) -> str:
    if status.oom_killed:
        return "ran out of memory (OOM-killed)"
    if status.exit_code == 137:
        # podman on cgroup v1 does not report OOMKilled; SIGKILL from nobody else is the OOM killer.
        return "was killed (code 137: out of memory at its limit, or SIGKILL)"
    if status.error:
        return f"could not start ({status.error})"
    return f"exited with code {status.exit_code}"


def _digest(image_id: str) -> str:
    return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"


def _nested(mapping: Mapping[str, Any], *keys: str) -> int:
    value: Any = mapping
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return int(value or 0)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, requests.exceptions.RequestException):
        return True
    if isinstance(exc, docker.errors.APIError):
        return exc.status_code is None or exc.status_code >= 500
    return "Connection" in str(exc)


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        text = str(exc.explanation)
    else:
        text = str(exc)
    return " ".join(text.split())[:500]
