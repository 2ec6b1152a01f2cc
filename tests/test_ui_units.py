"""The dashboard's pure parts and its queries, on a real SQLite database: charts, the
fleet filter, telemetry buckets, the CSRF token, the form-to-API-request mapping."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from hub.storage.db import Database, format_time
from hub.ui import charts, queries, session
from hub.ui.queries import FleetFilter, Series
from hub.ui.routes import _next, _rollout_request
from hub.validation import InvalidInput


def test_nice_ceilings_have_short_quarters() -> None:
    assert [charts.nice_ceiling(v) for v in (0, 0.3, 1, 1.1, 2.6, 4.2, 37, 99, 101)] == [
        1.0, 0.4, 1, 2, 4, 5, 40, 100, 200]


def test_a_chart_breaks_its_line_at_gaps_and_keeps_inside_its_axes() -> None:
    series = Series("cpu", [(0, 10.0), (10, 20.0), (100, 30.0), (110, 500.0)])
    chart = charts.line_chart("CPU", "%", [series, Series("empty")], start=0, end=120, gap=15,
                              y_max=100.0)
    assert len(chart.lines) == 1  # the empty series is not drawn
    path = chart.lines[0].path
    assert path.startswith("M") and path.count("M") == 2  # 10 -> 100 is a gap
    ys = [float(part.split(",")[1]) for part in path.split()]
    assert min(ys) >= chart.top and max(ys) <= chart.bottom  # 500 is clipped to the top
    assert chart.lines[0].last == "500"
    assert [label for _, label in chart.y_ticks] == ["0", "25", "50", "75", "100"]
    with pytest.raises(ValueError, match="start < end"):
        charts.line_chart("CPU", "%", [series], start=5, end=5, gap=1)


def test_the_fleet_filter_reads_its_query_string_and_builds_links() -> None:
    f = FleetFilter.parse({"status": "online", "page": "x", "q": "  cam  ", "tag": "a=b"})
    assert (f.status, f.page, f.q) == ("online", 1, "cam")
    assert f.query(page=3) == {"status": "online", "q": "cam", "tag": "a=b", "page": "3"}
    assert f.query(tag="") == {"status": "online", "q": "cam"}  # page 1 is left out
    where, params = f.where()
    assert where.count("?") == len(params) == 4


@pytest.fixture
def db(any_db: Database) -> Database:
    """The dashboard's queries on SQLite, then on PostgreSQL."""
    return any_db


def _device(db: Database, device_id: str, name: str, status: str, tags: dict[str, str]) -> None:
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO devices (id, name, tags, platform, inventory, reported, status,"
            " desired_generation, applied_generation, published_generation)"
            " VALUES (?, ?, ?, 'linux/arm64', ?, '{}', ?, 0, 0, 0)",
            (device_id, name, json.dumps(tags),
             json.dumps({"accelerators": ["onnxruntime:CPU"]}), status))


def test_facets_and_pages_of_the_fleet(db: Database) -> None:
    for i in range(120):
        _device(db, f"dev-{i:03d}", f"cam-{i:03d}", "online" if i % 4 else "offline",
                {"site": f"s{i % 2}", "arch": "arm64"})
    facets = queries.facets(db)
    assert facets.total == 120
    assert dict(facets.status) == {"online": 90, "offline": 30}
    assert dict(facets.tag) == {"site=s0": 60, "site=s1": 60}  # not the derived arch=
    assert dict(facets.accelerator) == {"onnxruntime:CPU": 120}
    page = queries.device_page(db, FleetFilter(status="online", tag="site=s1", page=2))
    assert (page.matching, page.pages, page.page) == (60, 2, 2)
    assert [r["name"] for r in page.rows][:2] == ["cam-101", "cam-103"]
    assert queries.device_page(db, FleetFilter(page=99)).page == 3  # past the end: the last
    found = queries.device_page(db, FleetFilter(q="CAM-11"))
    assert [r["id"] for r in found.rows] == [f"dev-{i}" for i in range(110, 120)]
    assert queries.device_page(db, FleetFilter(q="100%")).matching == 0  # LIKE is escaped


def test_telemetry_is_cut_into_buckets_per_version_and_only_the_window_is_read(
        db: Database) -> None:
    _device(db, "dev-1", "one", "online", {})
    end = datetime(2026, 1, 2, tzinfo=UTC)
    rows = []
    for i in range(720):  # two hours every 10 s
        at = format_time(end - timedelta(hours=2) + timedelta(seconds=10 * i))
        rows.append(("dev-1", 2 * i + 1, at, "system", json.dumps({"cpu_percent": 10.0 + i % 2,
                                                                 "memory_percent": 40.0})))
        version = 1 if i < 540 else 2
        rows.append(("dev-1", 2 * i + 2, at, "inference", json.dumps(
            {"deployment": "det", "version": version, "count": 10, "errors": version - 1,
             "p50_ms": 5.0 * version, "p95_ms": 9.0 * version})))
    with db.transaction() as conn:
        conn.executemany("INSERT INTO telemetry VALUES (?, ?, ?, ?, ?)", rows)
    data = queries.device_telemetry(db, "dev-1", timedelta(hours=1), end=end)
    assert data.points == 720  # the last hour only
    assert len(data.cpu[0].points) == queries.BUCKETS
    assert all(10 <= v <= 11 for _, v in data.cpu[0].points)  # 3 points of 10 or 11 each
    assert [s.label for s in data.requests] == ["det v1", "det v2"]
    assert data.requests[0].points[0][1] == pytest.approx(1.0)  # 10 requests per 10 s
    assert {v for _, v in data.error_rate[1].points} == {10.0}
    assert [s.label for s in data.latency] == ["det v1 p50", "det v1 p95", "det v2 p50",
                                               "det v2 p95"]
    nothing = queries.device_telemetry(db, "dev-1", timedelta(hours=1),
                                       end=end - timedelta(hours=3))
    assert nothing.points == 0
    assert queries.device_telemetry(db, "dev-none", timedelta(hours=1)).points == 0


def test_csrf_tokens_belong_to_one_session_and_the_next_page_stays_on_the_dashboard() -> None:
    assert session.csrf_token("eft_a") == session.csrf_token("eft_a") != session.csrf_token(
        "eft_b")
    assert _next("/ui/devices/x?window=1h") == "/ui/devices/x?window=1h"
    for elsewhere in ("https://evil.example/ui/", "//evil.example", "/ui//evil.example", "/api"):
        assert _next(elsewhere) == "/ui/fleet"


def test_the_rollout_form_becomes_the_apis_request_or_one_line() -> None:
    body = _rollout_request({"model": "tiny", "version": "3", "target": "site=a, ring=b",
                             "waves": "10%,100%", "auto_rollback": "on", "priority": "2"})
    assert (body.version, body.target, body.auto_rollback, body.priority) == (
        3, {"site": "a", "ring": "b"}, True, 2)
    with pytest.raises(InvalidInput, match="must look like key=value"):
        _rollout_request({"model": "tiny", "version": "1", "target": "site"})
    with pytest.raises(InvalidInput, match="priority"):
        _rollout_request({"model": "tiny", "version": "1", "target": "a=b", "priority": "x"})
