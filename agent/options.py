"""The agent's options, each declared once: its default and what it means.

`edgefleet agent run` (agent/cli.py), `edgefleet serve` (agent/serving/cli.py),
the simulator (agent/sim) and the dataclasses that carry the options through
the code (AgentOptions, ServingOptions, ServeOptions, SimOptions) all read
their defaults and help texts here, so a changed default changes everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Option(Generic[T]):
    default: T
    help: str


SERVE_HOST: Option[str] = Option(
    "127.0.0.1", "Address of the local scoring API (0.0.0.0 to serve the network).")
SERVE_PORT: Option[int] = Option(8500, "Port of the local scoring API.")
MAX_CONCURRENCY: Option[int] = Option(
    2, "Inferences the scoring API runs at once (one worker thread each).")
MAX_BODY_BYTES: Option[int] = Option(
    32 << 20, "Largest scoring request body read, in bytes; larger ones get 413. Each running "
    "inference holds one body, so memory is bounded by this times --max-concurrency; the "
    "JSON part of a body may have 8 MiB (parsed JSON takes ~27 times its size).")
MAX_QUEUE: Option[int] = Option(
    128, "Scoring requests that wait for a free slot; more get 503 with Retry-After.")
MAX_WAIT_MS: Option[int] = Option(
    500, "A scoring request whose estimated wait for a slot is longer gets 503 with Retry-After"
    " at once (0: no wait budget, only --max-queue).")
SERVE_GRPC_PORT: Option[int | None] = Option(
    None, "Port of the local scoring API over gRPC (Open Inference Protocol); off unless given.")
SERVE_START_TIMEOUT: Option[float] = Option(
    300.0, "Seconds the serving process may take to answer once started (its imports of the "
    "runtimes: ~1 s on a PC, minutes on an emulated or slow CPU); one that exits is noticed at "
    "once, this bounds one that hangs.")
SHADOW_CONCURRENCY: Option[int] = Option(
    1, "Shadow copies running at once; copies beyond it are dropped and counted.")
TELEMETRY_INTERVAL: Option[float] = Option(10.0, "Seconds between telemetry measurements.")
TELEMETRY_QUEUE_POINTS: Option[int] = Option(
    50_000, "Telemetry points kept on disk while offline; the oldest go first.")
MODE: Option[str] = Option(
    "native", "native: models run in the agent's serving process; container: each version runs "
    "as a container of its package image (Docker API: dockerd or podman), behind the same "
    "scoring address; kubernetes: this cluster namespace is the device (see the Kubernetes "
    "options) [env EDGEFLEET_AGENT_MODE].")
DOCKER_HOST: Option[str | None] = Option(
    None, "Container mode: the engine's socket, e.g. unix:///run/podman/podman.sock "
    "[default: $DOCKER_HOST, else unix:///var/run/docker.sock].")
ENGINE_CERTS_DIR: Option[str] = Option(
    "auto", "Container mode: where the agent installs the hub's pinned CA so the engine's pulls "
    "trust it, as DIR/HOST:PORT/ca.crt. auto: the engine's own (/etc/containers/certs.d for "
    "podman, /etc/docker/certs.d for dockerd; needs root); off: the engine is set up to trust "
    "the hub by other means.")
CONTAINER_CPUS: Option[float | None] = Option(None, "Container mode: CPUs each container may use.")
CONTAINER_MEMORY_MB: Option[int | None] = Option(
    None, "Container mode: memory limit of each container in MiB (no swap on top).")
