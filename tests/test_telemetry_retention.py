"""Telemetry retention and rollups on a real SQLite file: what is rolled up, what is kept,
what is deleted, late points, the upgrade from schema 2, and the API reading by window."""

from __future__ import annotations

import json
import random
import sqlite3
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hub import devices, rollups, telemetry, tokens
from hub.api.app import create_app
from hub.retention import Retention, RetentionPolicy, prune_batch, roll_up_batch
from hub.settings import HubSettings
from hub.storage.db import SCHEMA_VERSION, Database, format_time
from hubapp import bare_state

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
POLICY = RetentionPolicy(raw=timedelta(hours=48), minute=timedelta(days=14),
                         hour=timedelta(days=400), batch=7)  # small: many transactions


def add_device(db: Database, device_id: str) -> None:
    with db.transaction() as conn:
        conn.execute("INSERT INTO devices (id, name, tags, status, desired_generation,"
                     " applied_generation, published_generation) VALUES (?, ?, '{}', 'online',"
                     " 0, 0, 0)", (device_id, device_id))


def fill(db: Database, device_id: str, start: datetime, count: int, every: timedelta,
         first_seq: int = 1) -> list[dict]:
    """COUNT system points and COUNT inference points (version 1, then 2) from START."""
    points = []
    for i in range(count):
        at = format_time(start + i * every)
        points.append({"seq": first_seq + 2 * i, "at": at, "kind": "system",
                       "values": {"cpu_percent": float(i % 10), "memory_percent": 50.0,
                                  "label": "text is not aggregated"}})
        points.append({"seq": first_seq + 2 * i + 1, "at": at, "kind": "inference",
                       "values": {"deployment": "det", "version": 1 if i % 2 else 2,
                                  "count": 10, "errors": i % 3, "p95_ms": 4.0 + i % 5}})
    assert telemetry.ingest(db, device_id, points) == len(points)
    return points


def rollup_rows(db: Database, period: int) -> list[dict]:
    return db.query("SELECT * FROM telemetry_rollups WHERE period = ? ORDER BY device_id,"
                    " start, kind, version", (period,))


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "hub.db")


def test_stats_merge_like_one_and_their_percentiles_are_within_a_bucket() -> None:
    values = [random.Random(7).uniform(1, 1000) for _ in range(5000)]
    whole, left, right = rollups.Stat(), rollups.Stat(), rollups.Stat()
    for i, v in enumerate(values):
        whole.add(v)
        (left if i % 3 else right).add(v)
    left.merge(right)
    assert left.to_json()[0] == whole.to_json()[0] and left.histogram == whole.histogram
    assert left.sum == pytest.approx(whole.sum)
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[int(q * len(ordered)) - 1]
        assert whole.quantile(q) == pytest.approx(exact, rel=0.1)
    assert rollups.Stat.from_json(json.loads(json.dumps(whole.to_json()))) == whole
    signs = rollups.Stat()
    for v in (-5.0, 0.0, 3.0):
        signs.add(v)
    assert signs.quantile(0.01) == -5.0 and signs.quantile(0.5) == 0.0
    assert signs.quantile(1.0) == 3.0  # kept inside [min, max]


def test_the_policy_is_checked_when_made() -> None:
    with pytest.raises(ValueError, match="at least an hour"):
        RetentionPolicy(raw=timedelta(minutes=5))
    with pytest.raises(ValueError, match="grow with the resolution"):
        RetentionPolicy(raw=timedelta(days=30), minute=timedelta(days=14))
    with pytest.raises(ValueError, match="--telemetry-raw-hours"):
        HubSettings(telemetry_raw_hours=24 * 30)


def test_raw_points_are_rolled_up_per_minute_and_hour_then_deleted_past_retention(
        db: Database) -> None:
    add_device(db, "dev-1")
    add_device(db, "dev-2")
    start = NOW - timedelta(days=3)
    dev1 = fill(db, "dev-1", start, 3 * 24 * 6, timedelta(minutes=10))  # 3 days, every 10 min
    fill(db, "dev-2", NOW - timedelta(minutes=30), 30, timedelta(minutes=1))
    # Nothing is deleted before it is rolled up, however old.
    assert prune_batch(db, "raw", NOW, 1000) == 0

    retention = Retention(db, POLICY, clock=lambda: NOW, pause=0, duty=1)
    retention.run_once()
    stats = retention.stats()
    assert stats["rolled_up"] == len(dev1) + 60 and stats["passes"] == 1
    kept = telemetry.query(db, "dev-1", limit=100_000)
    assert min(p["at"] for p in kept) >= format_time(NOW - POLICY.raw)  # older raw points gone
    assert stats["deleted"]["raw"] == len(dev1) - len(kept)

    # Per minute: one system and one inference rollup per 10-minute point of dev-1.
    minutes = [r for r in rollup_rows(db, 60) if r["device_id"] == "dev-1"]
    assert len(minutes) == len(dev1)
    hours = [r for r in rollup_rows(db, 3600) if r["device_id"] == "dev-1"]
    system_hours = [r for r in hours if r["kind"] == "system"]
    assert len(system_hours) == 72 and all(r["points"] == 6 for r in system_hours)
    # An hour's inference rollups are split by version; counts and maxima add up.
    first_hour = [r for r in hours if r["start"] == format_time(start)]
    by_version = {r["version"]: rollups.Rollup.loads(r["points"], r["stats"])
                  for r in first_hour if r["kind"] == "inference"}
    assert {v: r.points for v, r in by_version.items()} == {"1": 3, "2": 3}
    assert by_version["2"].stats["count"].sum == 30
    assert by_version["2"].stats["p95_ms"].max == 8.0  # i = 0, 2, 4: 4 + i % 5
    system = rollups.Rollup.loads(system_hours[0]["points"], system_hours[0]["stats"])
    assert set(system.stats) == {"cpu_percent", "memory_percent"}  # text is no number
    assert system.stats["cpu_percent"].summary()["mean"] == pytest.approx(2.5)  # 0..5

    # A second pass finds nothing new; a late point (higher seq, old time) merges in.
    retention.run_once()
    assert retention.stats()["rolled_up"] == len(dev1) + 60
    late = start + timedelta(minutes=1)
    telemetry.ingest(db, "dev-1", [{"seq": 10_000, "at": format_time(late), "kind": "system",
                                    "values": {"cpu_percent": 99.0}}])
    retention.run_once()
    merged = db.query_one("SELECT * FROM telemetry_rollups WHERE device_id = 'dev-1' AND"
                          " period = 3600 AND start = ? AND kind = 'system'",
                          (format_time(start),))
    assert merged is not None and merged["points"] == 7
    assert rollups.Rollup.loads(merged["points"], merged["stats"]).stats[
        "cpu_percent"].max == 99.0
    assert not telemetry.query(db, "dev-1", since=format_time(late),
                               until=format_time(late + timedelta(minutes=1)))  # raw: deleted

    # Rollups go when their own time is up.
    later = NOW + timedelta(days=15)
    Retention(db, POLICY, clock=lambda: later, pause=0, duty=1).run_once()
    assert not [r for r in rollup_rows(db, 60) if r["start"] < format_time(later - POLICY.minute)]
    assert len([r for r in rollup_rows(db, 3600) if r["device_id"] == "dev-1"]) == len(hours)
    assert not telemetry.query(db, "dev-2")  # 15 days on, every raw point is gone

    devices.delete_device(db, "dev-1")
    assert not db.query("SELECT 1 FROM telemetry_rollups WHERE device_id = 'dev-1'")
    assert not db.query("SELECT 1 FROM telemetry_rolled WHERE device_id = 'dev-1'")


def test_rolling_up_while_ingest_writes_counts_every_point_once(db: Database) -> None:
    add_device(db, "dev-1")
    retention = Retention(db, POLICY, clock=lambda: NOW, interval=0.001, pause=0, duty=1)
    retention.start()
    written = 0
    try:
        for batch in range(40):
            written += len(fill(db, "dev-1", NOW - timedelta(hours=1, minutes=batch), 25,
                                timedelta(seconds=2), first_seq=1 + 50 * batch))
    finally:
        retention.stop()
    assert retention.stats()["failures"] == 0
    Retention(db, POLICY, clock=lambda: NOW, pause=0, duty=1).run_once()  # the rest
    for period in (60, 3600):
        assert sum(r["points"] for r in rollup_rows(db, period)) == written


def test_a_schema_3_database_is_upgraded_and_its_points_rolled_up(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    Database(path)
    conn = sqlite3.connect(path)  # what a hub before rollups left behind
    conn.executescript("DROP TABLE telemetry_rollups; DROP TABLE telemetry_rolled;"
                       " ALTER TABLE deployments DROP COLUMN settings;"
                       " ALTER TABLE rollout_devices DROP COLUMN previous_settings;"
                       " DROP TABLE webhook_deliveries; DROP TABLE webhooks; DROP TABLE events;"
                       " DROP TABLE model_profiles; DROP TABLE drift_baselines;"
                       " DROP TABLE drift_sketches; DROP TABLE drift_results;"
                       " DROP TABLE device_commands;"
                       " UPDATE meta SET value = '3' WHERE key = 'schema_version';")
    conn.execute("INSERT INTO devices (id, name, tags) VALUES ('dev-1', 'one', '{}')")
    conn.execute("INSERT INTO telemetry VALUES ('dev-1', 1, ?, 'system', '{\"cpu_percent\":7}')",
                 (format_time(NOW - timedelta(days=5)),))
    conn.commit()
    conn.close()
    db = Database(path)
    assert db.query_one("SELECT value FROM meta WHERE key = 'schema_version'") == {
        "value": str(SCHEMA_VERSION)}
    assert roll_up_batch(db, 100) == 0  # the device is not tracked until a pass starts
    Retention(db, POLICY, clock=lambda: NOW, pause=0, duty=1).run_once()
    assert [r["points"] for r in rollup_rows(db, 3600)] == [1]
    assert not telemetry.query(db, "dev-1")  # rolled up, then past raw retention
    Database(path)  # opening again changes nothing
    assert len(rollup_rows(db, 60)) == 1


@pytest.mark.parametrize(("back", "span", "expected"), [
    (timedelta(hours=1), timedelta(hours=1), "raw"),
    (timedelta(hours=6), timedelta(hours=6), "raw"),
    (timedelta(hours=24), timedelta(hours=24), "minute"),
    (timedelta(hours=47), timedelta(hours=1), "raw"),
    (timedelta(days=3), timedelta(hours=1), "minute"),  # raw points of then are gone
    (timedelta(days=7), timedelta(days=7), "hour"),
    (timedelta(days=20), timedelta(hours=1), "hour"),
])
def test_the_resolution_follows_the_window(back: timedelta, span: timedelta,
                                           expected: str) -> None:
    since = NOW - back
    assert telemetry.choose_resolution(since, since + span, NOW, POLICY) == expected


@pytest.fixture
def api(tmp_path: Path, db: Database) -> Iterator[TestClient]:
    _, secret = tokens.create(db, name="viewer", role="viewer", created_by="test")
    with TestClient(create_app(bare_state(tmp_path, db)),
                    headers={"Authorization": f"Bearer {secret}"}) as client:
        yield client


def test_the_api_reads_raw_points_or_rollups_by_the_window_and_says_which(
        api: TestClient, db: Database) -> None:
    add_device(db, "dev-1")
    now = datetime.now(UTC).replace(microsecond=0)
    fill(db, "dev-1", now - timedelta(days=3), 3 * 24 * 6, timedelta(minutes=10))
    Retention(db, RetentionPolicy(), pause=0, duty=1).run_once()
    path = "/api/v1/devices/dev-1/telemetry"

    recent = api.get(path, params={"since": format_time(now - timedelta(hours=1))})
    assert recent.headers["x-edgefleet-resolution"] == "raw"
    assert {p["resolution"] for p in recent.json()} == {"raw"}
    assert len(recent.json()) == 12  # 6 system and 6 inference points

    week = api.get(path, params={"since": format_time(now - timedelta(days=7)),
                                 "kind": "inference"})
    assert week.headers["x-edgefleet-resolution"] == "hour"
    items = week.json()
    assert {i["resolution"] for i in items} == {"hour"}
    assert {(i["deployment"], i["version"]) for i in items} == {("det", 1), ("det", 2)}
    assert sum(i["points"] for i in items) == 3 * 24 * 6
    assert set(items[0]["values"]["p95_ms"]) == {"count", "sum", "mean", "min", "max", "p50",
                                                 "p95", "p99"}

    day = api.get(path, params={"since": format_time(now - timedelta(days=1)),
                                "resolution": "minute", "limit": 5})
    assert day.headers["x-edgefleet-resolution"] == "minute"
    assert len(day.json()) == 5 and day.json()[-1]["start"] > day.json()[0]["start"]
    assert api.get(path).json() and api.get(path).headers["x-edgefleet-resolution"] == "raw"
    assert api.get(path, params={"resolution": "daily"}).status_code == 422


def test_the_dashboard_draws_a_week_from_hour_rollups(db: Database) -> None:
    from hub.ui import queries

    add_device(db, "dev-1")
    fill(db, "dev-1", NOW - timedelta(days=7), 7 * 24 * 6, timedelta(minutes=10))
    Retention(db, POLICY, clock=lambda: NOW, pause=0, duty=1).run_once()
    data = queries.device_telemetry(db, "dev-1", timedelta(days=7), end=NOW, policy=POLICY)
    assert data.points == 2 * 7 * 24 * 6
    assert len(data.cpu[0].points) == queries.BUCKETS  # 168 hours into 120 buckets
    assert all(0 <= v <= 9 for _, v in data.cpu[0].points)
    assert [s.label for s in data.requests] == ["det v1", "det v2"]
    total = sum(v for series in data.requests for _, v in series.points)
    width = timedelta(days=7).total_seconds() / queries.BUCKETS
    assert total * width == pytest.approx(10 * 7 * 24 * 6)  # every request counted once
    assert [s.label for s in data.latency] == ["det v1 p95", "det v2 p95"]

