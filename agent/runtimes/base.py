"""The one interface every model runtime implements.

A Runtime loads a model directory into a LoadedModel; a LoadedModel runs
inference on named numpy arrays. The serving process only ever talks to
these two shapes, so adding a runtime means adding one module beside this.

Accelerator preferences are strings "runtime:DEVICE", in order, e.g.
["openvino:NPU", "openvino:GPU", "onnxruntime:CUDA", "onnxruntime:CPU"]; a
runtime takes the entries that name it and falls back to CPU. What a model
really runs on is read back from the runtime after loading (`device`), since
some runtimes fall back silently.

Every LoadedModel's `infer` may be called from several threads at once; each
runtime module says how it makes that safe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from contract.tensors import NUMPY_DTYPES, Signature, TensorSpec, v2_datatype_of_numpy


class ModelRuntimeError(Exception):
    """A model could not be loaded or run; the message says what and why."""


@dataclass(frozen=True)
class LoadOptions:
    prefer: Sequence[str] = ()  # "runtime:DEVICE" entries, best first
    precision: str | None = None  # e.g. "f32" to keep OpenVINO's CPU off bfloat16
    threads: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    # False: load only on one of this runtime's preferred devices, or raise
    # ModelRuntimeError saying why; load_best uses it to walk preferences across runtimes.
    fallback: bool = True

    def __post_init__(self) -> None:
        for entry in self.prefer:
            runtime, _, device = entry.partition(":")
            if not runtime or not device:
                raise ValueError(
                    f"accelerator preference {entry!r} is not of the form runtime:DEVICE,"
                    " e.g. 'onnxruntime:CUDA' or 'openvino:NPU'"
                )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")


class LoadedModel(Protocol):
    runtime: str  # "onnxruntime" | "openvino" | "litert"
    device: str  # what it actually runs on, e.g. "CPU", "CUDA", "GPU.0"
    signature: Signature
    # Why the model is not on the first device preferred for it (None when it is,
    # or when nothing was preferred), e.g. "EdgeTPU: libedgetpu.so.1 cannot be opened".
    fallback_reason: str | None

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    name: str
    frameworks: tuple[str, ...]  # model formats it loads: "onnx", "openvino", "tflite"

    def available(self) -> bool: ...

    def version(self) -> str: ...

    def accelerators(self) -> list[str]: ...

    # accelerator ("openvino:GPU.0") -> what it is ("Intel(R) Arc(TM) Graphics"), for inventory
    def devices(self) -> dict[str, str]: ...

    def load(self, model_dir: Path, entrypoint: str, options: LoadOptions) -> LoadedModel: ...


# ---- helpers the runtimes share ---------------------------------------------


def importable(load: Callable[[], object]) -> bool:
    """Whether LOAD imports a runtime's library; a library whose native parts are missing
    or built for another CPU fails with OSError rather than ImportError."""
    try:
        load()
    except (ImportError, OSError):
        return False
    return True


def preferred_devices(options: LoadOptions, runtime: str) -> list[str]:
    """The DEVICE parts of OPTIONS.prefer entries that name RUNTIME, in order."""
    return [
        device
        for entry in options.prefer
        for name, _, device in [entry.partition(":")]
        if name == runtime
    ]


def no_preferred_device(runtime: str, reasons: Sequence[str]) -> ModelRuntimeError:
    """The error of a load with fallback=False that got none of its preferred devices;
    REASONS are "DEVICE: why" lines."""
    if not reasons:
        return ModelRuntimeError(f"{runtime}: no device preferred for it, and fallback is off")
    return ModelRuntimeError("; ".join(f"{runtime}:{reason}" for reason in reasons))


def model_file(model_dir: Path, entrypoint: str) -> Path:
    """The entrypoint's path; it must be a file inside MODEL_DIR."""
    root = model_dir.resolve()
    path = (root / entrypoint).resolve()
    if not path.is_relative_to(root):
        raise ModelRuntimeError(f"entrypoint {entrypoint!r} lies outside the model directory")
    if not path.is_file():
        raise ModelRuntimeError(f"model file {entrypoint!r} is missing from {model_dir}")
    return path


def tensor_spec(
    name: str, datatype: str | None, shape: Iterable[int], native_type: str
) -> TensorSpec:
    """A TensorSpec from what a runtime reports; DATATYPE is None when V2 has no name for
    NATIVE_TYPE, and the serving layer could never exchange that tensor."""
    if datatype is None:
        raise ModelRuntimeError(
            f"tensor {name!r} has type {native_type}, which the Open Inference Protocol cannot"
            " carry; export the model with plain numeric or string tensors"
        )
    return TensorSpec(name, datatype, tuple(shape))


@functools.cache
def datatype_of_dtype(dtype: np.dtype) -> str | None:
    """The V2 datatype of DTYPE, None if V2 has none. Cached: numpy works out
    `dtype.name` in Python on every access, a few microseconds per tensor."""
    return v2_datatype_of_numpy(dtype.name)


def check_inputs(signature: Signature, inputs: Mapping[str, np.ndarray]) -> None:
    """Raise ModelRuntimeError unless INPUTS are exactly the signature's inputs, with its
    datatypes and shapes (-1 matches any size; the empty shape means "not known", so any).

    Checked here, the same way for every runtime, because runtimes differ: OpenVINO
    silently casts float64 to float32, others fail with messages in their own terms.
    """
    expected = {spec.name: spec for spec in signature.inputs}
    if inputs.keys() != expected.keys():
        unknown = sorted(set(inputs) - set(expected))
        missing = sorted(set(expected) - set(inputs))
        problems = [f"unknown input {n!r}" for n in unknown] + [
            f"missing input {n!r}" for n in missing
        ]
        wanted = ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in signature.inputs)
        raise ModelRuntimeError(f"{'; '.join(problems)}; the model's inputs are: {wanted}")
    for name, array in inputs.items():
        spec = expected[name]
        if not isinstance(array, np.ndarray):
            raise ModelRuntimeError(
                f"input {name!r} is a {type(array).__name__}, not a numpy array"
            )
        if datatype_of_dtype(array.dtype) != spec.datatype:
            raise ModelRuntimeError(
                f"input {name!r} is {array.dtype.name}, but the model wants {spec.datatype}"
                f" ({NUMPY_DTYPES[spec.datatype]})"
            )
        if spec.shape and (
            len(array.shape) != len(spec.shape)
            or any(want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True))
        ):
            raise ModelRuntimeError(
                f"input {name!r} has shape {list(array.shape)}, but the model wants"
                f" {list(spec.shape)} (-1: any size)"
            )
