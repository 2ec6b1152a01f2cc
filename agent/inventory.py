"""What this device has: platform, CPU, memory, disk, and each runtime's real accelerators.

The agent puts `inventory()` in its reported state and the hub targets
deployments with `accelerator_list()`. Accelerators are what the runtimes
report after trying (onnxruntime's providers, OpenVINO's available devices,
LiteRT delegates that load), never guessed from hardware; a runtime that is
not installed, or fails to start, is reported absent with the reason.
"""

from __future__ import annotations

import json
import os
import platform
import struct
from pathlib import Path
from typing import Any

# platform.machine() -> OCI architecture (and variant), as the packager names its platforms.
_ARCHITECTURES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "armv7": "arm/v7",
    "armv6l": "arm/v6",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
# A 64-bit kernel can run a 32-bit userland (Raspberry Pi OS 32-bit on a Pi 4 or 5):
# packages must match the userland, which is what this Python is built for.
_USERLAND_32 = {"arm64": "arm/v7", "amd64": "386"}
POINTER_BITS = struct.calcsize("P") * 8  # of this Python, hence of the userland
# /proc/cpuinfo keys that name the CPU, best first: x86 has "model name"; ARM boards
# often only have "Model" (the board) or "Hardware" (the SoC).
_CPUINFO_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")


def oci_platform() -> str:
    """This device as an OCI platform string: "linux/amd64", "linux/arm64", "linux/arm/v7"."""
    machine = platform.machine()
    arch = _ARCHITECTURES.get(machine.lower(), machine.lower())
    if POINTER_BITS == 32:
        arch = _USERLAND_32.get(arch, arch)
    return f"{platform.system().lower()}/{arch}"


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in _CPUINFO_KEYS:
        if key in fields:
            return fields[key]
    return platform.processor() or platform.machine()


def runtimes() -> dict[str, dict[str, Any]]:
    """Per runtime: installed or not (and why), its version, and its accelerators with
    what each is, e.g. {"openvino": {"installed": True, "version": "...",
    "accelerators": {"openvino:CPU": "Intel(R) Core(TM) i5-1135G7"}}}."""
    # Imported here: only the inventory child process pays for the runtimes.
    from agent.runtimes import get_runtime
    from agent.runtimes.base import ModelRuntimeError
    from contract.runtimes import RUNTIMES

    found: dict[str, dict[str, Any]] = {}
    for name in RUNTIMES:
        try:
            runtime = get_runtime(name)
        except ModelRuntimeError as e:
            found[name] = {"installed": False, "error": str(e)}
            continue
        try:
            found[name] = {
                "installed": True,
                "version": runtime.version(),
                "accelerators": runtime.devices(),
            }
        except (ModelRuntimeError, RuntimeError, OSError) as e:  # installed but broken
            found[name] = {
                "installed": True,
                "error": f"{name} does not start: {e}",
                "accelerators": {},
            }
    return found


def accelerator_list(found: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Every "runtime:DEVICE" this device offers, e.g. ["onnxruntime:CPU", "openvino:CPU",
    "litert:CPU"], from FOUND (a runtimes() result) or found afresh."""
    found = runtimes() if found is None else found
    return [accel for entry in found.values() for accel in entry.get("accelerators", {})]


def agent_version() -> str:
    # importlib.metadata costs the daemon megabytes: it learns its version from the
    # inventory child instead.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0+unknown"


# Written into device images by `edgefleet firmware build`: the class the device booted from.
IMAGE_INFO = Path("/etc/edgefleet/image.json")


def image_info(path: Path = IMAGE_INFO) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def inventory(data_dir: Path) -> dict[str, Any]:
    """The whole description, JSON-able; DATA_DIR is where the agent keeps packages."""
    # Imported here: this runs once, in a child process (`python -m agent.inventory`); the
    # daemon imports this module for its platform helpers and need not hold psutil.
    import psutil

    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing(data_dir)))
    found = runtimes()
    return {
        "platform": oci_platform(),
        "cpu": {
            "model": cpu_model(),
            # The CPUs this process may use, which a container or taskset can limit.
            "count": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
        },
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available},
        "disk": {"path": str(data_dir), "free_bytes": disk.free, "total_bytes": disk.total},
        "runtimes": found,
        "accelerators": accelerator_list(found),
        "agent_version": agent_version(),
        "image": image_info(),
    }


def _existing(path: Path) -> Path:
    # Before the first download the data directory may not exist yet; its disk is its
    # nearest existing parent's.
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def facts(found: dict[str, Any]) -> dict[str, int | float | str]:
    """The inventory as the flat facts the reported state carries."""
    values: dict[str, int | float | str] = {
        "cpu_model": str(found["cpu"]["model"])[:128],
        "cpu_count": found["cpu"]["count"] or 0,
        "memory_mb": found["memory"]["total_bytes"] // 2**20,
        "disk_mb": found["disk"]["total_bytes"] // 2**20,
        "disk_free_mb": found["disk"]["free_bytes"] // 2**20,
    }
    image = found.get("image") or {}
    if isinstance(image.get("class"), str):
        values["image_class"] = image["class"][:128]
    if isinstance(image.get("source_date_epoch"), int):
        values["image_built"] = image["source_date_epoch"]
    for name, runtime in found["runtimes"].items():
        if runtime.get("installed"):
            values[f"{name}_version"] = str(runtime.get("version"))[:128]
    return values


if __name__ == "__main__":
    # The agent runs this in a child process: importing every runtime to see
    # what it offers costs hundreds of MB that the daemon should not keep.
    import sys

    print(json.dumps(inventory(Path(sys.argv[1]))))
