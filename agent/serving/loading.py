"""What the agent asks the server to load, and the one call that loads it.

Everything that touches `agent.runtimes` from the serving process goes
through `load`, so the choice of runtime (by the device's accelerator
preferences) lives in one place. A version with an `upstream` (container
mode) is not loaded here: `load` connects to it (agent/serving/upstream.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import runtimes
from agent.runtimes.base import LoadedModel, LoadOptions
from agent.serving.body import Batching


@dataclass(frozen=True)
class VersionSpec:
    version: str
    model_dir: Path
    entrypoint: str  # the model file, relative to model_dir
    framework: str  # "onnx" | "openvino" | "tflite"
    options: LoadOptions = field(default_factory=LoadOptions)
    batching: Batching | None = None
    upstream: str | None = None  # served by a container on loopback (see body.py)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model_dir": str(self.model_dir),
            "entrypoint": self.entrypoint,
            "framework": self.framework,
            "runtime": {
                "prefer": list(self.options.prefer),
                "precision": self.options.precision,
                "threads": self.options.threads,
                "extra": dict(self.options.extra),
            },
            "batching": None if self.batching is None else {
                "max_batch_size": self.batching.max_batch_size,
                "max_delay_ms": self.batching.max_delay_ms,
            },
            **({"upstream": self.upstream} if self.upstream else {}),
        }


def load(spec: VersionSpec, upstream_key: str | None = None) -> LoadedModel:
    """Load SPEC on the best runtime and device it allows, or connect to its upstream with
    UPSTREAM_KEY as the API key; blocks, so call it off the event loop."""
    if spec.upstream is not None:
        from agent.serving.upstream import connect

        return connect(spec.upstream, upstream_key)
    return runtimes.load_best(spec.model_dir, spec.entrypoint, spec.framework, spec.options)
