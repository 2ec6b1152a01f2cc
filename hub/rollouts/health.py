"""Is a device's new version healthy? Judged from its inference telemetry since its wave
started: the error rate against `max_error_rate`, the p95 latency against
`max_latency_ratio` times the previous version's. Either needs at least
MIN_REQUESTS requests on a version to say anything: one slow first request (a fresh
session's) says nothing about a version."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hub.rollouts.spec import RolloutSpec
from hub.storage.db import Database

MIN_REQUESTS = 10


@dataclass
class Totals:
    """One device's inference telemetry, new version beside the others."""

    count: float = 0
    errors: float = 0
    p95: float = 0.0
    old_count: float = 0
    old_p95: float = 0.0


def totals(points: Iterable[tuple[str, Mapping[str, object]]], *, deployment: str,
           version: int) -> dict[str, Totals]:
    """Add up (device id, metrics) points of DEPLOYMENT per device."""
    found: dict[str, Totals] = {}
    for device, values in points:
        if values.get("deployment") != deployment:
            continue
        t = found.setdefault(device, Totals())
        count, errors, p95 = (_number(values, k) for k in ("count", "errors", "p95_ms"))
        if values.get("version") == version:
            t.count += count
            t.errors += errors
            t.p95 = max(t.p95, p95)
        else:
            t.old_count += count
            t.old_p95 = max(t.old_p95, p95)
    return found


def _number(values: Mapping[str, object], key: str) -> float:
    value = values.get(key, 0)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def verdict(t: Totals, spec: RolloutSpec) -> str | None:
    """Why the new version is unhealthy on this device, or None."""
    if t.count >= MIN_REQUESTS and t.errors / t.count > spec.max_error_rate:
        return (f"unhealthy: error rate {t.errors / t.count:.1%} of {int(t.count)} requests "
                f"is above {spec.max_error_rate:.1%}")
    if (min(t.count, t.old_count) >= MIN_REQUESTS and t.old_p95
            and t.p95 > spec.max_latency_ratio * t.old_p95):
        return (f"unhealthy: p95 latency {t.p95:.1f} ms is more than "
                f"{spec.max_latency_ratio:g}x the previous version's {t.old_p95:.1f} ms")
    return None


def unhealthy(db: Database, spec: RolloutSpec, serving: Sequence[str], *,
              since: str) -> dict[str, str]:
    """Devices of SERVING whose new version errs or slows down too much since SINCE."""
    if not serving:
        return {}
    points = db.query(
        "SELECT device_id, metrics FROM telemetry WHERE kind = 'inference' AND at >= ?"
        " AND device_id IN (SELECT value FROM json_each(?))", (since, json.dumps(list(serving))))
    found = totals(((p["device_id"], json.loads(p["metrics"])) for p in points),
                   deployment=spec.deployment, version=spec.version)
    verdicts = {device: verdict(t, spec) for device, t in found.items()}
    return {device: why for device, why in verdicts.items() if why is not None}
