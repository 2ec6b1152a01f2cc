"""Profile a model on this machine: per runtime and device it offers, latency p50/p99 at
each batch size, throughput and peak memory, through the agent's own runtime adapters.

Each (runtime, device) pair is measured in a child process of its own (`python -m
agent.profiling REQUEST`), so one runtime's memory never shows in another's peak and a
runtime that crashes takes only its own measurement down. The child loads the model with
that one device preferred and no fallback, at f32 (OpenVINO's CPU would pick bfloat16
otherwise), and for each batch size: one warm-up call, then ITERATIONS timed calls on the
same input (the sample request's ones, repeated to the batch size; a model whose first
dimension is not free is profiled at batch size 1 only, with a note saying why). It prints
one JSON line per batch size, so the caller can report progress as they come: the
percentiles of the calls' times, rows per second over all of them, and the child's VmHWM
(peak resident memory since it started: interpreter, numpy, the runtime library and the
model with every batch so far).

A package variant (fp16, int8, another runtime) is profiled from its package, fetched,
verified and unpacked as a device does (`stage_package`).

Only what the runtimes list as devices is profiled (`Runtime.devices()`): on a machine
without a GPU or NPU that is the CPU of each runtime that reads the model's format.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.inventory import oci_platform
from agent.package_store import PackageStore, StagedVersion, StageError
from agent.runtimes import get_runtime
from agent.runtimes.base import LoadOptions, ModelRuntimeError
from contract.errors import PackageError
from contract.protocol import Package
from contract.runtimes import RUNTIMES, readers
from contract.serving import sample_request
from contract.settings import unbatchable
from contract.tensors import NUMPY_DTYPES

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from packager.distribution import Registry

CHILD_TIMEOUT = 600  # seconds for one runtime and device: every batch size with its calls


def device_class() -> str:
    """The class of device this machine measures for: its OCI platform, as devices report."""
    return oci_platform()


@dataclass(frozen=True)
class Target:
    runtime: str
    device: str  # as the runtime lists it: "CPU", "GPU.0", "EdgeTPU"


def targets(framework: str, only: list[str] | None = None) -> tuple[list[Target], list[str]]:
    """The (runtime, device) pairs here that can load FRAMEWORK's models (of ONLY's runtimes
    if given), and why each other reader was left out."""
    found, skipped = [], []
    for name in readers(framework):
        if only and name not in only:
            continue
        try:
            runtime = get_runtime(name)
        except ModelRuntimeError as e:
            skipped.append(str(e))
            continue
        found += [Target(name, entry.partition(":")[2]) for entry in runtime.devices()]
    return found, skipped


def stage_package(registry: Registry, repository: str, tag: str,
                  public_key: ec.EllipticCurvePublicKey, work: Path) -> StagedVersion:
    """Fetch the package TAG of REPOSITORY for this machine's platform, check its signature
    against PUBLIC_KEY (the hub's) and unpack it under WORK, as a device does
    (agent/package_store.py); StageError saying why not."""
    try:
        descriptor, _ = registry.manifest(repository, tag)
    except PackageError as exc:
        raise StageError(f"{repository}:{tag}: {exc}") from None
    package = Package(repository, descriptor.digest, descriptor.size)
    store = PackageStore(work, platform=oci_platform(), public_key=lambda: public_key)
    store.download(registry, package)
    return store.stage("profile", 0, package, store.verify(package))


def profile(
    model_dir: Path, entrypoint: str, target: Target, batches: list[int], iterations: int,
    note: Callable[[str], None],
) -> Iterator[dict[str, Any]]:
    """Measure TARGET in a child process; one row per batch size as the child reports it,
    or ModelRuntimeError with the child's reason once it stops. NOTE is told what the
    child leaves out (larger batch sizes of a model whose batch is fixed)."""
    request = {"model_dir": str(model_dir), "entrypoint": entrypoint, "runtime": target.runtime,
               "device": target.device, "batches": batches, "iterations": iterations}
    with subprocess.Popen([sys.executable, "-m", "agent.profiling", json.dumps(request)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None and child.stderr is not None  # both are pipes
        watchdog = threading.Timer(CHILD_TIMEOUT, child.kill)  # a hung runtime ends here
        watchdog.start()
        try:
            for line in child.stdout:
                row = json.loads(line)
                if "error" in row:
                    raise ModelRuntimeError(row["error"])
                if "note" in row:
                    note(row["note"])
                    continue
                yield row
            stderr = child.stderr.read()
        finally:
            watchdog.cancel()
        if child.wait() != 0:
            raise ModelRuntimeError(f"{target.runtime}:{target.device} stopped (exit "
                                    f"{child.returncode}; killed after {CHILD_TIMEOUT}s if "
                                    f"negative): {stderr.strip()[-500:]}")


# ---- the child ----------------------------------------------------------------------


def _peak_rss() -> int:
    """This process's resident-memory high-water mark in bytes (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ModelRuntimeError("/proc/self/status has no VmHWM")


def _measure(request: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
    import numpy as np

    runtime, device = request["runtime"], request["device"]
    options = LoadOptions(prefer=(f"{runtime}:{device}",), precision="f32", fallback=False)
    model = get_runtime(runtime).load(Path(request["model_dir"]), request["entrypoint"], options)
    try:
        signature = model.signature
        one = {t["name"]: np.array(t["data"], dtype=NUMPY_DTYPES[t["datatype"]])
               .reshape(t["shape"]) for t in sample_request(signature.to_dict())["inputs"]}
        batches, why = request["batches"], unbatchable(signature)
        if why is not None and batches != [1]:
            emit({"note": f"only batch size 1 is profiled: {why}"})
            batches = [1]
        for batch in batches:
            inputs = {name: np.repeat(array, batch, axis=0) for name, array in one.items()}
            model.infer(inputs)  # warm-up: first-call allocations and kernel choices
            seconds = []
            for _ in range(request["iterations"]):
                began = time.perf_counter()
                model.infer(inputs)
                seconds.append(time.perf_counter() - began)
            times = np.array(seconds)
            emit({"runtime": runtime, "device": model.device, "batch": batch,
                  "iterations": len(seconds),
                  "p50_ms": round(float(np.percentile(times, 50)) * 1000, 4),
                  "p99_ms": round(float(np.percentile(times, 99)) * 1000, 4),
                  "throughput": round(batch * len(seconds) / float(times.sum()), 1),
                  "peak_rss_bytes": _peak_rss()})
    finally:
        model.close()


def main(argv: list[str]) -> int:
    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)

    request = json.loads(argv[0])
    if request["runtime"] not in RUNTIMES:
        emit({"error": f"unknown runtime {request['runtime']!r}"})
        return 1
    try:
        _measure(request, emit)
    except ModelRuntimeError as e:
        emit({"error": str(e)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
