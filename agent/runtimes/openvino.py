"""OpenVINO: a CompiledModel on CPU, GPU, NPU or AUTO, from an IR (.xml + .bin), .onnx or .tflite.

The device is the first preferred one ("openvino:NPU", "openvino:GPU.1",
"openvino:AUTO") that `Core().available_devices` lists and that compiles the
model; AUTO is always possible, and CPU is the fallback. For AUTO, `device`
is what AUTO picked (`EXECUTION_DEVICES`) when the model was loaded.

Precision: `LoadOptions.precision` becomes INFERENCE_PRECISION_HINT and
defaults to "f32". OpenVINO's own default on CPUs with bfloat16 support (such
as recent Xeon and EPYC) is bf16, which changes a model's answers in the
third digit, and GPUs default to f16; a deployment that wants that speed asks
for it ("bf16", "f16"). Hints a device does not list in SUPPORTED_PROPERTIES
are left out for it (AUTO takes them all and hands them to the device it picks).

Concurrency: an InferRequest serves one call at a time, so `infer` borrows
one from a pool of OPTIMAL_NUMBER_OF_INFER_REQUESTS requests (what the device
can run at once; 1 on CPU under the default latency hint) and waits for one
to be free when all are busy. The CompiledModel itself is shared.
"""

from __future__ import annotations

import importlib
import queue
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
from contract.tensors import Signature, TensorSpec, v2_datatype_of_openvino

NAME = "openvino"
DEFAULT_PRECISION = "f32"
# AUTO is not a device but OpenVINO's choice among them, so it is never listed yet always there.
AUTO = "AUTO"


def _ov() -> ModuleType:
    # Imported on use, so this module (and the registry) loads where OpenVINO is absent.
    return importlib.import_module("openvino")


def _core() -> Any:
    try:
        return _ov().Core()
    except RuntimeError as e:  # a broken install: plugins.xml or a plugin library missing
        raise ModelRuntimeError(f"{NAME} cannot start: {e}") from e


class OpenVinoRuntime:
    name = NAME
    frameworks = RUNTIMES[NAME].frameworks

    def available(self) -> bool:
        return importable(_ov)

    def version(self) -> str:
        return str(_ov().get_version())

    def accelerators(self) -> list[str]:
        return list(self.devices())

    def devices(self) -> dict[str, str]:
        core = _core()
        return {
            f"{NAME}:{d}": str(core.get_property(d, "FULL_DEVICE_NAME"))
            for d in core.available_devices
        }

    def load(self, model_dir: Path, entrypoint: str, options: LoadOptions) -> OpenVinoModel:
        path = model_file(model_dir, entrypoint)
        core = _core()
        wanted = preferred_devices(options, NAME)
        candidates, reasons = _candidates(wanted, core.available_devices)
        if options.fallback and "CPU" not in candidates:
            candidates.append("CPU")
        if not candidates:
            raise no_preferred_device(NAME, reasons)
        try:
            # Reads .xml (its .bin beside it), .onnx and .tflite alike.
            model = core.read_model(str(path))
        except RuntimeError as e:
            raise ModelRuntimeError(
                f"{NAME} cannot read {entrypoint}: {_what_went_wrong(e)}"
            ) from e
        hints: dict[str, Any] = {"INFERENCE_PRECISION_HINT": options.precision or DEFAULT_PRECISION}
        if options.threads is not None:
            hints["INFERENCE_NUM_THREADS"] = options.threads
        for device in candidates:
            try:
                compiled = core.compile_model(model, device, _supported(core, device, hints))
            except RuntimeError as e:
                reasons.append(f"{device}: {_what_went_wrong(e)}")
                continue
            first_choice = not wanted or device == wanted[0].upper()
            return OpenVinoModel(
                compiled,
                device=",".join(compiled.get_property("EXECUTION_DEVICES")),
                signature=_signature(compiled),
                fallback_reason=None if first_choice else "; ".join(reasons),
            )
        raise ModelRuntimeError(f"{NAME} cannot compile {entrypoint}: {'; '.join(reasons)}")


class OpenVinoModel:
    runtime = NAME

    def __init__(
        self, compiled: Any, *, device: str, signature: Signature, fallback_reason: str | None
    ) -> None:
        self.device = device
        self.signature = signature
        self.fallback_reason = fallback_reason
        self._output_names = [spec.name for spec in signature.outputs]
        # The requests hold the compiled model; dropping the pool on close() frees both.
        self._pool: queue.Queue[Any] | None = queue.Queue()
        for _ in range(max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))):
            self._pool.put(compiled.create_infer_request())

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pool = self._pool  # read once: close() may run in another thread
        if pool is None:
            raise ModelRuntimeError("the model is closed")
        check_inputs(self.signature, inputs)
        request = pool.get()
        try:
            # share_outputs stays False: results are copies, so the request can go back to the pool.
            results = request.infer(dict(inputs)).to_tuple()
        except RuntimeError as e:
            raise ModelRuntimeError(f"{NAME} failed to run the model: {_what_went_wrong(e)}") from e
        finally:
            pool.put(request)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        # Calls already running hold the pool and finish; later ones are refused.
        self._pool = None


def _candidates(wanted: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """The wanted devices OpenVINO has, in order, and why the others are left out.

    "GPU" matches "GPU.0" and "GPU.1" (OpenVINO numbers devices of one kind when there
    are several) and compiles on its default one.
    """
    candidates: list[str] = []
    reasons: list[str] = []
    for device in wanted:
        device = device.upper()
        if device == AUTO or any(d == device or d.startswith(f"{device}.") for d in available):
            if device not in candidates:
                candidates.append(device)
        else:
            reasons.append(f"{device}: not among OpenVINO's devices here ({', '.join(available)})")
    return candidates, reasons


def _supported(core: Any, device: str, hints: Mapping[str, Any]) -> dict[str, Any]:
    if device == AUTO:
        return dict(hints)
    supported = core.get_property(device, "SUPPORTED_PROPERTIES")
    return {key: value for key, value in hints.items() if key in supported}


def _signature(compiled: Any) -> Signature:
    return Signature(
        tuple(_tensor(port) for port in compiled.inputs),
        tuple(_tensor(port) for port in compiled.outputs),
    )


def _tensor(port: Any) -> TensorSpec:
    names = port.get_names()
    if not names:
        raise ModelRuntimeError(
            f"a tensor of the model has no name ({port}); the Open Inference Protocol needs one"
        )
    element = port.get_element_type().get_type_name()
    shape = port.get_partial_shape()
    dims = [] if shape.rank.is_dynamic else [d.get_length() if d.is_static else -1 for d in shape]
    return tensor_spec(port.get_any_name(), v2_datatype_of_openvino(element), dims, element)


def _what_went_wrong(error: Exception) -> str:
    # OpenVINO's messages start with a stack of "Exception from src/...cpp" lines; the
    # last line says what went wrong.
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


RUNTIME = OpenVinoRuntime()
