"""What the agent measures: the device (system points) and its models (inference points).

Inference points come from the serving process's counters (`/control/stats`):
each point is the difference since the previous read, per deployment
version: requests, failures, and latency percentiles estimated from the
histogram buckets that moved, and the drift sketch counts that moved
(agent/sketches.py), under `SKETCHES`: the uplink sends them beside the point's
values (contract/protocol.py `Point.sketches`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import procfs

Values = dict[str, int | float | str]
SKETCHES = "sketches"  # an inference point's drift sketches, until the uplink sends it


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


def system_point(data_dir: Path, serving_pid: int | None, cpu: procfs.CpuPercent, *,
                 dropped: int) -> Values:
    """The device's own numbers; cpu_percent is the system's since CPU's previous call."""
    total, available = procfs.memory()
    disk = os.statvfs(data_dir)  # shutil.disk_usage's free, without shutil's bz2 and lzma
    values: Values = {
        "cpu_percent": cpu(),
        "memory_percent": round((total - available) / total * 100, 1),
        "memory_available_mb": _mb(available),
        "disk_free_mb": _mb(disk.f_bavail * disk.f_frsize),
        "agent_rss_mb": _mb(procfs.rss(os.getpid()) or 0),
        "telemetry_dropped": dropped,
    }
    serving_rss = procfs.rss(serving_pid) if serving_pid is not None else None
    if serving_rss is not None:
        values["serving_rss_mb"] = _mb(serving_rss)
    temperature = procfs.temperature()
    if temperature is not None:
        values["temperature_c"] = temperature
    return values


def percentile(bounds: Sequence[float | None], counts: Sequence[int], q: float) -> float | None:
    """The Q-quantile (0..1) of a bucketed distribution, interpolated inside its bucket."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count and seen + count >= rank:
            if bound is None:  # the +Inf bucket: the best we can say is its lower edge
                return lower
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        if bound is not None:
            lower = bound
    return lower


class InferenceDeltas:
    """Turns cumulative counters into per-interval inference points."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], dict[str, Any]] = {}

    def points(self, stats: list[dict[str, Any]]) -> list[Values]:
        points = []
        for row in stats:
            key = (row["model"], row["version"])
            before = self._last.get(key)
            self._last[key] = row
            requests = row["requests"] - (before["requests"] if before else 0)
            failures = row["failures"] - (before["failures"] if before else 0)
            moved = sketch_deltas(row.get("sketches") or {},
                                   (before.get("sketches") or {}) if before else {})
            if requests <= 0 and failures <= 0 and not moved:  # a shadow's copies move only these
                continue
            counts = row["latency_counts"]
            if before and before["latency_counts"]:
                # empty after restart
                counts = [a - b for a, b in zip(counts, before["latency_counts"], strict=False)]
            latency_sum = row["latency_sum"] - (before["latency_sum"] if before else 0.0)
            ok = sum(counts)
            values: Values = {
                "deployment": row["model"],
                "version": int(row["version"]) if str(row["version"]).isdigit() else row["version"],
                "count": requests,
                "errors": failures,
            }
            if ok:
                values["mean_ms"] = round(latency_sum / ok * 1000, 3)
                for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
                    value = percentile(row["latency_buckets"], counts, q)
                    if value is not None:
                        values[name] = round(value * 1000, 3)
            if moved:
                values[SKETCHES] = moved  # type: ignore[assignment]
            points.append(values)
        return points


def sketch_deltas(now: dict[str, list[int]], then: dict[str, list[int]]) -> dict[str, list[int]]:
    """Counts added since THEN, per feature; a feature whose counts went down (the serving
    process restarted) counts from zero. Kubernetes mode runs each pod's counts through it
    too, before they are summed (agent/kube/scrape.py)."""
    moved = {}
    for name, counts in now.items():
        old = then.get(name)
        delta = counts if old is None or len(old) != len(counts) else [
            a - b for a, b in zip(counts, old, strict=True)]
        if any(d < 0 for d in delta):
            delta = counts
        if any(delta):
            moved[name] = delta
    return moved
