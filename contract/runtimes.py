"""THE table of inference runtimes: which model formats each reads, how to install it,
which Python packages a package carries for it, where those have wheels, and the
accelerators it tries by default.

The agent loads models with the runtime of this name (agent/runtimes/<name>.py),
the packager puts its requirements into a package's deps layer, the CLI offers
its names, and pyproject.toml's extras must agree with it (a test checks that).
Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import PackageError
from contract.tensors import FRAMEWORKS


@dataclass(frozen=True)
class Runtime:
    name: str
    frameworks: tuple[str, ...]  # model formats it loads, its own first
    extra: str  # `pip install 'edgefleet[EXTRA]'` installs it on a device
    requirements: tuple[str, ...]  # the Python packages a package carries for it
    # Best first; "runtime:DEVICE" as in the desired state's runtime.prefer.
    prefer: tuple[str, ...]
    # OCI platforms its requirements have wheels for on PyPI (CPython, manylinux).
    platforms: tuple[str, ...]


RUNTIMES = {
    runtime.name: runtime
    for runtime in (
        Runtime(
            "onnxruntime",
            ("onnx",),
            "onnx",
            ("onnxruntime", "numpy"),
            ("onnxruntime:CUDA", "onnxruntime:CPU"),
            ("linux/amd64", "linux/arm64"),
        ),
        # OpenVINO also reads ONNX and TFLite files directly.
        Runtime(
            "openvino",
            ("openvino", "onnx", "tflite"),
            "openvino",
            ("openvino", "numpy"),
            ("openvino:NPU", "openvino:GPU", "openvino:CPU"),
            ("linux/amd64", "linux/arm64"),
        ),
        Runtime(
            "litert",
            ("tflite",),
            "tflite",
            ("ai-edge-litert", "numpy"),
            ("litert:CPU",),
            ("linux/amd64", "linux/arm64"),
        ),
    )
}

# The platforms an agent runs on, so the only ones a package may name. A native package
# carries no wheels (the device brings its runtime); a runnable image (--image) also needs
# the runtime's wheels (`Runtime.platforms`), which the build looks for before any work.
DEVICE_PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")
_SAME_PLATFORM = {"linux/arm64/v8": "linux/arm64"}


def check_platforms(platforms: list[str] | tuple[str, ...]) -> None:
    """PackageError naming the first of PLATFORMS no agent runs on (windows/amd64, say):
    a package for it would be accepted now and fail a device that joins later."""
    for platform in platforms:
        if _SAME_PLATFORM.get(platform, platform) not in DEVICE_PLATFORMS:
            raise PackageError(
                f"platform {platform!r} is not one an edgefleet agent runs on; use --platform "
                f"with {', '.join(DEVICE_PLATFORMS)}")


# The runtime a framework's models get unless the caller picks another: the one made for it.
DEFAULT_RUNTIME = {
    framework: next(r.name for r in RUNTIMES.values() if r.frameworks[0] == framework)
    for framework in FRAMEWORKS
}


def readers(framework: str) -> list[str]:
    """The runtimes that load FRAMEWORK's models, the one made for it first."""
    own = DEFAULT_RUNTIME[framework]
    others = [r.name for r in RUNTIMES.values() if framework in r.frameworks and r.name != own]
    return [own, *others]


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
