"""Telemetry retention: does it slow ingest, and does the database stay bounded?

Two measurements on a real SQLite file, in process (the hub runs both in one process
too, so they share its GIL as they do there):

1. **Ingest with and without retention.** The ingest's own work (`hub.ingest.write_batch`:
   strict parsing of real telemetry payloads, one transaction per batch of 500
   messages, each message one device's system and inference point) runs alone, then
   while the retention thread rolls up and deletes (a backlog of old raw points is
   loaded first so it has work throughout), alternating A B A B. The ratio is the rate
   with retention over the rate without, in the same run: 1.0 is "no cost".
2. **A month in accelerated time.** DEVICES devices each send a system and an
   inference point every INTERVAL simulated seconds (default: one of each an hour) for
   DAYS days; after each simulated hour the retention pass runs with its clock
   (injected) at that hour: nothing sleeps. Printed: what the database holds at the end.
   A second, dense run (a few devices at the agent's default 10 s for a day) measures
   the bytes a raw point, a minute rollup (6 points a kind) and an hour rollup (360)
   take; with those, the size the full fleet at 10 s reaches is computed from the rows
   each table then holds, which the retention settings fix exactly (raw: 2 points per
   10 s for 48 h; minute rollups: 2 a minute for 7 days; hour rollups: 2 an hour for
   the days simulated). Simulating 1,000 devices at 10 s for a month (518M points)
   would take hours on 2 cores.

Run: `.venv/bin/python bench/retention.py` (40 min on 2 cores under a load of 20; the
month is most of it: `--days 1` for a shorter one);
`--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose agent.py would shadow the agent package
from agent.mqtt import Message  # noqa: E402
from bench.report import Row, print_table  # noqa: E402
from contract import protocol  # noqa: E402
from hub import telemetry  # noqa: E402
from hub.ingest import write_batch  # noqa: E402
from hub.retention import Retention, RetentionPolicy  # noqa: E402
from hub.storage.db import Database, format_time  # noqa: E402

BATCH = 500  # messages per ingest batch: the hub's largest


def add_devices(db: Database, count: int) -> list[str]:
    ids = [f"dev-{i:06d}" for i in range(count)]
    with db.transaction() as conn:
        conn.executemany("INSERT INTO devices (id, name, tags, status) VALUES (?, ?, '{}',"
                         " 'online')", [(d, d) for d in ids])
    return ids


def system_values(rng: random.Random) -> dict[str, float | int]:
    return {"cpu_percent": round(rng.uniform(0, 100), 1),
            "memory_percent": round(rng.uniform(20, 80), 1),
            "memory_available_mb": rng.randint(100, 4000), "disk_free_mb": rng.randint(1000, 9000),
            "agent_rss_mb": round(rng.uniform(20, 40), 1), "telemetry_dropped": 0}


def inference_values(rng: random.Random) -> dict[str, float | int | str]:
    p50 = rng.uniform(1, 20)
    return {"deployment": "detector", "version": 3, "count": rng.randint(50, 150),
            "errors": rng.choice((0, 0, 0, 1)), "mean_ms": round(p50 * 1.1, 3),
            "p50_ms": round(p50, 3), "p95_ms": round(p50 * 2, 3), "p99_ms": round(p50 * 3, 3)}


def points_for(device: str, seq: int, at: datetime, rng: random.Random) -> list[dict]:
    stamp = format_time(at)
    return [{"seq": seq, "at": stamp, "kind": "system", "values": system_values(rng)},
            {"seq": seq + 1, "at": stamp, "kind": "inference", "values": inference_values(rng)}]


# -- 1. ingest with and without retention -----------------------------------------------


def messages(devices: list[str], count: int, first_seq: int, rng: random.Random
             ) -> list[Message]:
    """COUNT telemetry messages as devices publish them, round robin over DEVICES."""
    now = datetime.now(UTC)
    out = []
    for i in range(count):
        device = devices[i % len(devices)]
        seq = first_seq + 2 * (i // len(devices))
        points = tuple(protocol.Point(p["seq"], now, p["kind"], p["values"])
                       for p in points_for(device, seq, now, rng))
        out.append(Message(protocol.telemetry_topic(device),
                           protocol.build_telemetry(protocol.TelemetryBatch(device, points))))
    return out


def ingest_rate(db: Database, stream: Iterator[list[Message]], seconds: float) -> float:
    """Messages per second written by the ingest's own function for SECONDS."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = next(stream)
        counters = write_batch(db, batch)
        assert counters.points == 2 * len(batch), "every point is new"
        done += len(batch)
    return done / (time.perf_counter() - started)


def measure_ingest(directory: Path, devices: int, backlog: int, seconds: float,
                   rng: random.Random) -> list[Row]:
    db = Database(directory / "ingest.db")
    ids = add_devices(db, devices)
    old = datetime.now(UTC) - timedelta(hours=60)  # past the default 48 h of raw points
    per_device = max(1, backlog // (2 * devices))
    with db.transaction():
        for device in ids:
            telemetry.ingest(db, device, [p for i in range(per_device) for p in points_for(
                device, 1 + 2 * i, old + timedelta(seconds=10 * i), rng)])
    # Enough messages for the four phases at a rate well above what 2 cores reach.
    needed = int(4 * seconds * 6000)
    print(f"building {needed} telemetry messages ...", flush=True)
    built = messages(ids, needed, 1 + 2 * per_device, rng)
    batches = iter([built[i:i + BATCH] for i in range(0, len(built), BATCH)])
    retention = Retention(db, RetentionPolicy(), interval=0.2)  # the hub's own settings
    rates: dict[str, list[float]] = {"alone": [], "with retention": []}
    for phase in ("alone", "with retention", "alone", "with retention"):
        if phase == "with retention":
            retention.start()
        rates[phase].append(ingest_rate(db, batches, seconds))
        if phase == "with retention":
            retention.stop()
    done = retention.stats()
    alone = sum(rates["alone"]) / 2
    busy = sum(rates["with retention"]) / 2
    return [
        Row("ingest alone (messages/s, 2 points each)", f"{alone:,.0f}",
            verdict=" / ".join(f"{r:,.0f}" for r in rates["alone"])),
        Row("ingest while retention runs (messages/s)", f"{busy:,.0f}", f"{alone:,.0f}",
            f"{busy / alone:.2f} (" + " / ".join(f"{r:,.0f}" for r in rates["with retention"])
            + ")"),
        Row("  retention meanwhile: points rolled up / raw rows deleted",
            f"{done['rolled_up']:,} / {done['deleted']['raw']:,}"),
    ]


# -- 2. a month in accelerated time ------------------------------------------------------


def table_bytes(db: Database) -> dict[str, int]:
    """Bytes per table, its indexes included (dbstat)."""
    owners = {r["name"]: r["tbl_name"] for r in db.query(
        "SELECT name, tbl_name FROM sqlite_schema WHERE type IN ('table', 'index')")}
    sizes: dict[str, int] = {}
    for r in db.query("SELECT name, SUM(pgsize) AS bytes FROM dbstat GROUP BY name"):
        owner = owners.get(r["name"], r["name"])
        sizes[owner] = sizes.get(owner, 0) + r["bytes"]
    return sizes


def simulate(path: Path, devices: int, hours: int, interval: int, rng: random.Random
             ) -> dict[str, float]:
    """DEVICES devices measuring every INTERVAL simulated seconds for HOURS, a retention
    pass after each simulated hour (its clock injected). What the database holds then."""
    db = Database(path)
    ids = add_devices(db, devices)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    seqs = dict.fromkeys(ids, 1)
    # Each device measures at its own offset within the interval, as a real fleet does.
    offsets = {d: rng.uniform(0, interval) for d in ids}
    started, inserted = time.perf_counter(), 0
    for hour in range(hours):
        base = start + timedelta(hours=hour)
        with db.transaction():
            for device in ids:
                points = []
                for i in range(3600 // interval):
                    points += points_for(device, seqs[device],
                                         base + timedelta(seconds=offsets[device] + i * interval),
                                         rng)
                    seqs[device] += 2
                inserted += telemetry.ingest(db, device, points)
        clock = base + timedelta(hours=1)
        Retention(db, RetentionPolicy(), clock=lambda clock=clock: clock, pause=0,
                  duty=1).run_once()
        if hour % 24 == 23:
            print(f"  {path.stem} day {hour // 24 + 1}: {inserted:,} points in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    found: dict[str, float] = {"points": inserted, "seconds": time.perf_counter() - started,
                               "file": os.path.getsize(db.path)}
    free, page = db.query_one("PRAGMA freelist_count"), db.query_one("PRAGMA page_size")
    assert free is not None and page is not None
    found["free"] = free["freelist_count"] * page["page_size"]
    sizes = table_bytes(db)
    found["raw"] = (db.query_one("SELECT COUNT(*) AS n FROM telemetry") or {"n": 0})["n"]
    found["raw_bytes"] = sizes.get("telemetry", 0)
    # The rollup table's bytes split between the periods by the bytes of their rows.
    shares = {r["period"]: r for r in db.query(
        "SELECT period, COUNT(*) AS n, SUM(length(stats) + length(device_id) + length(start)"
        " + length(kind) + length(deployment) + length(version) + 16) AS b"
        " FROM telemetry_rollups GROUP BY period")}
    total = sum(r["b"] for r in shares.values()) or 1
    for name, period in (("minute", 60), ("hour", 3600)):
        row = shares.get(period, {"n": 0, "b": 0})
        found[name] = row["n"]
        found[name + "_bytes"] = sizes.get("telemetry_rollups", 0) * row["b"] / total
    return found


def per_row(found: dict[str, float], name: str) -> float:
    return found[name + "_bytes"] / max(found[name], 1)


def month_rows(month: dict[str, float], dense: dict[str, float], devices: int, days: int,
               interval: int, dense_devices: int, dense_hours: int) -> list[Row]:
    policy = RetentionPolicy()
    # At the agent's 10 s: the rows each table holds after DAYS (each retention full).
    full = {"raw": devices * 2 * policy.raw.total_seconds() / 10,
            "minute": devices * 2 * min(policy.minute, timedelta(days=days)).total_seconds() / 60,
            "hour": devices * 2 * days * 24.0}
    estimate = {name: rows * per_row(dense, name) for name, rows in full.items()}
    return [
        Row(f"simulated: {devices:,} devices x {days} days, 2 points every {interval} s",
            f"{month['points']:,.0f} points",
            verdict=f"{month['seconds']:.0f} s ({month['points'] / month['seconds']:,.0f}/s "
            "with the passes)"),
        Row("  database file at the end", f"{month['file'] / 1e6:,.0f} MB",
            verdict=f"{month['free'] / 1e6:,.0f} MB of it free pages, reused"),
        Row("  raw points / minute rollups / hour rollups kept",
            f"{month['raw']:,.0f} / {month['minute']:,.0f} / {month['hour']:,.0f}"),
        Row(f"dense: {dense_devices} devices x {dense_hours} h at 10 s: bytes per row",
            f"{per_row(dense, 'raw'):.0f} / {per_row(dense, 'minute'):.0f} / "
            f"{per_row(dense, 'hour'):.0f}", verdict="raw / minute / hour"),
        Row(f"estimate, {devices:,} devices at 10 s after {days} days: rows",
            f"{full['raw'] / 1e6:.1f}M / {full['minute'] / 1e6:.1f}M / {full['hour'] / 1e6:.1f}M",
            verdict=f"raw {policy.raw.total_seconds() / 3600:.0f} h / minute "
            f"{policy.minute.days} d / hour"),
        Row("  database size", f"{sum(estimate.values()) / 1e9:,.1f} GB",
            verdict=" / ".join(f"{v / 1e9:.1f}" for v in estimate.values()) + " GB"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--interval", type=int, default=3600,
                        help="simulated seconds between a device's measurements in the month "
                        "(divides 3600)")
    parser.add_argument("--dense-devices", type=int, default=50,
                        help="devices of the run at 10 s that measures bytes per row")
    parser.add_argument("--dense-hours", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="length of each ingest phase (A B A B)")
    parser.add_argument("--backlog", type=int, default=400_000,
                        help="old raw points loaded for retention to work through")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 devices, 3 days, 2 s phases")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.days, args.seconds, args.backlog = 100, 3, 2.0, 40_000
        args.dense_devices, args.dense_hours = 5, 3
    if 3600 % args.interval:
        parser.error("--interval must divide 3600")
    rng = random.Random(17)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgefleet-retention-") as tmp:
        rows = measure_ingest(Path(tmp), args.devices, args.backlog, args.seconds, rng)
        print("simulating the month ...", flush=True)
        month = simulate(Path(tmp) / "month.db", args.devices, args.days * 24, args.interval,
                         rng)
        dense = simulate(Path(tmp) / "dense.db", args.dense_devices, args.dense_hours, 10, rng)
        rows += month_rows(month, dense, args.devices, args.days, args.interval,
                           args.dense_devices, args.dense_hours)
    print_table(rows, "Telemetry retention",
                f"load average before the run: {load:.1f}; {json.dumps(vars(args))}")


if __name__ == "__main__":
    main()
