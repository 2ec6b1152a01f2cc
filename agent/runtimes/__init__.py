"""The runtimes this agent knows, and how a model finds the best one on this device.

Which runtimes there are, what each reads and how to install it is the
contract's table (contract/runtimes.py); the runtime called NAME is implemented
by agent/runtimes/NAME.py. Runtime modules are imported on first use, and each
imports its inference library only when asked, so a device with only
onnxruntime installed can still list the others as missing.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from agent.runtimes.base import LoadedModel, LoadOptions, ModelRuntimeError, Runtime
from contract.runtimes import DEFAULT_RUNTIME, RUNTIMES, readers

if TYPE_CHECKING:
    import numpy as np


def get_runtime(name: str) -> Runtime:
    """The runtime called NAME, or ModelRuntimeError saying how to install it."""
    if name not in RUNTIMES:
        raise ModelRuntimeError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}")
    runtime = cast(Runtime, importlib.import_module(f"agent.runtimes.{name}").RUNTIME)
    if not runtime.available():
        raise ModelRuntimeError(
            f"{name} is not installed on this device: "
            f"pip install 'edgefleet[{RUNTIMES[name].extra}]'"
        )
    return runtime


def runtime_for_framework(framework: str) -> str:
    """The runtime made for models of FRAMEWORK ("onnx" -> "onnxruntime")."""
    try:
        return DEFAULT_RUNTIME[framework]
    except KeyError:
        raise ModelRuntimeError(
            f"no runtime for {framework!r} models; known frameworks: {', '.join(DEFAULT_RUNTIME)}"
        ) from None


def run_on_cpu(
    runtime: str, model_dir: Path, entrypoint: str, inputs: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """What RUNTIME alone answers to each of INPUTS on CPU at f32, as a device runs it
    (f32 keeps OpenVINO off bfloat16); ModelRuntimeError when it cannot run the model.
    """
    options = LoadOptions(prefer=(f"{runtime}:CPU",), precision="f32", fallback=False)
    model = get_runtime(runtime).load(model_dir, entrypoint, options)
    try:
        return [model.infer(one) for one in inputs]
    finally:
        model.close()


def time_on_cpu(
    runtime: str, model_dir: Path, entrypoint: str, inputs: list[dict[str, np.ndarray]],
    repeat: int,
) -> list[float]:
    """The best of REPEAT calls' seconds for each of INPUTS, RUNTIME alone on CPU at f32 as
    a device runs it (one warm-up call each first); ModelRuntimeError when it cannot."""
    options = LoadOptions(prefer=(f"{runtime}:CPU",), precision="f32", fallback=False)
    model = get_runtime(runtime).load(model_dir, entrypoint, options)
    try:
        best = []
        for one in inputs:
            model.infer(one)
            seconds = []
            for _ in range(repeat):
                began = time.perf_counter()
                model.infer(one)
                seconds.append(time.perf_counter() - began)
            best.append(min(seconds))  # the least disturbed by other work on the machine
        return best
    finally:
        model.close()


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
    for name in readers(framework) if options.fallback else []:
        if name in tried_on_cpu:
            continue
        try:
            model = get_runtime(name).load(model_dir, entrypoint, replace(options, prefer=()))
        except ModelRuntimeError as e:
            skipped.append(str(e))
            continue
        return _noting(model, skipped)
    raise ModelRuntimeError(f"no runtime could load {entrypoint}: {'; '.join(skipped)}")


def _noting(model: LoadedModel, skipped: list[str]) -> LoadedModel:
    if skipped:
        model.fallback_reason = "; ".join(skipped)
    return model
