"""Benchmark the dashboard's first render: the fleet page at 10,000 devices, a device page
with 24 h of telemetry at 10 s intervals.

Run from the repository root (about a minute on 2 cores):

    .venv/bin/python bench/dashboard.py                     # 10,000 devices
    .venv/bin/python bench/dashboard.py --devices 100000    # a bigger fleet
    .venv/bin/python bench/dashboard.py --runs 3            # quicker, noisier

A real `edgefleet hub serve` (tests/hubproc.py) in a temporary directory,
its database filled directly with sqlite3 (devices do not need to exist for
pages to be drawn, and enrolling 10,000 would take minutes): DEVICES devices
with tags (site, kind, ring and the derived arch/accel tags), platforms,
accelerators, status and one reported deployment each; one device with 24 h
of telemetry every 10 s (a system point and an inference point each time,
version 1 the first 12 h and version 2 after: 17,280 points), and
TELEMETRY_DEVICES more with 24 h of system points so that the device page's
query has a table of millions of rows to pick its device's points from.

What is measured, and how to read it:

* server: GET of the page's HTML with the session cookie, the median of
  RUNS, over one keep-alive connection. This is the hub's work: the
  queries, the template, the response.
* browser: a real headless Chromium (tests/browser.py) loading the page,
  the median of RUNS: first contentful paint and the load event, from the
  Navigation Timing entry (navigation start = 0). Target for the fleet page:
  first render under 1 s.
* queries: each of the fleet page's statements alone (median of RUNS) with
  SQLite's plan, so a scan that should be an index walk shows, and the device
  page's telemetry read (hub/ui/queries.py). The last rows run the fleet
  statements again without the indexes the dashboard added
  (hub/storage/db.py LATER_INDEXES), to show what those buy.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# Ahead of this directory, whose agent.py would shadow the agent package.
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from playwright.sync_api import Browser, Page  # noqa: E402

from bench.browser import chromium, sign_in  # noqa: E402
from bench.harness import HubProcess, start_hub  # noqa: E402
from hub.storage.db import Database, format_time  # noqa: E402
from hub.ui import queries  # noqa: E402
from report import Row, print_table  # noqa: E402

FLEET_GOAL_S = 1.0
TELEMETRY_INTERVAL = timedelta(seconds=10)
DAY = timedelta(hours=24)
PLATFORMS = ("linux/arm64", "linux/amd64", "linux/arm/v7")
ACCELERATORS = (("onnxruntime:CPU",), ("onnxruntime:CPU", "openvino:GPU"),
                ("onnxruntime:CPU", "tflite:NPU"))


def fill_fleet(db_path: Path, devices: int, rnd: random.Random) -> str:
    """DEVICES devices with one reported deployment each; returns the first one's id."""
    stamp = format_time(datetime.now(UTC))
    rows, status = [], []
    for i in range(devices):
        device = f"dev-{i:012x}"
        platform = rnd.choice(PLATFORMS)
        accelerators = rnd.choice(ACCELERATORS)
        tags = {"site": f"site-{i % 40}", "kind": rnd.choice(("camera", "gate", "kiosk")),
                "ring": str(i % 3), "arch": platform.split("/")[1],
                **{f"accel.{a.replace(':', '.')}": "yes" for a in accelerators}}
        inventory = {"accelerators": list(accelerators), "agent_version": "0.1.0+sim",
                     "cpu_count": 4, "memory_mb": 4096}
        rows.append((device, f"bench-{i:05d}", json.dumps(tags), "", platform,
                     json.dumps(inventory), "{}", "offline" if rnd.random() < 0.1 else "online",
                     stamp, stamp, "enr-bench", f"hash-{i}", 1, 1, 1))
        failed = rnd.random() < 0.02
        status.append((device, "detector", "detector", rnd.choice((1, 2)),
                       "failed" if failed else "serving",
                       "self-test failed: output shape [1, 3], expected [1, 2]" if failed else None,
                       "onnxruntime", "CPU", stamp, stamp))
    with sqlite3.connect(db_path, timeout=30) as conn:
        conn.executemany(
            "INSERT INTO devices (id, name, tags, public_key, platform, inventory, reported,"
            " status, last_seen, enrolled_at, enrollment_token_id, token_hash,"
            " desired_generation, applied_generation, published_generation)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany(
            "INSERT INTO deployment_status (device_id, name, model, version, state, error,"
            " runtime, device, since, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", status)
    return rows[0][0]


def fill_telemetry(db_path: Path, device: str, others: list[str], rnd: random.Random) -> int:
    """24 h every 10 s: DEVICE gets system and inference points, OTHERS system points."""
    end = datetime.now(UTC)
    steps = int(DAY / TELEMETRY_INTERVAL)
    times = [format_time(end - DAY + i * TELEMETRY_INTERVAL) for i in range(steps)]
    stored = 0
    with sqlite3.connect(db_path, timeout=30) as conn:
        for owner in [device, *others]:
            rows = []
            for i, at in enumerate(times):
                system = {"cpu_percent": round(rnd.uniform(5, 40), 1),
                          "memory_percent": round(rnd.uniform(30, 50), 1)}
                rows.append((owner, 2 * i + 1, at, "system", json.dumps(system)))
                if owner == device:
                    version = 1 if i < steps // 2 else 2
                    count = rnd.randint(5, 15)
                    mean = 20.0 if version == 1 else 24.0
                    inference = {"deployment": "detector", "version": version, "count": count,
                                 "errors": int(rnd.random() < 0.1), "p50_ms": mean * 0.9,
                                 "p95_ms": mean * 1.8}
                    rows.append((owner, 2 * i + 2, at, "inference", json.dumps(inference)))
            conn.executemany("INSERT INTO telemetry (device_id, seq, at, kind, metrics)"
                             " VALUES (?, ?, ?, ?, ?)", rows)
            stored += len(rows)
    return stored


def server_time(client: httpx.Client, path: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        begun = time.perf_counter()
        answer = client.get(path)
        answer.raise_for_status()
        times.append(time.perf_counter() - begun)
    return statistics.median(times)


def browser_times(hub: HubProcess, paths: list[str], runs: int,
                  screenshots: Path | None) -> dict[str, tuple[float, float]]:
    """path -> (first contentful paint, load event), seconds after navigation start.
    SCREENSHOTS: a directory for a picture of the first two pages, desktop and phone."""
    found: dict[str, tuple[float, float]] = {}
    with chromium() as browser, browser.new_context(
            viewport={"width": 1280, "height": 900}) as context:
        page = context.new_page()
        sign_in(page, hub.url, hub.admin_token)
        if screenshots is not None:
            take_screenshots(browser, page, hub, paths, screenshots)
        for path in paths:
            paints, loads = [], []
            for _ in range(runs):
                page.goto(hub.url + path, wait_until="load")
                timing = page.evaluate(
                    "() => { const n = performance.getEntriesByType('navigation')[0];"
                    " const p = performance.getEntriesByName('first-contentful-paint')[0];"
                    " return [p ? p.startTime : null, n.loadEventEnd]; }")
                if timing[0] is not None:
                    paints.append(timing[0] / 1000)
                loads.append(timing[1] / 1000)
            # Chromium leaves out the paint entry now and then (a page drawn while the
            # previous one's frame is still up): the load event stands in for it then.
            found[path] = (statistics.median(paints) if paints else statistics.median(loads),
                           statistics.median(loads))
    return found


def take_screenshots(browser: Browser, page: Page, hub: HubProcess, paths: list[str],
                     directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    page.goto(hub.url + paths[0])
    page.screenshot(path=directory / "fleet-10k.png")
    device = next(p for p in paths if "window=24h" in p)
    page.goto(hub.url + device)
    page.screenshot(path=directory / "device-24h.png", full_page=True)
    with browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                             device_scale_factor=2) as phone_context:
        phone = phone_context.new_page()
        sign_in(phone, hub.url, hub.admin_token)
        for name, path in (("phone-fleet.png", paths[0]), ("phone-device.png", device)):
            phone.goto(hub.url + path)
            phone.screenshot(path=directory / name)


def query_rows(db_path: Path, runs: int, label: str) -> list[Row]:
    """The fleet page's statements one by one, with their plans."""
    conn = sqlite3.connect(db_path)
    wanted = queries.FleetFilter(status="online", tag="site=site-3", page=3)
    where, params = wanted.where()
    statements = {
        "count by status": ("SELECT status, COUNT(*) FROM devices GROUP BY status", []),
        "count by platform": ("SELECT platform, COUNT(*) FROM devices GROUP BY platform", []),
        "count by tag (json_each)": (
            "SELECT t.key, t.value, COUNT(*) FROM devices, json_each(devices.tags) t"
            " WHERE t.key != 'arch' AND substr(t.key, 1, 6) != 'accel.'"
            " GROUP BY t.key, t.value", []),
        "page 1, no filter": ("SELECT id FROM devices ORDER BY name, id LIMIT 50", []),
        "page 3, status + tag": (
            "SELECT id FROM devices" + where + " ORDER BY name, id LIMIT 50 OFFSET 100", params),
    }
    rows = []
    for name, (sql, args) in statements.items():
        times = []
        for _ in range(runs):
            begun = time.perf_counter()
            conn.execute(sql, args).fetchall()
            times.append(time.perf_counter() - begun)
        plan = "; ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        rows.append(Row(f"  {name}{label}", f"{statistics.median(times) * 1000:.1f} ms", "",
                        plan[:70]))
    conn.close()
    return rows


def telemetry_rows(db_path: Path, device: str, runs: int) -> list[Row]:
    """The device page's read of its telemetry, bucketed for the charts."""
    db = Database(db_path)
    rows = []
    for name in ("24h", "1h"):
        times = []
        for _ in range(runs):
            begun = time.perf_counter()
            found = queries.device_telemetry(db, device, queries.WINDOWS[name])
            times.append(time.perf_counter() - begun)
        rows.append(Row(f"  device telemetry, {name} window ({found.points} points)",
                        f"{statistics.median(times) * 1000:.1f} ms"))
    return rows


DASHBOARD_INDEXES = ("devices_status", "devices_platform", "devices_name_id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--telemetry-devices", type=int, default=100,
                        help="devices besides the measured one with 24 h of system points")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--screenshots", type=Path, metavar="DIR",
                        help="also save pictures of the fleet and device pages here "
                             "(desktop and phone), e.g. docs/screenshots")
    args = parser.parse_args()
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-dash-") as tmp:
        hub = start_hub(Path(tmp) / "data", tls=False)  # bench/tls.py measures TLS
        try:
            db_path = hub.data_dir / "hub.db"
            begun = time.perf_counter()
            first = fill_fleet(db_path, args.devices, rnd)
            others = [f"dev-{i:012x}" for i in range(1, 1 + args.telemetry_devices)]
            points = fill_telemetry(db_path, first, others, rnd)
            print(f"filled {args.devices} devices and {points} telemetry points in "
                  f"{time.perf_counter() - begun:.1f} s", file=sys.stderr)
            pages = {"fleet page": "/ui/fleet",
                     "fleet page, filtered (online, site=site-3, page 3)":
                         "/ui/fleet?status=online&tag=site%3Dsite-3&page=3",
                     "fleet page, search": "/ui/fleet?q=bench-0421",
                     f"device page, 24 h window ({points // (1 + args.telemetry_devices)}+"
                     " points)": f"/ui/devices/{first}?window=24h",
                     "device page, 1 h window": f"/ui/devices/{first}?window=1h"}
            with httpx.Client(base_url=hub.url, timeout=60,
                              cookies={"edgefleet_session": hub.admin_token}) as client:
                server = {name: server_time(client, path, args.runs)
                          for name, path in pages.items()}
            browser = browser_times(hub, list(pages.values()), args.runs, args.screenshots)
            rows = []
            for name, path in pages.items():
                paint, load = browser[path]
                goal = (f"{'OK' if paint < FLEET_GOAL_S else 'OVER'} < {FLEET_GOAL_S:g} s"
                        if name == "fleet page" else "")
                rows += [Row(name, "", "", ""),
                         Row("  server: HTML response", f"{server[name] * 1000:.0f} ms"),
                         Row("  browser: first contentful paint", f"{paint * 1000:.0f} ms", "",
                             goal),
                         Row("  browser: load event", f"{load * 1000:.0f} ms")]
            rows.append(Row(f"queries at {args.devices} devices", "", "", "plan"))
            rows += query_rows(db_path, args.runs, "")
            rows += telemetry_rows(db_path, first, args.runs)
            with sqlite3.connect(db_path, timeout=30) as conn:
                for index in DASHBOARD_INDEXES:
                    conn.execute(f"DROP INDEX IF EXISTS {index}")
            rows += query_rows(db_path, args.runs, " (without the indexes)")
        finally:
            hub.stop()
    print_table(rows, f"edgefleet dashboard bench: {args.devices} devices, "
                      f"median of {args.runs} runs")


if __name__ == "__main__":
    main()
