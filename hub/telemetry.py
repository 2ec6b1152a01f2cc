"""The telemetry store: points from devices, each stored exactly once.

Agents number their points per device; a batch resent after a reconnect
hits the (device_id, seq) primary key and is ignored, so ingestion is
idempotent. A batch is one transaction, so the ingest loop's cost is per
batch, not per point.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from hub.storage.db import Database, dumps, format_time

KINDS = ("system", "inference")


def ingest(db: Database, device_id: str, points: Iterable[Mapping[str, Any]]) -> int:
    """Store POINTS (each with seq, at, kind, values); returns how many were new."""
    rows = [(device_id, p["seq"], p["at"], p["kind"], dumps(p["values"])) for p in points]
    with db.transaction() as conn:
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO telemetry (device_id, seq, at, kind, metrics)"
            " VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        return conn.total_changes - before


def query(
    db: Database,
    device_id: str,
    *,
    since: str | None = None,
    kind: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    clauses, params = ["device_id = ?"], [device_id]
    if since:
        clauses.append("at >= ?")
        params.append(since)
    if kind:
        clauses.append("kind = ?")
        params.append(kind)
    rows = db.query(
        "SELECT seq, at, kind, metrics FROM telemetry WHERE " + " AND ".join(clauses)
        + " ORDER BY seq DESC LIMIT ?",
        [*params, limit],
    )
    return [
        {"seq": r["seq"], "at": r["at"], "kind": r["kind"], "values": json.loads(r["metrics"])}
        for r in reversed(rows)
    ]


def prune(db: Database, *, keep: timedelta) -> int:
    """Drop points older than KEEP; one statement for the whole fleet."""
    cutoff = format_time(datetime.now(UTC) - keep)
    with db.transaction() as conn:
        return conn.execute("DELETE FROM telemetry WHERE at < ?", (cutoff,)).rowcount
