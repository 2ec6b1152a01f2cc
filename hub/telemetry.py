"""The telemetry store: points from devices, each stored exactly once.

Agents number their points per device; a batch resent after a reconnect
hits the (device_id, seq) primary key and is ignored, so ingestion is
idempotent. A batch is one transaction, so the ingest loop's cost is per
batch, not per point.

Raw points are kept for a while, then only their per-minute and per-hour
rollups (hub/retention.py, hub/rollups.py); a reader asks for a window and
gets the finest resolution that holds it (`choose_resolution`), each item
saying which it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final

import orjson

from hub import rollups
from hub.retention import RetentionPolicy
from hub.storage.db import Database, dumps, format_time

KINDS = ("system", "inference")


def ingest(db: Database, device_id: str, points: Iterable[Mapping[str, Any]]) -> int:
    """Store POINTS (each with seq, at, kind, values); returns how many were new."""
    return store(db, [(device_id, p["seq"], p["at"], p["kind"], p["values"]) for p in points])


def store(db: Database, rows: Iterable[tuple[str, int, str, str, Mapping[str, Any]]]) -> int:
    """Store points of any devices, each (device_id, seq, at, kind, values), in one
    statement: the ingest loop's whole batch at once. Returns how many were new."""
    encoded = [(device, seq, at, kind, metrics_json(values))
               for device, seq, at, kind, values in rows]
    with db.transaction() as conn:
        return conn.executemany(
            "INSERT INTO telemetry (device_id, seq, at, kind, metrics)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            encoded,
        ).rowcount


_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS
            | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS)
_SHORT_EXPONENT = re.compile(rb"e-[0-9](?![0-9])")


def metrics_json(values: Mapping[str, Any]) -> str:
    """`dumps(VALUES)`, the same text, written by orjson when it writes the same (a
    point's values, as the protocol reads them, always but for the rare float or
    non-ASCII string); else by `dumps`, which also raises what it always raised.
    Values of JSON's types only: orjson would also write a UUID or an Enum, which
    `dumps` refuses (the protocol reads neither)."""
    try:
        encoded = orjson.dumps(values, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return dumps(values)
    # Where the two may differ: any byte above ASCII or DEL (json escapes them); a
    # float json writes with a one-digit exponent ("1e-05": orjson "1e-5" or
    # "0.00001"); null (json writes a NaN as NaN, orjson as null).
    if (not encoded.isascii() or b"\x7f" in encoded or b"null" in encoded
            or b"0.0000" in encoded or b"e-" in encoded and _SHORT_EXPONENT.search(encoded)):
        return dumps(values)
    return encoded.decode("ascii")


def query(
    db: Database,
    device_id: str,
    *,
    since: str | None = None,
    until: str | None = None,
    kind: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """The device's raw points in [SINCE, UNTIL), the newest LIMIT of them, oldest first."""
    clauses, params = ["device_id = ?"], [device_id]
    for clause, value in (("at >= ?", since), ("at < ?", until), ("kind = ?", kind)):
        if value:
            clauses.append(clause)
            params.append(value)
    rows = db.query(
        "SELECT seq, at, kind, metrics FROM telemetry WHERE " + " AND ".join(clauses)
        + " ORDER BY seq DESC LIMIT ?",
        [*params, limit],
    )
    return [
        {"resolution": "raw", "seq": r["seq"], "at": r["at"], "kind": r["kind"],
         "values": json.loads(r["metrics"])}
        for r in reversed(rows)
    ]


# The longest window read from raw points, and from minute rollups: beyond these a window
# has more rows than a chart or a terminal shows (6 h of 10 s points is 2,160 a kind).
RAW_SPAN: Final = timedelta(hours=6)
MINUTE_SPAN: Final = timedelta(days=3)


def choose_resolution(since: datetime, until: datetime, now: datetime,
                      policy: RetentionPolicy) -> str:
    """raw, minute or hour: the finest that still holds the whole window and is not
    too many rows for it."""
    span, age = until - since, now - since
    if age <= policy.raw and span <= RAW_SPAN:
        return "raw"
    if age <= policy.minute and span <= MINUTE_SPAN:
        return "minute"
    return "hour"


def query_rollups(
    db: Database,
    device_id: str,
    resolution: str,
    *,
    since: datetime,
    until: datetime,
    kind: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """The device's RESOLUTION rollups ('minute' or 'hour') whose buckets start in
    [SINCE, UNTIL) (SINCE rounded down to its bucket), the newest LIMIT, oldest first."""
    period = rollups.PERIODS[resolution]
    params: list[Any] = [device_id, period, rollups.bucket_start(since, period),
                         format_time(until)]
    where = "device_id = ? AND period = ? AND start >= ? AND start < ?"
    if kind:
        where += " AND kind = ?"
        params.append(kind)
    rows = db.query("SELECT * FROM telemetry_rollups WHERE " + where
                    + " ORDER BY start DESC, kind, deployment, version DESC LIMIT ?",
                    [*params, limit])
    return [_rollup_item(resolution, r) for r in reversed(rows)]


def _rollup_item(resolution: str, row: Mapping[str, Any]) -> dict[str, Any]:
    rollup = rollups.Rollup.loads(row["points"], row["stats"])
    item: dict[str, Any] = {"resolution": resolution, "start": row["start"], "kind": row["kind"]}
    if row["kind"] == "inference":
        version = row["version"]
        item["deployment"] = row["deployment"]
        item["version"] = int(version) if version.isascii() and version.isdigit() else version
    item["points"] = rollup.points
    item["values"] = {name: stat.summary() for name, stat in rollup.stats.items()}
    return item
