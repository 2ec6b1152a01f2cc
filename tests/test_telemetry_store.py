"""The hub's telemetry store: exactly-once ingestion and queries (real SQLite; retention
is tests/test_telemetry_retention.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hub import telemetry
from hub.storage.db import Database


def stamp(ago: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) - ago).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def points(first: int, last: int, ago: timedelta = timedelta()) -> list[dict]:
    return [
        {"seq": s, "at": stamp(ago), "kind": "inference", "values": {"count": s}}
        for s in range(first, last + 1)
    ]


def test_resent_points_are_stored_once(any_db: Database) -> None:
    db = any_db
    assert telemetry.ingest(db, "dev-1", points(1, 100)) == 100
    # a reconnect resends an overlapping batch
    assert telemetry.ingest(db, "dev-1", points(51, 150)) == 50
    # another device's sequence numbers are its own
    assert telemetry.ingest(db, "dev-2", points(1, 10)) == 10
    stored = telemetry.query(db, "dev-1", limit=1000)
    assert [p["seq"] for p in stored] == list(range(1, 151))


def test_query_filters(any_db: Database) -> None:
    db = any_db
    telemetry.ingest(db, "dev-1", points(1, 5, ago=timedelta(days=10)))
    telemetry.ingest(
        db, "dev-1", [{"seq": 6, "at": stamp(), "kind": "system", "values": {"cpu": 3}}]
    )
    assert [p["seq"] for p in telemetry.query(db, "dev-1", since=stamp(timedelta(hours=1)))] == [6]
    assert [p["seq"] for p in telemetry.query(db, "dev-1", kind="inference")] == [1, 2, 3, 4, 5]
    assert [p["seq"] for p in telemetry.query(db, "dev-1", limit=2)] == [5, 6]
    older = telemetry.query(db, "dev-1", until=stamp(timedelta(hours=1)))
    assert [p["seq"] for p in older] == [1, 2, 3, 4, 5]
    assert {p["resolution"] for p in older} == {"raw"}
