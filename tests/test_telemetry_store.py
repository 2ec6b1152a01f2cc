"""The hub's telemetry store: exactly-once ingestion and queries (real SQLite; retention
is tests/test_telemetry_retention.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub import telemetry
from hub.storage.db import Database, dumps


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


VALUES = st.dictionaries(
    st.text(max_size=6),
    st.integers(min_value=-(2**65), max_value=2**65) | st.floats() | st.text(max_size=6)
    | st.sampled_from([1e-5, 9.99e-5, 1e-4, 1e-7, 1e16, 1e22, 5e-324, -0.0, "\x7f", "null",
                       "0.00001", "1e-5", "é", "\u2028", "\ud800", True, None]),
    max_size=6)


@settings(max_examples=500, deadline=None)
@given(values=VALUES)
def test_points_are_stored_as_the_json_they_always_were(values: dict) -> None:
    """metrics_json (orjson where it writes the same) gives dumps' bytes, or its error."""
    try:
        expected = dumps(values)
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            telemetry.metrics_json(values)
        return
    assert telemetry.metrics_json(values) == expected


def test_nested_and_odd_values_are_stored_as_dumps_writes_them() -> None:
    for values in ({"b": {"z": 1, "a": [1.5, 1e-6]}, "a": None}, {"n": float("nan")},
                   {"i": float("inf")}, {"big": 2**64}, {1: "int key"}):
        assert telemetry.metrics_json(values) == dumps(values)
