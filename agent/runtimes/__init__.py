"""The runtimes this agent knows, and how a model finds the best one on this device.

Runtime modules are imported on first use, and each imports its inference
library only when asked, so a device with only onnxruntime installed can
still list the others as missing.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import cast

from agent.runtimes.base import LoadedModel, LoadOptions, ModelRuntimeError, Runtime

# runtime name -> module whose RUNTIME implements it
RUNTIMES = {
    "onnxruntime": "agent.runtimes.onnxruntime",
    "openvino": "agent.runtimes.openvino",
    "litert": "agent.runtimes.litert",
}
# runtime name -> the edgefleet extra that installs it
_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino", "litert": "tflite"}
# model framework (packager.modelfile.FRAMEWORKS) -> the runtime made for it
_DEFAULT_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "litert"}


def get_runtime(name: str) -> Runtime:
    """The runtime called NAME, or ModelRuntimeError saying how to install it."""
    try:
        module = RUNTIMES[name]
    except KeyError:
        raise ModelRuntimeError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}") from None
    runtime = cast(Runtime, importlib.import_module(module).RUNTIME)
    if not runtime.available():
        raise ModelRuntimeError(
            f"{name} is not installed on this device: pip install 'edgefleet[{_EXTRAS[name]}]'"
        )
    return runtime


def runtime_for_framework(framework: str) -> str:
    """The runtime made for models of FRAMEWORK ("onnx" -> "onnxruntime")."""
    try:
        return _DEFAULT_RUNTIMES[framework]
    except KeyError:
        raise ModelRuntimeError(
            f"no runtime for {framework!r} models; known frameworks: {', '.join(_DEFAULT_RUNTIMES)}"
        ) from None


def load_best(
    model_dir: Path, entrypoint: str, framework: str, options: LoadOptions | None = None
) -> LoadedModel:
    """Load the model on the first of OPTIONS.prefer that works here, else on CPU.

    Each "runtime:DEVICE" entry is tried alone, in order, across runtimes: an
    ONNX model preferring "openvino:NPU" is loaded by OpenVINO from the .onnx,
    and "onnxruntime:CUDA" after it is tried only if that fails. When no entry
    works, the framework's own runtime (then any other that reads the format)
    loads it on CPU, unless OPTIONS.fallback is False. The model's
    `fallback_reason` lists why entries were skipped.
    """
    runtime_for_framework(framework)  # an unknown framework is a bad request, not a skip
    options = options or LoadOptions()
    skipped: list[str] = []
    tried_on_cpu: set[str] = set()
    for entry in options.prefer:
        name, _, device = entry.partition(":")
        try:
            runtime = get_runtime(name)
            if framework not in runtime.frameworks:
                raise ModelRuntimeError(f"{name} cannot load {framework} models")
            if device.upper() == "CPU":
                tried_on_cpu.add(name)
            model = runtime.load(
                model_dir, entrypoint, replace(options, prefer=(entry,), fallback=False)
            )
        except ModelRuntimeError as e:
            skipped.append(str(e))
            continue
        return _noting(model, skipped)
    for name in _readers(framework) if options.fallback else []:
        if name in tried_on_cpu:
            continue
        try:
            model = get_runtime(name).load(model_dir, entrypoint, replace(options, prefer=()))
        except ModelRuntimeError as e:
            skipped.append(str(e))
            continue
        return _noting(model, skipped)
    raise ModelRuntimeError(f"no runtime could load {entrypoint}: {'; '.join(skipped)}")


def _readers(framework: str) -> list[str]:
    """Runtimes that can load FRAMEWORK, its own first (asking needs none of their libraries)."""
    others = [
        name
        for name, module in RUNTIMES.items()
        if framework in importlib.import_module(module).RUNTIME.frameworks
    ]
    own = runtime_for_framework(framework)
    return [own, *(name for name in others if name != own)]


def _noting(model: LoadedModel, skipped: list[str]) -> LoadedModel:
    if skipped:
        model.fallback_reason = "; ".join(skipped)
    return model
