"""The one interface every model runtime implements.

A Runtime loads a model directory into a LoadedModel; a LoadedModel runs
inference on named numpy arrays. The serving process only ever talks to
these two shapes, so adding a runtime means adding one module beside this.

Accelerator preferences are strings "runtime:DEVICE", in order, e.g.
["openvino:NPU", "openvino:GPU", "onnxruntime:CUDA", "onnxruntime:CPU"]; a
runtime takes the entries that name it and falls back to CPU. What a model
really runs on is read back from the runtime after loading (`device`), since
some runtimes fall back silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from packager.modelfile import Signature


class ModelRuntimeError(Exception):
    """A model could not be loaded or run; the message says what and why."""


@dataclass(frozen=True)
class LoadOptions:
    prefer: Sequence[str] = ()          # "runtime:DEVICE" entries, best first
    precision: str | None = None        # e.g. "f32" to keep OpenVINO's CPU off bfloat16
    threads: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


class LoadedModel(Protocol):
    runtime: str                        # "onnxruntime" | "openvino" | "litert"
    device: str                         # what it actually runs on, e.g. "CPU", "CUDA", "GPU.0"
    signature: Signature

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    name: str

    def available(self) -> bool: ...

    def accelerators(self) -> list[str]: ...

    def load(self, model_dir: Path, entrypoint: str, options: LoadOptions) -> LoadedModel: ...
