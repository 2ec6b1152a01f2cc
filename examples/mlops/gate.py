"""The QA gate: what the QA devices' inference telemetry says about the new version.

Each inference point a device sends carries, per deployment and version, the
requests it served since the last point (`count`), how many failed
(`errors`) and latency percentiles of the rest (`p95_ms`). The gate sums them
over the QA devices and the window since the QA rollout began.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Health:
    devices: int          # QA devices that reported the version
    requests: int
    errors: int
    p95_ms: float | None  # the worst device's request-weighted mean p95; None: no successes

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def describe(self) -> str:
        p95 = "-" if self.p95_ms is None else f"{self.p95_ms:.1f} ms"
        return (f"{self.requests} requests on {self.devices} device(s), error rate "
                f"{self.error_rate:.2%}, p95 {p95}")


@dataclass(frozen=True)
class Limits:
    max_error_rate: float
    max_p95_ms: float
    min_requests: int

    def failures(self, health: Health) -> list[str]:
        """Why HEALTH does not pass; empty when it does."""
        why = []
        if health.error_rate > self.max_error_rate:
            why.append(f"error rate {health.error_rate:.2%} above {self.max_error_rate:.2%}")
        if health.p95_ms is not None and health.p95_ms > self.max_p95_ms:
            why.append(f"p95 {health.p95_ms:.1f} ms above {self.max_p95_ms:g} ms")
        return why


def health(points: Mapping[str, Iterable[Mapping[str, Any]]], deployment: str,
           version: int) -> Health:
    """HEALTH of VERSION of DEPLOYMENT from POINTS: device id -> its raw telemetry rows."""
    devices = requests = errors = 0
    worst: float | None = None
    for rows in points.values():
        count = failed = 0
        weighted = served = 0.0
        for row in rows:
            values = row.get("values", {})
            if row.get("kind") != "inference" or values.get("deployment") != deployment \
                    or values.get("version") != version:
                continue
            n, e = int(values.get("count", 0)), int(values.get("errors", 0))
            count, failed = count + n, failed + e
            if isinstance(values.get("p95_ms"), int | float) and n > e:
                weighted += values["p95_ms"] * (n - e)
                served += n - e
        if count:
            devices += 1
            requests, errors = requests + count, errors + failed
            if served:
                worst = max(worst or 0.0, weighted / served)
    return Health(devices, requests, errors, worst)
