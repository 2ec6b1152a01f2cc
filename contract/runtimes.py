"""The inference runtimes a package can target: which model formats each runs,
which Python packages it needs, and the accelerators it tries by default.

Stdlib only: the agent reads the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import PackageError


@dataclass(frozen=True)
class Runtime:
    name: str
    frameworks: tuple[str, ...]
    requirements: tuple[str, ...]
    # Best first; "runtime:DEVICE" as in the desired state's runtime.prefer.
    prefer: tuple[str, ...]


RUNTIMES = {
    runtime.name: runtime
    for runtime in (
        Runtime(
            "onnxruntime",
            ("onnx",),
            ("onnxruntime", "numpy"),
            ("onnxruntime:CUDA", "onnxruntime:CPU"),
        ),
        # OpenVINO also reads ONNX and TFLite files directly.
        Runtime(
            "openvino",
            ("openvino", "onnx", "tflite"),
            ("openvino", "numpy"),
            ("openvino:NPU", "openvino:GPU", "openvino:CPU"),
        ),
        Runtime("litert", ("tflite",), ("ai-edge-litert", "numpy"), ("litert:CPU",)),
    )
}

# The runtime a framework's models get unless the caller picks another.
DEFAULT_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "litert"}


def choose_runtime(framework: str | None, runtime: str | None = None) -> Runtime:
    """RUNTIME (or FRAMEWORK's default runtime), checked to run FRAMEWORK's models."""
    if framework is None:
        raise PackageError(
            "the model's framework is unknown (no .onnx, OpenVINO .xml or .tflite file among "
            "its files); register the model file itself"
        )
    name = runtime or DEFAULT_RUNTIME.get(framework)
    if name not in RUNTIMES:
        raise PackageError(
            f"unknown runtime {name!r} for a {framework} model; choose one of {', '.join(RUNTIMES)}"
        )
    chosen = RUNTIMES[name]
    if framework not in chosen.frameworks:
        usable = [r.name for r in RUNTIMES.values() if framework in r.frameworks]
        raise PackageError(
            f"runtime {name} cannot run {framework} models; use {' or '.join(usable)}"
        )
    return chosen
