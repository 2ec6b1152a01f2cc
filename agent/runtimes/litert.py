"""LiteRT (TensorFlow Lite): an Interpreter, with a hardware delegate when preferred and present.

The interpreter comes from `ai_edge_litert`, or from `tflite_runtime` on
devices whose images only ship that (older Coral and Raspberry Pi setups).
Preferences name delegates ("litert:EdgeTPU", "litert:GPU"); a delegate whose
library is missing or refuses to start is skipped, and the model runs on
CPU, saying so in `device` and `fallback_reason`.

Inputs whose batch (or any dynamic dimension) differs from the interpreter's
current shape are handled by resizing the input tensor and reallocating.

Concurrency: an Interpreter holds its tensors in itself and is not
thread-safe, so one lock serialises set_tensor / invoke / get_tensor. A
device running LiteRT usually has one accelerator that runs one call at a
time anyway.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Mapping
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

NAME = "litert"
# Delegate libraries as their vendors install them on Linux.
DELEGATES = {
    "EdgeTPU": "libedgetpu.so.1",  # Coral USB/PCIe/Dev Board (libedgetpu1-std or -max)
    "GPU": "libtensorflowlite_gpu_delegate.so",  # OpenCL/OpenGL GPU delegate built as a plugin
}


def _litert() -> tuple[str, ModuleType]:
    """The package in use and its interpreter module."""
    # Imported on use, so this module (and the registry) loads where LiteRT is absent.
    try:
        return "ai_edge_litert", importlib.import_module("ai_edge_litert.interpreter")
    except ImportError:
        return "tflite_runtime", importlib.import_module("tflite_runtime.interpreter")


def delegate_name(device: str) -> str:
    """The delegate DEVICE names, as DELEGATES spells it ("edgetpu" -> "EdgeTPU")."""
    for name in DELEGATES:
        if name.lower() == device.lower():
            return name
    raise ModelRuntimeError(f"{device}: no such LiteRT delegate (known: {', '.join(DELEGATES)})")


def load_delegate(name: str) -> Any:
    """The delegate called NAME (a DELEGATES key), or ModelRuntimeError saying why not."""
    library = DELEGATES[name]
    # Checked here first: load_delegate on a missing library, or on one that is not a
    # delegate, leaves a half-built Delegate whose __del__ raises an ignored AttributeError.
    try:
        handle = ctypes.CDLL(library)
    except OSError as e:
        raise ModelRuntimeError(f"{name}: {library} cannot be opened ({e})") from e
    if not hasattr(handle, "tflite_plugin_create_delegate"):
        raise ModelRuntimeError(f"{name}: {library} is not a TFLite delegate plugin")
    try:
        return _litert()[1].load_delegate(library)
    except (ValueError, RuntimeError) as e:  # the library is there but the device is not
        raise ModelRuntimeError(f"{name}: the delegate did not start ({e})") from e


class LiteRtRuntime:
    name = NAME
    frameworks = RUNTIMES[NAME].frameworks

    def available(self) -> bool:
        return importable(_litert)

    def version(self) -> str:
        package, _ = _litert()
        return f"{package} {importlib.import_module(package).__version__}"

    def accelerators(self) -> list[str]:
        return list(self.devices())

    def devices(self) -> dict[str, str]:
        found = {f"{NAME}:CPU": "built-in kernels"}
        for name, library in DELEGATES.items():
            try:
                load_delegate(name)
            except ModelRuntimeError:
                continue  # absent hardware is normal; only what loads is offered
            found[f"{NAME}:{name}"] = library
        return found

    def load(self, model_dir: Path, entrypoint: str, options: LoadOptions) -> LiteRtModel:
        path = model_file(model_dir, entrypoint)
        wanted = preferred_devices(options, NAME)
        reasons: list[str] = []
        for device in wanted:
            if device.upper() == "CPU":
                break
            try:
                name = delegate_name(device)
                delegate = load_delegate(name)
            except ModelRuntimeError as e:
                reasons.append(str(e))
                continue
            try:
                interpreter = _interpreter(path, options, delegate)
            except ModelRuntimeError as e:
                reasons.append(f"{name}: the model does not load with it: {e}")
                continue
            return LiteRtModel(interpreter, device=name, fallback_reason="; ".join(reasons) or None)
        if not options.fallback and not any(d.upper() == "CPU" for d in wanted):
            raise no_preferred_device(NAME, reasons)
        try:
            interpreter = _interpreter(path, options, None)
        except ModelRuntimeError as e:
            raise ModelRuntimeError(f"{NAME} cannot load {entrypoint}: {e}") from e
        return LiteRtModel(interpreter, device="CPU", fallback_reason="; ".join(reasons) or None)


def _interpreter(path: Path, options: LoadOptions, delegate: Any | None) -> Any:
    try:
        interpreter = _litert()[1].Interpreter(
            model_path=str(path),
            experimental_delegates=None if delegate is None else [delegate],
            num_threads=options.threads,
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise ModelRuntimeError(str(e)) from e
    return interpreter


class LiteRtModel:
    runtime = NAME

    def __init__(self, interpreter: Any, *, device: str, fallback_reason: str | None) -> None:
        self.device = device
        self.fallback_reason = fallback_reason
        self._interpreter: Any = interpreter
        self._lock = threading.Lock()
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        self.signature = Signature(
            tuple(_tensor(d) for d in inputs), tuple(_tensor(d) for d in outputs)
        )
        self._input_index = {d["name"]: d["index"] for d in inputs}
        self._output_index = [(d["name"], d["index"]) for d in outputs]
        self._shapes = {d["index"]: tuple(int(n) for n in d["shape"]) for d in inputs}

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(self.signature, inputs)
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise ModelRuntimeError("the model is closed")
            try:
                self._fit(interpreter, inputs)
                for name, array in inputs.items():
                    interpreter.set_tensor(self._input_index[name], array)
                interpreter.invoke()
                # get_tensor copies, so the answer survives the next call.
                return {name: interpreter.get_tensor(index) for name, index in self._output_index}
            except (ValueError, RuntimeError) as e:
                raise ModelRuntimeError(f"{NAME} failed to run the model: {e}") from e

    def _fit(self, interpreter: Any, inputs: Mapping[str, np.ndarray]) -> None:
        """Resize inputs whose shape differs from the interpreter's (a new batch size)."""
        resized = False
        for name, array in inputs.items():
            index = self._input_index[name]
            if self._shapes[index] != array.shape:
                # strict: only the dimensions the model declares dynamic may change.
                interpreter.resize_tensor_input(index, list(array.shape), strict=True)
                self._shapes[index] = array.shape
                resized = True
        if resized:
            interpreter.allocate_tensors()

    def close(self) -> None:
        with self._lock:  # waits for a running call, then frees the interpreter and its delegate
            self._interpreter = None


def _tensor(details: Mapping[str, Any]) -> TensorSpec:
    dtype = np.dtype(details["dtype"]).name
    # shape_signature has -1 where the model allows any size; shape is the current allocation.
    # (tflite_runtime before 2.5 has no shape_signature.)
    shape = details.get("shape_signature", details["shape"])
    return tensor_spec(
        details["name"], v2_datatype_of_numpy(dtype), [max(int(d), -1) for d in shape], dtype
    )


RUNTIME = LiteRtRuntime()
