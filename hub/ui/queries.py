"""What the dashboard reads that the REST API has no single call for.

Facet counts and a filtered, paginated device listing for the fleet page;
telemetry cut into time buckets for the device page's charts; which devices
run each model version; the audit log with more filters. Every query is
set-based (a few statements per page, whatever the fleet's size) and the
device listing walks the `devices (name, id)` index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hub import rollups, telemetry
from hub.devices import tag_filter
from hub.retention import RetentionPolicy
from hub.storage.db import Database, format_time, parse_time

PAGE_SIZE = 50
TOP_TAGS = 40  # tag values shown as facets; the search box finds the rest
STATUSES = ("online", "offline")


@dataclass(frozen=True)
class FleetFilter:
    """The fleet page's query string, checked: empty fields filter nothing."""

    status: str = ""
    version: str = ""      # MODEL:VERSION serving on the device
    platform: str = ""
    accelerator: str = ""  # runtime:DEVICE
    tag: str = ""          # key=value
    q: str = ""            # part of the name, or the start of the id
    page: int = 1

    @classmethod
    def parse(cls, params: dict[str, str]) -> FleetFilter:
        page = params.get("page", "1")
        return cls(
            status=params.get("status", "")[:20], version=params.get("version", "")[:140],
            platform=params.get("platform", "")[:64],
            accelerator=params.get("accelerator", "")[:140], tag=params.get("tag", "")[:330],
            q=params.get("q", "").strip()[:128],
            page=min(int(page), 1_000_000) if page.isdigit() and int(page) >= 1 else 1)

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.status:
            clauses.append("status = ?")
            params.append(self.status)
        if self.platform:
            clauses.append("platform = ?")
            params.append(self.platform)
        if self.accelerator:
            clauses.append("EXISTS (SELECT 1 FROM json_each(inventory, '$.accelerators')"
                           " WHERE value = ?)")
            params.append(self.accelerator)
        if self.tag:
            key, _, value = self.tag.partition("=")
            matching, values = tag_filter([(key, value)])
            clauses += matching
            params += values
        if self.version:
            model, _, version = self.version.rpartition(":")
            clauses.append("EXISTS (SELECT 1 FROM deployment_status s WHERE s.device_id ="
                           " devices.id AND s.model = ? AND s.version = ? AND s.state = 'serving')")
            params += [model, int(version) if version.isdigit() else -1]
        if self.q:
            clauses.append("(instr(lower(name), lower(?)) > 0 OR id LIKE ? || '%')")
            params += [self.q, self.q.replace("%", "").replace("_", "")]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def query(self, **change: Any) -> dict[str, str]:
        """The query string of this filter with CHANGE applied (for links)."""
        values = {**self.__dict__, "page": 1, **change}
        return {k: str(v) for k, v in values.items() if v and not (k == "page" and v == 1)}


@dataclass
class Facets:
    total: int
    status: list[tuple[str, int]]
    version: list[tuple[str, int]]
    platform: list[tuple[str, int]]
    accelerator: list[tuple[str, int]]
    tag: list[tuple[str, int]]


def facets(db: Database) -> Facets:
    """The whole fleet counted by status, serving version, platform, accelerator and tag."""
    total = db.query_one("SELECT COUNT(*) AS n FROM devices") or {"n": 0}
    return Facets(
        total=total["n"],
        status=_pairs(db, "SELECT status AS k, COUNT(*) AS n FROM devices GROUP BY status"
                          " ORDER BY n DESC"),
        version=_pairs(db, "SELECT model || ':' || version AS k, COUNT(*) AS n"
                           " FROM deployment_status WHERE state = 'serving'"
                           " GROUP BY model, version ORDER BY model, version DESC"),
        platform=_pairs(db, "SELECT COALESCE(platform, 'unknown') AS k, COUNT(*) AS n"
                            " FROM devices GROUP BY platform ORDER BY n DESC"),
        accelerator=_pairs(db, "SELECT a.value AS k, COUNT(*) AS n FROM devices,"
                               " json_each(devices.inventory, '$.accelerators') a"
                               " GROUP BY a.value ORDER BY n DESC"),
        # Without the tags the hub derives from reports (hub.ingest.derived_tags: arch,
        # accel.*): the platform and accelerator counts say the same.
        tag=_pairs(db, "SELECT t.key || '=' || t.value AS k, COUNT(*) AS n FROM devices,"
                       " json_each(devices.tags) t WHERE t.key != 'arch'"
                       " AND substr(t.key, 1, 6) != 'accel.' GROUP BY t.key, t.value"
                       f" ORDER BY n DESC, k LIMIT {TOP_TAGS}"),
    )


def _pairs(db: Database, sql: str) -> list[tuple[str, int]]:
    return [(str(r["k"]), r["n"]) for r in db.query(sql)]


@dataclass
class DevicePage:
    rows: list[dict[str, Any]]
    matching: int
    page: int
    pages: int


def device_page(db: Database, fleet_filter: FleetFilter) -> DevicePage:
    where, params = fleet_filter.where()
    matching = (db.query_one("SELECT COUNT(*) AS n FROM devices" + where, params) or {"n": 0})["n"]
    pages = max(1, -(-matching // PAGE_SIZE))
    page = min(fleet_filter.page, pages)
    rows = db.query(
        "SELECT id, name, status, platform, last_seen, tags,"
        " json_extract(inventory, '$.accelerators') AS accelerators,"
        " json_extract(inventory, '$.agent_version') AS agent_version,"
        " (SELECT group_concat(s.model || ':' || s.version || ' ' || s.state, ', ')"
        "  FROM deployment_status s WHERE s.device_id = devices.id) AS deployments"
        " FROM devices" + where + " ORDER BY name, id LIMIT ? OFFSET ?",
        [*params, PAGE_SIZE, (page - 1) * PAGE_SIZE])
    for r in rows:
        r["tags"] = json.loads(r["tags"] or "{}")
        r["accelerators"] = json.loads(r["accelerators"] or "[]")
    return DevicePage(rows, matching, page, pages)


# -- telemetry ---------------------------------------------------------------------

WINDOWS = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1), "6h": timedelta(hours=6),
           "24h": timedelta(hours=24), "7d": timedelta(days=7)}
BUCKETS = 120  # points per line: enough for a chart a phone's width, few enough to draw fast


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]] = field(default_factory=list)  # (unix seconds, value)


@dataclass
class DeviceTelemetry:
    start: float
    end: float
    points: int
    cpu: list[Series]
    memory: list[Series]
    requests: list[Series]   # per second
    error_rate: list[Series]
    latency: list[Series]


def device_telemetry(db: Database, device_id: str, window: timedelta,
                     end: datetime | None = None,
                     policy: RetentionPolicy | None = None) -> DeviceTelemetry:
    """The device's telemetry in WINDOW before END (now), averaged into BUCKETS time
    buckets: CPU and memory from system points; requests, error rate and p50/p95 latency
    per deployment version from inference points. Read from raw points (latencies
    weighted by request count) or, for windows longer than raw points are read for,
    from rollups (telemetry.choose_resolution; latencies are the points' means)."""
    end = end or datetime.now(UTC)
    start = end - window
    width = window.total_seconds() / BUCKETS
    resolution = telemetry.choose_resolution(start, end, end, policy or RetentionPolicy())
    if resolution != "raw":
        return _series(start.timestamp(), width, end,
                       *_rollup_buckets(db, device_id, resolution, start, end, width))
    since, until, t0 = format_time(start), format_time(end), start.timestamp()
    first = _first_seq_since(db, device_id, since)
    # julianday: SQLite 3.40 (Debian 12) has no unixepoch(..., 'subsec'). floor: a cast
    # alone truncates on SQLite and rounds on PostgreSQL.
    bucket = "CAST(floor(((julianday(at) - 2440587.5) * 86400.0 - ?) / ?) AS INTEGER)"
    system = db.query(
        f"SELECT {bucket} AS b, AVG({_number('cpu_percent')}) AS cpu,"
        f" AVG({_number('memory_percent')}) AS memory, COUNT(*) AS n"
        " FROM telemetry WHERE device_id = ? AND seq >= ? AND at >= ? AND at <= ?"
        " AND kind = 'system'"
        " GROUP BY b ORDER BY b", (t0, width, device_id, first, since, until))
    count, p50, p95 = _number("count"), _number("p50_ms"), _number("p95_ms")
    inference = db.query(
        f"SELECT {bucket} AS b, json_extract(metrics, '$.deployment') AS deployment,"
        " json_extract(metrics, '$.version') AS version,"
        f" SUM({count}) AS requests, SUM({_number('errors')}) AS errors,"
        f" SUM({p50} * {count}) / SUM(CASE WHEN {p50} IS NOT NULL THEN {count} END) AS p50,"
        f" SUM({p95} * {count}) / SUM(CASE WHEN {p95} IS NOT NULL THEN {count} END) AS p95,"
        " COUNT(*) AS n"
        " FROM telemetry WHERE device_id = ? AND seq >= ? AND at >= ? AND at <= ?"
        " AND kind = 'inference'"
        " GROUP BY b, deployment, version ORDER BY b",
        (t0, width, device_id, first, since, until))
    return _series(t0, width, end, system, inference)


def _number(field: str) -> str:
    """SQL for the number FIELD of a telemetry point's metrics (json_extract answers text
    on PostgreSQL, hub/storage/postgres.py)."""
    return f"CAST(json_extract(metrics, '$.{field}') AS DOUBLE PRECISION)"


def _rollup_buckets(db: Database, device_id: str, resolution: str, start: datetime,
                    end: datetime, width: float) -> tuple[list[dict[str, Any]],
                                                          list[dict[str, Any]]]:
    """What the raw path's two queries give (bucket rows of system and inference
    aggregates), from the rollups whose middle falls in each bucket."""
    period = rollups.PERIODS[resolution]
    t0 = start.timestamp()
    system: dict[int, dict[str, Any]] = {}
    inference: dict[tuple[int, str, str], dict[str, Any]] = {}
    for r in db.query("SELECT * FROM telemetry_rollups WHERE device_id = ? AND period = ?"
                      " AND start >= ? AND start < ?",
                      (device_id, period, rollups.bucket_start(start, period), format_time(end))):
        middle = parse_time(r["start"]).timestamp() + period / 2
        if not t0 <= middle < end.timestamp():
            continue
        b = int((middle - t0) // width)
        stats = rollups.Rollup.loads(r["points"], r["stats"])
        if r["kind"] == "system":
            row = system.setdefault(b, {"b": b, "n": 0})
            row["n"] += stats.points
            for name, column in (("cpu_percent", "cpu"), ("memory_percent", "memory")):
                _add_mean(row, column, stats.stats.get(name))
        else:
            row = inference.setdefault((b, r["deployment"], r["version"]), {
                "b": b, "deployment": r["deployment"], "version": r["version"], "n": 0,
                "requests": 0.0, "errors": 0.0})
            row["n"] += stats.points
            for name in ("count", "errors"):
                found = stats.stats.get(name)
                row["requests" if name == "count" else name] += found.sum if found else 0.0
            for name in ("p50", "p95"):
                _add_mean(row, name, stats.stats.get(f"{name}_ms"))
    for row in [*system.values(), *inference.values()]:
        for column in ("cpu", "memory", "p50", "p95"):
            if column + "_n" in row:
                row[column] = row.pop(column + "_sum") / row.pop(column + "_n")
    return (sorted(system.values(), key=lambda r: r["b"]),
            sorted(inference.values(), key=lambda r: r["b"]))


def _add_mean(row: dict[str, Any], column: str, stat: rollups.Stat | None) -> None:
    if stat is not None and stat.n:
        row[column + "_sum"] = row.get(column + "_sum", 0.0) + stat.sum
        row[column + "_n"] = row.get(column + "_n", 0) + stat.n


def _series(t0: float, width: float, end: datetime, system: list[dict[str, Any]],
            inference: list[dict[str, Any]]) -> DeviceTelemetry:
    """Bucket rows -> the lines of the device page's charts."""

    def at(b: int) -> float:
        return t0 + (b + 0.5) * width

    cpu, memory = Series("CPU %"), Series("memory %")
    for r in system:
        if r.get("cpu") is not None:
            cpu.points.append((at(r["b"]), r["cpu"]))
        if r.get("memory") is not None:
            memory.points.append((at(r["b"]), r["memory"]))
    requests: dict[str, Series] = {}
    errors: dict[str, Series] = {}
    latency: dict[str, Series] = {}
    for r in inference:
        key = f"{r['deployment']} v{r['version']}"
        x = at(r["b"])
        requests.setdefault(key, Series(key)).points.append((x, (r["requests"] or 0) / width))
        if r["requests"]:
            errors.setdefault(key, Series(key)).points.append(
                (x, 100 * (r["errors"] or 0) / r["requests"]))
        for name in ("p50", "p95"):
            if r.get(name) is not None:
                label = f"{key} {name}"
                latency.setdefault(label, Series(label)).points.append((x, r[name]))
    count = sum(r["n"] for r in system) + sum(r["n"] for r in inference)
    return DeviceTelemetry(t0, end.timestamp(), count, [cpu], [memory], list(requests.values()),
                           list(errors.values()), sorted(latency.values(), key=lambda s: s.label))


def _first_seq_since(db: Database, device_id: str, since: str) -> int:
    """The first of the device's points at or after SINCE, found by bisecting the primary
    key (device_id, seq): agents number points in the order they measure them, so `at`
    grows with seq. An index on (device_id, at) would answer directly, but every ingested
    point would pay for it (about a third of the insert rate, measured), for one page."""
    bounds = db.query_one("SELECT MIN(seq) AS lo, MAX(seq) AS hi FROM telemetry"
                          " WHERE device_id = ?", (device_id,))
    if bounds is None or bounds["lo"] is None:
        return 0
    lo, hi = bounds["lo"], bounds["hi"] + 1  # hi: past the last point, "after SINCE"
    while lo < hi:
        middle = (lo + hi) // 2
        point = db.query_one("SELECT at FROM telemetry WHERE device_id = ? AND seq >= ?"
                             " ORDER BY seq LIMIT 1", (device_id, middle))
        if point is None or point["at"] >= since:
            hi = middle
        else:
            lo = middle + 1
    return int(lo)


def recent_states(db: Database, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """What the device reported lately, as the audit of its deployments: newest first.
    The hub keeps only the latest report per version, so these are those rows."""
    return db.query(
        "SELECT name, model, version, state, error, since, updated_at FROM deployment_status"
        " WHERE device_id = ? ORDER BY since DESC LIMIT ?", (device_id, limit))


# -- models ------------------------------------------------------------------------


def where_versions_run(db: Database, model: str) -> dict[int, dict[str, int]]:
    """version -> {state: devices} from what devices report for MODEL."""
    found: dict[int, dict[str, int]] = {}
    for r in db.query("SELECT version, state, COUNT(*) AS n FROM deployment_status"
                      " WHERE model = ? GROUP BY version, state", (model,)):
        found.setdefault(r["version"], {})[r["state"]] = r["n"]
    return found


# -- audit -------------------------------------------------------------------------

RESULTS = ("ok", "denied", "failed")


@dataclass(frozen=True)
class AuditFilter:
    actor: str = ""
    action: str = ""   # a prefix: "rollout." matches every rollout action
    target: str = ""
    result: str = ""
    before: int | None = None  # entries older than this id (the next page)

    @classmethod
    def parse(cls, params: dict[str, str]) -> AuditFilter:
        before = params.get("before", "")
        return cls(actor=params.get("actor", "")[:64], action=params.get("action", "")[:64],
                   target=params.get("target", "")[:200],
                   result=params.get("result", "") if params.get("result") in RESULTS else "",
                   before=int(before) if before.isdigit() and len(before) < 19 else None)


def audit_entries(db: Database, f: AuditFilter, limit: int = 100) -> list[dict[str, Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("actor", f.actor), ("target", f.target), ("result", f.result)):
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    if f.action:
        clauses.append("substr(action, 1, ?) = ?")
        params += [len(f.action), f.action]
    if f.before is not None:
        clauses.append("id < ?")
        params.append(f.before)
    return db.query("SELECT * FROM audit" + (" WHERE " + " AND ".join(clauses) if clauses else "")
                    + " ORDER BY id DESC LIMIT ?", [*params, limit])


def checked_window(text: str) -> tuple[str, timedelta]:
    return (text, WINDOWS[text]) if text in WINDOWS else ("1h", WINDOWS["1h"])
