"""What a simulated fleet does: every knob in one frozen object, checked when it is built."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent import options as o
from agent.inventory import agent_version
from agent.mqtt import BackoffPolicy
from agent.sim.mqtt_lite import parse_url
from contract import names
from contract.sketch import FEATURE_NAME

VersionKey = tuple[str, int]  # (model, version)


def parse_version(text: str) -> VersionKey:
    """"diabetes:3" -> ("diabetes", 3)."""
    return names.model_version(text)


def parse_drift(values: Iterable[str]) -> dict[str, float]:
    """["x[0]=1.5"] -> {"x[0]": 1.5}; the options check the names."""
    shifts = {}
    for text in values:
        feature, equals, number = text.rpartition("=")
        try:
            shifts[feature] = float(number) if equals else math.nan
        except ValueError:
            shifts[feature] = math.nan
    return shifts


@dataclass(frozen=True)
class PerVersion:
    """A number for every model version, with overrides for some: the CLI's
    "0.01" (everything) and "diabetes:3=0.2" (that version only)."""

    default: float
    overrides: Mapping[VersionKey, float] = field(default_factory=dict)

    def __call__(self, model: str, version: int) -> float:
        return self.overrides.get((model, version), self.default)

    @classmethod
    def parse(cls, values: Iterable[str], *, default: float) -> PerVersion:
        overrides: dict[VersionKey, float] = {}
        for text in values:
            key, equals, number = text.rpartition("=")
            try:
                if equals:
                    overrides[parse_version(key)] = float(number)
                else:
                    default = float(number)
            except ValueError:
                raise ValueError(f"{text!r} is neither a number nor MODEL:VERSION=NUMBER "
                                 "(e.g. 0.01 or diabetes:3=0.2)") from None
        return cls(default, overrides)

    def check(self, what: str, high: float = math.inf) -> None:
        for key, value in [(None, self.default), *self.overrides.items()]:
            if not 0 <= value <= high or math.isnan(value):
                where = f" for {key[0]}:{key[1]}" if key else ""
                raise ValueError(f"{what}{where} must be between 0 and {high}, got {value}")


@dataclass(frozen=True)
class SimOptions:
    data_dir: Path = Path("edgefleet-sim")   # identities, and the devices' saved state
    name_prefix: str = "sim-"                # device names: sim-00000, sim-00001, ...
    mqtt_urls: tuple[str, ...] = ()          # instead of the broker named at enrollment
    platform: str = "linux/arm64"
    accelerators: tuple[str, ...] = ("onnxruntime:CPU",)
    telemetry_interval: float = o.TELEMETRY_INTERVAL.default
    requests_per_second: float = 1.0         # simulated scoring load per device
    step_latency: float = 0.05               # seconds per update state, +-50 % jitter
    fail_rate: float = 0.0                   # fraction of updates that fail their self-test
    fail_versions: frozenset[VersionKey] = frozenset()  # these always fail their self-test
    offline_rate: float = 0.0                # drops per device per minute (ungraceful)
    offline_seconds: float = 30.0            # how long a drop lasts, +-50 % jitter
    error_rate: PerVersion = PerVersion(0.0)     # fraction of simulated requests that fail
    latency_ms: PerVersion = PerVersion(20.0)    # mean simulated scoring latency
    # Feature ("x[0]") -> what is added to its simulated values (agent/sim/inputs.py).
    drift: Mapping[str, float] = field(default_factory=dict)
    keepalive: int = 60                      # MQTT keepalive, seconds
    connect_concurrency: int = 50            # connection attempts under way at once
    connect_jitter: float = 1.0              # first attempts spread over this many seconds
    enroll_concurrency: int = 8              # enrollment requests under way at once
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    # Read once: importlib.metadata parses the package's metadata on every call.
    agent_version: str = field(default_factory=lambda: f"{agent_version()}+sim")

    def __post_init__(self) -> None:
        for name in ("fail_rate", "offline_rate"):
            value = getattr(self, name)
            high = 1.0 if name == "fail_rate" else math.inf
            if not 0 <= value <= high:
                raise ValueError(f"{name} must be between 0 and {high}, got {value}")
        for name in ("telemetry_interval", "offline_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")
        for name in ("requests_per_second", "step_latency", "connect_jitter"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("connect_concurrency", "enroll_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.keepalive <= 0xFFFF:
            raise ValueError(f"keepalive must be 1-65535 seconds, got {self.keepalive}")
        for feature, shift in self.drift.items():
            if not FEATURE_NAME.fullmatch(feature) or not math.isfinite(shift):
                raise ValueError(f"--drift {feature}: expected TENSOR[COLUMN]=NUMBER, "
                                 "e.g. x[0]=1.5")
        self.error_rate.check("error_rate", high=1.0)
        self.latency_ms.check("latency_ms")
        for url in self.mqtt_urls:
            parse_url(url)  # ValueError at once, not once per device

    def broker_for(self, number: int) -> str | None:
        """The broker of device NUMBER if the sim names brokers (they take the devices in
        turn); None: the one the hub named at its enrollment."""
        return self.mqtt_urls[number % len(self.mqtt_urls)] if self.mqtt_urls else None
