"""ONNX Runtime: an InferenceSession with execution providers in preference order.

Preferences name a provider by its short name, case-insensitively
("onnxruntime:CUDA", "onnxruntime:TensorRT", "onnxruntime:OpenVINO") or in
full ("onnxruntime:CUDAExecutionProvider"). Only providers this onnxruntime
build offers are passed, and CPU always comes last. A session whose CUDA
libraries or GPU are missing drops that provider without raising, so `device`
is read back from `session.get_providers()` after the session is created: it
is the provider with the highest priority that the session really holds
(operators that provider cannot run still go to CPU).

Concurrency: `InferenceSession.run` is thread-safe, so `infer` calls it
directly from any number of threads; one session serves them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.runtimes.base import (
    LoadOptions,
    ModelRuntimeError,
    check_inputs,
    importable,
    model_file,
    no_preferred_device,
    preferred_devices,
    tensor_spec,
)
from contract.runtimes import RUNTIMES
from contract.tensors import Signature, TensorSpec, v2_datatype_of_numpy

NAME = "onnxruntime"
CPU = "CPUExecutionProvider"
# Names people use for providers whose EP name says it differently; others are
# their EP name without the "ExecutionProvider" suffix ("CUDA", "OpenVINO", "CPU").
_SHORT_NAMES = {
    "TensorrtExecutionProvider": "TensorRT",
    "NvTensorRTRTXExecutionProvider": "TensorRT-RTX",
    "DmlExecutionProvider": "DirectML",
    "NnapiExecutionProvider": "NNAPI",
    "XnnpackExecutionProvider": "XNNPACK",
    "DnnlExecutionProvider": "DNNL",
}
# Forwards requests to a remote Azure endpoint; it runs nothing on this device.
_NOT_DEVICES = {"AzureExecutionProvider"}
# ONNX element types as onnxruntime spells them ("tensor(float)") where numpy says otherwise.
_NUMPY_NAMES = {"float": "float32", "double": "float64", "string": "object"}


def _ort() -> ModuleType:
    # Imported on use, so this module (and the registry) loads where onnxruntime is absent.
    return importlib.import_module("onnxruntime")


def short_name(provider: str) -> str:
    return _SHORT_NAMES.get(provider, provider.removesuffix("ExecutionProvider"))


class OnnxRuntime:
    name = NAME
    frameworks = RUNTIMES[NAME].frameworks

    def available(self) -> bool:
        return importable(_ort)

    def version(self) -> str:
        return str(_ort().__version__)

    def accelerators(self) -> list[str]:
        return list(self.devices())

    def devices(self) -> dict[str, str]:
        return {f"{NAME}:{short_name(p)}": p for p in _device_providers()}

    def load(self, model_dir: Path, entrypoint: str, options: LoadOptions) -> OnnxRuntimeModel:
        ort = _ort()
        path = model_file(model_dir, entrypoint)
        wanted = preferred_devices(options, NAME)
        requested, reasons = _requested_providers(wanted)
        if not options.fallback and not requested:
            raise no_preferred_device(NAME, reasons)
        session_options = ort.SessionOptions()
        if options.threads is not None:
            session_options.intra_op_num_threads = options.threads
        try:
            session = ort.InferenceSession(
                str(path),
                sess_options=session_options,
                providers=requested if CPU in requested else [*requested, CPU],
            )
        except Exception as e:  # onnxruntime's errors share no base class below Exception
            raise ModelRuntimeError(f"{NAME} cannot load {entrypoint}: {e}") from e
        held = session.get_providers()
        reasons += [
            f"{short_name(p)}: onnxruntime could not use it and fell back (see its log)"
            for p in requested
            if p not in held
        ]
        in_use = held[0]
        if not options.fallback and in_use not in requested:
            raise no_preferred_device(NAME, reasons)
        on_first_choice = not wanted or in_use == _provider_named(wanted[0], held)
        return OnnxRuntimeModel(
            session,
            device=short_name(in_use),
            signature=_signature(session),
            fallback_reason=None if on_first_choice else "; ".join(reasons),
        )


class OnnxRuntimeModel:
    runtime = NAME

    def __init__(
        self, session: Any, *, device: str, signature: Signature, fallback_reason: str | None
    ) -> None:
        self._session: Any = session
        self.device = device
        self.signature = signature
        self.fallback_reason = fallback_reason
        self._output_names = [spec.name for spec in signature.outputs]

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise ModelRuntimeError("the model is closed")
        check_inputs(self.signature, inputs)
        try:
            outputs = session.run(self._output_names, {k: _to_ort(k, v) for k, v in inputs.items()})
        except ModelRuntimeError:
            raise
        except Exception as e:  # see load(): no narrower base class to catch
            raise ModelRuntimeError(f"{NAME} failed to run the model: {e}") from e
        return {name: _from_ort(out) for name, out in zip(self._output_names, outputs, strict=True)}

    def close(self) -> None:
        # The session is freed once unreferenced; calls already running keep their reference.
        self._session = None


def _to_ort(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES tensors arrive as object arrays of bytes; onnxruntime's string
    tensors want str (it would turn b"hi" into the text "b'hi'")."""
    if array.dtype != object:
        return array
    try:
        return np.vectorize(
            lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object]
        )(array)
    except UnicodeDecodeError:
        raise ModelRuntimeError(
            f"input {name!r}: onnxruntime string tensors hold UTF-8 text; these bytes are not"
        ) from None


def _from_ort(array: np.ndarray) -> np.ndarray:
    """String outputs back as bytes, the V2 BYTES element type."""
    if array.dtype != object or array.size == 0:
        return array
    return np.vectorize(lambda v: v.encode("utf-8") if isinstance(v, str) else v,
                        otypes=[object])(array)


def _device_providers() -> list[str]:
    return [p for p in _ort().get_available_providers() if p not in _NOT_DEVICES]


def _provider_named(device: str, providers: Sequence[str]) -> str | None:
    """The provider among PROVIDERS that DEVICE names ("cuda", "TensorRT" or in full)."""
    for provider in providers:
        if device.lower() in (provider.lower(), short_name(provider).lower()):
            return provider
    return None


def _requested_providers(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """The providers to ask the session for, best first, and why wanted devices are left out."""
    offered = _device_providers()
    requested: list[str] = []
    reasons: list[str] = []
    for device in wanted:
        provider = _provider_named(device, offered)
        if provider is None:
            names = ", ".join(short_name(p) for p in offered)
            reasons.append(f"{device}: not in this onnxruntime build (it offers {names})")
        elif provider not in requested:
            requested.append(provider)
    if CPU in requested:
        # CPU runs every operator, so providers after it would never get any.
        del requested[requested.index(CPU) + 1 :]
    return requested, reasons


def _signature(session: Any) -> Signature:
    return Signature(
        tuple(_tensor(arg) for arg in session.get_inputs()),
        tuple(_tensor(arg) for arg in session.get_outputs()),
    )


def _tensor(arg: Any) -> TensorSpec:
    # arg.type is "tensor(float)" for tensors, "seq(...)" or "map(...)" for what V2 cannot carry.
    element = arg.type.removeprefix("tensor(").removesuffix(")")
    is_tensor = arg.type.startswith("tensor(")
    datatype = v2_datatype_of_numpy(_NUMPY_NAMES.get(element, element)) if is_tensor else None
    # A dimension is an int when fixed, a name ("batch") or None when dynamic; None: unknown rank.
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape or ()]
    return tensor_spec(arg.name, datatype, shape, arg.type)


RUNTIME = OnnxRuntime()
