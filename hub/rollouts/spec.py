"""A rollout's spec: what a user asks for (OPTIONS, as text), checked once at create into
a typed, frozen RolloutSpec that is stored as JSON and read back by the engine each tick
without parsing any text again.

OPTIONS declares every option's default and help once; the REST API
(hub/api/rollouts.py) and the CLI (hub/cli/rollouts.py) take theirs from it.
Numbers are ASCII digits only, and every share, rate and duration is checked
for range here, so nothing a user can type reaches the engine as a surprise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contract import names
from contract.names import DEFAULT_VARIANT
from contract.settings import Settings, SettingsError
from hub import deployments, validation
from hub.validation import InvalidInput


@dataclass(frozen=True)
class Option:
    default: Any
    help: str


OPTIONS: dict[str, Option] = {
    "variant": Option(DEFAULT_VARIANT, "The version's package variant to roll out, as named "
                                       "by `package build --variant`."),
    "waves": Option("100%", "Cumulative waves: 5%,25%,100% or 10,100,all; the last covers all."),
    "max_failures": Option("0", "Failures allowed before the rollout pauses: a share of the "
                                "target (5%, at most 100%) or a count (3)."),
    "soak": Option("0s", "How long a wave must serve healthily before the next one starts "
                         "(30s, 10m, 2h, 1d)."),
    "device_timeout": Option("15m", "A device that has not answered by then counts as failed."),
    "auto_rollback": Option(False, "When failures cross the threshold, give every device its "
                                   "old version back."),
    "traffic": Option(None, "A/B: the new version takes this share of requests (1-99%) beside "
                            "the one already serving."),
    "shadow": Option(False, "The new version sees a copy of the traffic; only the old one "
                            "answers."),
    "priority": Option(0, "Wins over lower-priority rollouts of the same deployment on a "
                          "device."),
    "prefer": Option((), "Accelerator preferences, e.g. openvino:NPU,onnxruntime:CPU."),
    "max_error_rate": Option(0.05, "A device whose new version errs on more than this share "
                                   "of requests (0-1, from telemetry) counts as failed."),
    "max_latency_ms": Option(None, "Latency budget: refuse the rollout unless the version's "
                                   "profile (`model profile`) of this variant has a p99 at "
                                   "batch size 1 of at most this many ms on every device "
                                   "class (platform) of the target."),
    "max_latency_ratio": Option(3.0, "A device whose new version's p95 latency is more than "
                                     "this many times the old one's counts as failed."),
}
MAX_PRIORITY = 1_000_000
MAX_WAVES = 100
MAX_TARGET = 32  # key=value pairs in a target: each is one clause of the device query
_PERCENT = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,6})?)%")
_COUNT = re.compile(r"[0-9]{1,9}")


def _percent(text: str, what: str, *, low_open: bool) -> float | None:
    """The share in 'N%' (ASCII digits, at most 100), None when TEXT is no percentage."""
    if not text.endswith("%"):
        return None
    match = _PERCENT.fullmatch(text)
    value = float(match.group(1)) if match else math.nan
    if not (0 < value <= 100 if low_open else 0 <= value <= 100):
        bound = "(0, 100]" if low_open else "[0, 100]"
        raise InvalidInput(f"{what} {text[:20]!r}: a percentage must be a number in {bound}, "
                           "like 5% or 12.5%")
    return value


@dataclass(frozen=True)
class Share:
    """A part of the target: PERCENT of it, or COUNT devices."""

    percent: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a share is a percentage or a count")

    def of(self, total: int) -> int:
        if self.percent is not None:
            return math.ceil(total * self.percent / 100)
        return self.count or 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)

    def to_json(self) -> dict[str, Any]:
        return {"percent": self.percent} if self.percent is not None else {"count": self.count}

    @classmethod
    def from_json(cls, value: Any, what: str) -> Share:
        if isinstance(value, dict) and set(value) == {"percent"} and isinstance(
                value["percent"], int | float) and not isinstance(value["percent"], bool):
            return cls(percent=float(value["percent"]))
        if isinstance(value, dict) and set(value) == {"count"} and type(value["count"]) is int:
            return cls(count=value["count"])
        raise ValueError(f"{what}: not a stored share: {value!r}")


def parse_wave(text: str) -> Share:
    text = text.strip()
    if text == "all":
        return Share(percent=100.0)
    percent = _percent(text, "wave", low_open=True)
    if percent is not None:
        return Share(percent=percent)
    if not _COUNT.fullmatch(text) or int(text) < 1:
        raise InvalidInput(f"wave {text[:20]!r}: use a percentage (5%), a count (10) or 'all'")
    return Share(count=int(text))


def parse_waves(text: str) -> tuple[Share, ...]:
    waves = tuple(parse_wave(part) for part in text.split(","))
    if len(waves) > MAX_WAVES:
        raise InvalidInput(f"{len(waves)} waves; the most a rollout has is {MAX_WAVES}")
    if waves[-1].percent != 100.0:
        raise InvalidInput("the last wave must be 100% or 'all', so every target device is "
                           "covered")
    for before, after in zip(waves, waves[1:], strict=False):
        same_kind = (before.percent is None) == (after.percent is None)
        if same_kind and (after.percent or after.count or 0) <= (
                before.percent or before.count or 0):
            raise InvalidInput(f"waves are cumulative, so each must be larger than the one "
                               f"before: {after} comes after {before}")
    return waves


def parse_max_failures(text: str) -> Share:
    text = text.strip()
    percent = _percent(text, "max failures", low_open=False)
    if percent is not None:
        return Share(percent=percent)
    if not _COUNT.fullmatch(text):
        raise InvalidInput(f"max failures {text[:20]!r}: use a percentage of the target "
                           "(5%) or a count (3)")
    return Share(count=int(text))


def wave_sizes(waves: Sequence[Share], total: int) -> list[int]:
    """How many devices each wave adds, every wave at least one while devices remain."""
    sizes, covered = [], 0
    for wave in waves:
        reach = max(min(total, wave.of(total)), min(total, covered + 1))
        sizes.append(reach - covered)
        covered = reach
    return sizes


@dataclass(frozen=True)
class Duration:
    seconds: int

    def __str__(self) -> str:
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if self.seconds and self.seconds % size == 0:
                return f"{self.seconds // size}{unit}"
        return f"{self.seconds}s"


@dataclass(frozen=True)
class RolloutSpec:
    """A rollout as the engine runs it; every field checked (`parse`), none text to parse.
    No defaults here: OPTIONS has them, and `parse` applies them."""

    model: str
    version: int
    variant: str
    deployment: str
    target: Mapping[str, str]
    waves: tuple[Share, ...]
    max_failures: Share
    soak: Duration
    device_timeout: Duration
    auto_rollback: bool
    traffic: int | None
    shadow: bool
    priority: int
    prefer: tuple[str, ...]
    max_error_rate: float
    max_latency_ratio: float
    max_latency_ms: float | None  # checked at create against the version's profile
    settings: Settings  # the deployment's resources and batching on every device it reaches

    @property
    def split(self) -> bool:
        """The new version goes beside the serving one (A/B or shadow), not instead of it."""
        return self.traffic is not None or self.shadow

    def allowed_failures(self, total: int) -> int:
        if self.max_failures.percent is not None:
            return math.floor(total * self.max_failures.percent / 100)
        return self.max_failures.count or 0

    def to_json(self) -> str:
        """The stored form; read back at once, so what is stored is what `from_json` reads."""
        text = json.dumps({
            "model": self.model, "version": self.version, "variant": self.variant,
            "deployment": self.deployment,
            "target": dict(self.target), "waves": [w.to_json() for w in self.waves],
            "max_failures": self.max_failures.to_json(), "soak_s": self.soak.seconds,
            "device_timeout_s": self.device_timeout.seconds, "auto_rollback": self.auto_rollback,
            "traffic": self.traffic, "shadow": self.shadow, "priority": self.priority,
            "prefer": list(self.prefer), "max_error_rate": self.max_error_rate,
            "max_latency_ratio": self.max_latency_ratio, "max_latency_ms": self.max_latency_ms,
            "settings": self.settings.to_json(),
        }, sort_keys=True, separators=(",", ":"))
        if RolloutSpec.from_json(text) != self:
            raise ValueError(f"the rollout spec does not survive its stored form: {self!r}")
        return text

    @classmethod
    def from_json(cls, text: str) -> RolloutSpec:
        """Read a stored spec strictly: a wrong type is a ValueError, never a guess."""
        value = json.loads(text)

        def get(key: str, *types: type) -> Any:
            item = value.get(key) if isinstance(value, dict) else None
            if type(item) not in types:
                raise ValueError(f"stored rollout spec: {key} is {item!r}")
            return item

        target, prefer = get("target", dict), get("prefer", list)
        # Specs stored before package variants name none: theirs is the default.
        variant = value.get("variant", DEFAULT_VARIANT) if isinstance(value, dict) else None
        if not isinstance(variant, str) or not names.VARIANT.matches(variant):
            raise ValueError(f"stored rollout spec: variant is {variant!r}")
        if not all(isinstance(v, str) for v in (*target.values(), *prefer)):
            raise ValueError("stored rollout spec: target and prefer hold strings")
        budget = value.get("max_latency_ms")  # specs stored before budgets have none
        if budget is not None and (type(budget) not in (int, float) or budget <= 0):
            raise ValueError(f"stored rollout spec: max_latency_ms is {budget!r}")
        try:  # specs stored before settings have none
            settings = Settings.from_json(value.get("settings", {}))
        except SettingsError as exc:
            raise ValueError(f"stored rollout spec: {exc}") from None
        return cls(
            model=get("model", str), version=get("version", int), variant=variant,
            deployment=get("deployment", str), target=target,
            waves=tuple(Share.from_json(w, "wave") for w in get("waves", list)),
            max_failures=Share.from_json(get("max_failures", dict), "max_failures"),
            soak=Duration(get("soak_s", int)),
            device_timeout=Duration(get("device_timeout_s", int)),
            auto_rollback=get("auto_rollback", bool), traffic=get("traffic", int, type(None)),
            shadow=get("shadow", bool), priority=get("priority", int), prefer=tuple(prefer),
            max_error_rate=get("max_error_rate", float, int),
            max_latency_ratio=get("max_latency_ratio", float, int),
            max_latency_ms=None if budget is None else float(budget), settings=settings,
        )


def parse(*, model: str, version: int, deployment: str | None, target: Mapping[str, str],
          variant: str = OPTIONS["variant"].default,
          waves: str = OPTIONS["waves"].default,
          max_failures: str = OPTIONS["max_failures"].default,
          soak: str = OPTIONS["soak"].default,
          device_timeout: str = OPTIONS["device_timeout"].default,
          auto_rollback: bool = OPTIONS["auto_rollback"].default,
          traffic: int | None = OPTIONS["traffic"].default,
          shadow: bool = OPTIONS["shadow"].default,
          priority: int = OPTIONS["priority"].default,
          prefer: Sequence[str] = OPTIONS["prefer"].default,
          max_error_rate: float = OPTIONS["max_error_rate"].default,
          max_latency_ratio: float = OPTIONS["max_latency_ratio"].default,
          max_latency_ms: float | None = OPTIONS["max_latency_ms"].default,
          resources: Mapping[str, Any] | None = None,
          batching: Mapping[str, Any] | str | None = None) -> RolloutSpec:
    """Check what a user asked for (VERSION already resolved to a number) into a spec;
    InvalidInput with one line naming the option otherwise. What needs the database
    (the package, the devices) is `commands.create`'s to check."""
    validation.model_name(model)
    try:
        names.variant(variant)
    except names.InvalidName as exc:
        raise InvalidInput(str(exc)) from None
    if len(target) > MAX_TARGET:
        raise InvalidInput(f"the target has {len(target)} tags; the most it takes is "
                           f"{MAX_TARGET}")
    if traffic is not None and shadow:
        raise InvalidInput("choose --traffic (an A/B split) or --shadow, not both")
    if traffic is not None and not 1 <= traffic <= 99:
        raise InvalidInput(f"traffic {traffic}: give a share from 1% to 99%")
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInput(f"priority {priority}: use a number from {-MAX_PRIORITY} to "
                           f"{MAX_PRIORITY}")
    if not (math.isfinite(max_error_rate) and 0 <= max_error_rate <= 1):
        raise InvalidInput(f"max error rate {max_error_rate}: use a share from 0 to 1 "
                           "(0.05 is 5%)")
    if not (math.isfinite(max_latency_ratio) and max_latency_ratio > 1):
        raise InvalidInput(f"max latency ratio {max_latency_ratio}: use a number above 1 "
                           "(3 is three times the old version's p95)")
    if max_latency_ms is not None and not (math.isfinite(max_latency_ms) and
                                           0 < max_latency_ms <= 3_600_000):
        raise InvalidInput(f"max latency {max_latency_ms} ms: use a number of milliseconds "
                           "above 0 (and at most an hour)")
    timeout = validation.duration(device_timeout, "device timeout")
    if timeout < 1:
        raise InvalidInput("device timeout must be at least 1s")
    planned, threshold = parse_waves(waves), parse_max_failures(max_failures)
    return RolloutSpec(
        model=model, version=version, variant=variant,
        deployment=deployments.check_name(deployment or model),
        target=validation.tags(dict(target)), waves=planned, max_failures=threshold,
        soak=Duration(validation.duration(soak, "soak")), device_timeout=Duration(timeout),
        auto_rollback=auto_rollback, traffic=traffic, shadow=shadow, priority=priority,
        prefer=tuple(deployments.check_prefer(prefer)), max_error_rate=float(max_error_rate),
        max_latency_ratio=float(max_latency_ratio),
        max_latency_ms=None if max_latency_ms is None else float(max_latency_ms),
        settings=deployments.settings_from(resources, batching),
    )
