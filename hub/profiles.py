"""Model profiles stored with their version, and the latency budget a rollout can set.

A profile row (contract/profiles.py) is keyed by version, device class (an OCI
platform), runtime, device, variant and batch size; storing a measurement of a key
that has one replaces it, so the newest measurement on a machine of that class is
the one the hub knows. Profiles go with their version when it is deleted.

A rollout with a latency budget (`--max-latency-ms P99`) is refused unless, for
every device class among its target's devices, the version's profile of the
rollout's variant at batch size 1 has a p99 within it on the runtime the package
serves with; when that runtime was profiled on several devices (CPU, GPU), the
slowest counts, since the budget must hold wherever the agent lands. A class with
no such profile is refused too: a budget nobody measured is no budget.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from contract import names
from contract.profiles import MAX_BATCH, MAX_ITERATIONS
from contract.runtimes import DEVICE_PLATFORMS, RUNTIMES
from hub.errors import Unprocessable
from hub.storage.db import Connection, Database, now
from hub.validation import InvalidInput

MAX_ROWS = 1000  # one post: far more runtimes x devices x variants x batch sizes than exist
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
COLUMNS = ("device_class", "runtime", "device", "variant", "batch", "iterations", "p50_ms",
           "p99_ms", "throughput", "peak_rss_bytes", "host", "profiled_at", "profiled_by")


def _number(row: Mapping[str, Any], key: str, *, whole: bool = False) -> float:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or value < 0 or (whole and not isinstance(value, int)):
        kind = "a whole number" if whole else "a finite number"
        raise InvalidInput(f"profile {key} must be {kind} of at least 0, got {value!r:.40}")
    return value


def check_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """ROW as stored, or InvalidInput naming its first bad field."""
    device_class, runtime, device = row.get("device_class"), row.get("runtime"), row.get("device")
    if device_class not in DEVICE_PLATFORMS:
        raise InvalidInput(f"profile device_class {str(device_class)[:40]!r} is not a device "
                           f"platform; use one of {', '.join(DEVICE_PLATFORMS)}")
    if runtime not in RUNTIMES:
        raise InvalidInput(f"profile runtime {str(runtime)[:40]!r} is unknown; use one of "
                           f"{', '.join(RUNTIMES)}")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise InvalidInput(f"profile device {str(device)[:40]!r} is not a device name like "
                           "CPU or GPU.0")
    try:
        variant = names.variant(str(row.get("variant")))
    except names.InvalidName as exc:
        raise InvalidInput(f"profile variant: {exc}") from None
    batch, iterations = _number(row, "batch", whole=True), _number(row, "iterations", whole=True)
    if not 1 <= batch <= MAX_BATCH:
        raise InvalidInput(f"profile batch {batch} is outside 1..{MAX_BATCH}")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise InvalidInput(f"profile iterations {iterations} is outside 1..{MAX_ITERATIONS}")
    checked = {"device_class": device_class, "runtime": runtime, "device": device,
               "variant": variant, "batch": batch, "iterations": iterations}
    for key in ("p50_ms", "p99_ms", "throughput"):
        checked[key] = float(_number(row, key))
    checked["peak_rss_bytes"] = _number(row, "peak_rss_bytes", whole=True)
    if checked["p50_ms"] > checked["p99_ms"]:
        raise InvalidInput(f"profile p50_ms {checked['p50_ms']} is above its p99_ms "
                           f"{checked['p99_ms']}")
    return checked


def store(db: Database, model: str, version: int, rows: Sequence[Mapping[str, Any]], *,
          host: str, profiled_by: str) -> list[dict[str, Any]]:
    """Check ROWS, measured on HOST, and store them with MODEL:VERSION (which exists: the
    caller looked it up); all its rows now."""
    if not 1 <= len(rows) <= MAX_ROWS:
        raise InvalidInput(f"a profile has 1-{MAX_ROWS} rows, got {len(rows)}")
    if not host or not host.isprintable():  # shown as it is in listings
        raise InvalidInput(f"profile host {host[:40]!r} is empty or has control characters")
    checked = [check_row(row) for row in rows]
    stamp = now()
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO model_profiles (model, version, device_class, runtime, device, variant,"
            " batch, iterations, p50_ms, p99_ms, throughput, peak_rss_bytes, host, profiled_at,"
            " profiled_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (model, version, device_class, runtime, device, variant, batch)"
            " DO UPDATE SET iterations = excluded.iterations, p50_ms = excluded.p50_ms,"
            " p99_ms = excluded.p99_ms, throughput = excluded.throughput,"
            " peak_rss_bytes = excluded.peak_rss_bytes, host = excluded.host,"
            " profiled_at = excluded.profiled_at, profiled_by = excluded.profiled_by",
            [(model, version, *(r[k] for k in COLUMNS[:10]), host, stamp, profiled_by)
             for r in checked])
    return read(db, model, version)


def read(db: Database, model: str, version: int) -> list[dict[str, Any]]:
    """MODEL:VERSION's profile rows, ordered by their key."""
    return db.query(
        f"SELECT {', '.join(COLUMNS)} FROM model_profiles WHERE model = ? AND version = ?"
        " ORDER BY device_class, variant, runtime, device, batch", (model, version))


def delete(conn: Connection, model: str, version: int) -> None:
    """Forget MODEL:VERSION's profiles, in the caller's transaction (the version's delete)."""
    conn.execute("DELETE FROM model_profiles WHERE model = ? AND version = ?", (model, version))


def check_budget(db: Database, *, model: str, version: int, variant: str, runtime: str | None,
                 device_classes: Sequence[str], max_latency_ms: float) -> None:
    """Unprocessable (one line with the next step) unless MODEL:VERSION's VARIANT meets
    MAX_LATENCY_MS at p99 and batch size 1 on every one of DEVICE_CLASSES, on RUNTIME (the
    package's; any runtime when None). See the module's docstring."""
    ref = f"{model}:{version}"
    flag = "" if variant == names.DEFAULT_VARIANT else f" --variant {variant}"
    rows = db.query(
        "SELECT device_class, runtime, device, p99_ms FROM model_profiles WHERE model = ?"
        " AND version = ? AND variant = ? AND batch = 1"
        " AND device_class IN (SELECT value FROM json_each(?))"
        + (" AND runtime = ?" if runtime else ""),
        (model, version, variant, json.dumps(list(device_classes)),
         *([runtime] if runtime else [])))
    on = f" on {runtime}" if runtime else ""
    for device_class in sorted(device_classes):
        mine = [r for r in rows if r["device_class"] == device_class]
        if not mine:
            raise Unprocessable(
                f"{ref}{flag} has no profile{on} at batch size 1 on {device_class}, so its "
                f"latency budget of {max_latency_ms:g} ms cannot be checked; run `edgefleet "
                f"model profile {ref}` on a {device_class} machine first, or leave out "
                "--max-latency-ms")
        slowest = max(mine, key=lambda r: r["p99_ms"])
        if slowest["p99_ms"] > max_latency_ms:
            raise Unprocessable(
                f"{ref}{flag} has a p99 latency of {slowest['p99_ms']:g} ms at batch size 1 on "
                f"{device_class} ({slowest['runtime']}:{slowest['device']}), over the budget of "
                f"{max_latency_ms:g} ms; roll out a faster version or variant (e.g. "
                "`package build --optimize int8`), or raise --max-latency-ms")
