"""A deployment's settings: the resources its versions run with, and how they batch.

Declared once, here: the hub checks what users give (`parse_*`, one-line
`SettingsError`s that the API answers as 422), the signed desired state
carries them (contract/protocol.py, `Settings.to_json`/`from_json`), and
the agent applies them (container limits, Kubernetes resources, the serving
process's batching). Stdlib only.

    {"resources": {"cpu_millis": 500, "memory_bytes": 536870912,
                   "accelerators": {"nvidia.com/gpu": 1}},
     "batching": {"max_batch_size": 32, "max_delay_ms": 2}}

Every part is optional: a resource left out is the agent's default (its
`--container-cpus`, `--cpu`...), batching left out is the package's default
(off unless its serving.json says otherwise), and `{"max_batch_size": 1}` is
batching turned off whatever the package says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

if TYPE_CHECKING:
    from contract.tensors import Signature


class SettingsError(ValueError):
    """A setting out of its range or not in its form; the message is one line naming it."""


MIN_CPU_MILLIS: Final = 10             # 0.01 cores: Docker refuses less
MAX_CPU_MILLIS: Final = 1024 * 1000    # 1024 cores
MIN_MEMORY_BYTES: Final = 16 * 2**20   # Docker refuses under 6 MiB; a serving process needs more
MAX_MEMORY_BYTES: Final = 2**50        # 1 PiB
MAX_ACCELERATORS: Final = 8            # kinds per deployment
MAX_ACCELERATOR_COUNT: Final = 64
MAX_BATCH_SIZE: Final = 4096
MAX_BATCH_DELAY_MS: Final = 1000
GPU: Final = "nvidia.com/gpu"          # what --gpus N asks for

# A Kubernetes extended resource name: DNS subdomain "/" name (nvidia.com/gpu, gpu.intel.com/i915).
_ACCELERATOR = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]"
    r"{0,61}[A-Za-z0-9])?")
_NUMBER = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
_MEMORY = re.compile(r"(?P<n>[0-9]{1,20}(\.[0-9]{1,9})?)(?P<unit>[KMGTP]i?|k)?")
_UNITS: Final = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "P": 10**15, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingsError(f"{what}: expected an integer, got {value!r:.40}")
    if not low <= value <= high:
        raise SettingsError(f"{what}: {value} is outside {low}..{high}")
    return value


@dataclass(frozen=True)
class Resources:
    """What each of a deployment's versions may use; None: the agent's default."""

    cpu_millis: int | None = None     # thousandths of a core: 500 is half a core
    memory_bytes: int | None = None
    # (extended resource name, count), sorted by name: {"nvidia.com/gpu": 1}
    accelerators: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.cpu_millis is not None:
            _int(self.cpu_millis, "cpus", MIN_CPU_MILLIS, MAX_CPU_MILLIS)
        if self.memory_bytes is not None:
            _int(self.memory_bytes, "memory", MIN_MEMORY_BYTES, MAX_MEMORY_BYTES)
        if not isinstance(self.accelerators, tuple) or len(self.accelerators) > MAX_ACCELERATORS:
            raise SettingsError(f"accelerators: at most {MAX_ACCELERATORS} kinds")
        for entry in self.accelerators:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise SettingsError("accelerators: expected (name, count) pairs")
            name, count = entry
            if not isinstance(name, str) or not _ACCELERATOR.fullmatch(name):
                raise SettingsError(f"accelerator {name!r:.80}: not an extended resource name "
                                    "like nvidia.com/gpu")
            _int(count, f"accelerator {name}", 0, MAX_ACCELERATOR_COUNT)
        names = [name for name, _ in self.accelerators]
        if names != sorted(set(names)):
            raise SettingsError("accelerators: each name once, sorted")

    @property
    def gpus(self) -> int | None:
        """How many NVIDIA GPUs it asks for; None: it does not say."""
        return dict(self.accelerators).get(GPU)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.cpu_millis is not None:
            out["cpu_millis"] = self.cpu_millis
        if self.memory_bytes is not None:
            out["memory_bytes"] = self.memory_bytes
        if self.accelerators:
            out["accelerators"] = dict(self.accelerators)
        return out

    @classmethod
    def from_json(cls, value: object) -> Resources:
        data = _object(value, "resources", {"cpu_millis", "memory_bytes", "accelerators"})
        accelerators = data.get("accelerators", {})
        if not isinstance(accelerators, dict):
            raise SettingsError("resources.accelerators: expected an object of counts")
        return cls(data.get("cpu_millis"), data.get("memory_bytes"),
                   accelerator_pairs(accelerators))

    def shown(self) -> dict[str, Any]:
        """As users write them: {"cpus": "0.5", "memory": "512Mi", "accelerators": {...}}."""
        out: dict[str, Any] = {}
        if self.cpu_millis is not None:
            out["cpus"] = format_cpus(self.cpu_millis)
        if self.memory_bytes is not None:
            out["memory"] = format_memory(self.memory_bytes)
        if self.accelerators:
            out["accelerators"] = dict(self.accelerators)
        return out


@dataclass(frozen=True)
class Batching:
    """Concurrent requests to a version merged into one runtime call (agent/serving/batching.py).
    A max batch size of 1 is batching off (`Batching.OFF`)."""

    max_batch_size: int               # rows per runtime call; 1: off
    max_delay_ms: int = 0             # how long a batch's first request waits for more

    OFF: ClassVar[Batching]

    def __post_init__(self) -> None:
        _int(self.max_batch_size, "batching.max_batch_size", 1, MAX_BATCH_SIZE)
        _int(self.max_delay_ms, "batching.max_delay_ms", 0, MAX_BATCH_DELAY_MS)
        if self.max_batch_size == 1 and self.max_delay_ms:
            raise SettingsError("batching.max_delay_ms: batching is off (batch size 1), so "
                                "there is no delay to wait")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    def to_json(self) -> dict[str, int]:
        return {"max_batch_size": self.max_batch_size, "max_delay_ms": self.max_delay_ms}

    @classmethod
    def from_json(cls, value: object, what: str = "batching") -> Batching:
        data = _object(value, what, {"max_batch_size", "max_delay_ms"})
        if "max_batch_size" not in data:
            raise SettingsError(f"{what}.max_batch_size: required")
        return cls(data["max_batch_size"], data.get("max_delay_ms", 0))

    def __str__(self) -> str:
        """SIZE:DELAY_MS, or "off": the form `edgefleet serve --batching` reads."""
        return f"{self.max_batch_size}:{self.max_delay_ms}" if self.enabled else "off"

    @classmethod
    def parse(cls, text: str) -> Batching:
        """SIZE[:DELAY_MS] or "off"."""
        if text == "off":
            return cls.OFF
        size, _, delay = text.partition(":")
        if not size.isascii() or not size.isdigit() or len(size) > 6 or (
                delay and (not delay.isascii() or not delay.isdigit() or len(delay) > 6)):
            raise SettingsError(f"batching {text[:40]!r}: use SIZE[:DELAY_MS] (32:2) or off")
        return cls(int(size), int(delay or 0))


Batching.OFF = Batching(1)


@dataclass(frozen=True)
class Settings:
    """A deployment's settings; the defaults say nothing (the agent's and package's apply)."""

    resources: Resources = field(default_factory=Resources)
    batching: Batching | None = None  # None: the package's default, else off

    def to_json(self) -> dict[str, Any]:
        """Only what is said, so a deployment without settings has none in its JSON."""
        out: dict[str, Any] = {}
        if resources := self.resources.to_json():
            out["resources"] = resources
        if self.batching is not None:
            out["batching"] = self.batching.to_json()
        return out

    @classmethod
    def from_json(cls, value: object) -> Settings:
        data = _object(value, "settings", {"resources", "batching"})
        return cls(Resources.from_json(data.get("resources", {})),
                   None if data.get("batching") is None else Batching.from_json(data["batching"]))

    def shown(self) -> dict[str, Any]:
        """For users (REST answers, the CLI): resources as written, batching or "off"."""
        return {"resources": self.resources.shown(),
                "batching": None if self.batching is None else (
                    self.batching.to_json() if self.batching.enabled else "off")}


def effective_batching(deployment: Batching | None, package: Batching | None) -> Batching | None:
    """What a version batches with: the deployment's setting, else the package's default
    (its serving.json), else nothing; None also when the one that applies is off."""
    chosen = deployment if deployment is not None else package
    return chosen if chosen is not None and chosen.enabled else None


def unbatchable(signature: Signature) -> str | None:
    """Why a model of SIGNATURE cannot batch (no free first dimension somewhere); None if it
    can. The serving process refuses to load such a version with batching on; the
    Kubernetes agent refuses it before anything is applied."""
    for side, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] != -1:
                shape = list(spec.shape) if spec.shape else "unknown"
                return f"{side} '{spec.name}' has shape {shape}, not a free first (batch) dimension"
    if not signature.inputs:
        return "the model has no inputs"
    return None


def _object(value: object, what: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise SettingsError(f"{what}: expected an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SettingsError(f"{what}.{unknown[0]}: unknown field")
    return value


# -- what users type ------------------------------------------------------------------


def parse_cpus(value: str | int | float) -> int:
    """Cores as "0.5", "2", 1.5 or "500m" -> thousandths of a core, range-checked."""
    # decimal is imported where users' values are parsed: the agent never parses them,
    # and keeps its memory (bench/agent.py).
    from decimal import Decimal, InvalidOperation

    text = str(value) if not isinstance(value, bool) else "?"
    try:
        if text.endswith("m") and text[:-1].isascii() and text[:-1].isdigit() \
                and len(text) <= 10:
            millis = Decimal(text[:-1])
        elif _NUMBER.fullmatch(text):
            millis = Decimal(text) * 1000
        else:
            raise InvalidOperation
    except InvalidOperation:
        raise SettingsError(f"cpus {text[:40]!r}: use cores (0.5, 2) or millicores (500m)"
                            ) from None
    if millis != millis.to_integral_value():
        raise SettingsError(f"cpus {text[:40]!r}: at most three decimals (0.001 cores)")
    return _int(int(millis), "cpus (millicores)", MIN_CPU_MILLIS, MAX_CPU_MILLIS)


def parse_memory(value: str | int) -> int:
    """Bytes as 536870912, "512Mi", "1Gi", "500M" -> bytes, range-checked."""
    from decimal import Decimal

    text = str(value) if not isinstance(value, bool) else "?"
    match = _MEMORY.fullmatch(text)
    if match is None:
        raise SettingsError(f"memory {text[:40]!r}: use bytes or a unit: 512Mi, 2Gi, 500M")
    total = Decimal(match["n"]) * _UNITS[match["unit"]]
    if total != total.to_integral_value():
        raise SettingsError(f"memory {text[:40]!r}: not a whole number of bytes")
    return _int(int(total), "memory (bytes)", MIN_MEMORY_BYTES, MAX_MEMORY_BYTES)


def parse_accelerator(text: str) -> tuple[str, int]:
    """NAME=COUNT, e.g. nvidia.com/gpu=1."""
    name, sep, count = text.partition("=")
    if not sep or not count.isascii() or not count.isdigit() or len(count) > 4:
        raise SettingsError(f"accelerator {text[:80]!r}: use NAME=COUNT (nvidia.com/gpu=1)")
    pair = (name, int(count))
    Resources(accelerators=(pair,))  # checks the name and the count
    return pair


def accelerator_pairs(counts: Mapping[str, object]) -> tuple[tuple[str, int], ...]:
    """{"nvidia.com/gpu": 1, ...} as Resources keeps it (checked when Resources is made)."""
    if len(counts) > MAX_ACCELERATORS:
        raise SettingsError(f"accelerators: at most {MAX_ACCELERATORS} kinds")
    return tuple(sorted((name, cast(int, count)) for name, count in counts.items()))


def format_cpus(millis: int) -> str:
    """500 -> "0.5", 2000 -> "2"."""
    from decimal import Decimal

    return format(Decimal(millis) / 1000, "f").rstrip("0").rstrip(".") if millis % 1000 \
        else str(millis // 1000)


def format_memory(size: int) -> str:
    """The largest unit that divides SIZE, binary first: 536870912 -> "512Mi", 10**9 -> "1G"."""
    for unit in ("Pi", "Ti", "Gi", "Mi", "Ki", "P", "T", "G", "M", "k"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)
