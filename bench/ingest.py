"""Benchmark the hub's telemetry ingestion alone: a backlog in a real Mosquitto, drained.

Run from the repository root (about 1 minute on 2 cores):

    .venv/bin/python bench/ingest.py               # 30,000 messages of 2 points, 3 runs
    .venv/bin/python bench/ingest.py --messages 5000 --runs 1

Each run starts a real Mosquitto (bench/harness.py) and a fresh SQLite hub
database with 2,000 devices, queues the messages for the hub's persistent
MQTT session (QoS 1, published with the session offline), and then drains
them twice from the same backlog size:

* baseline: the MQTT session alone (agent/mqtt.py `Session`, as the hub uses
  it), taking batches of 500 and acknowledging them: what the transport
  moves in this process with nothing written;
* ingest: the hub's own loop (hub/ingest.py `Ingest`: parse with
  contract.protocol's strict readers, one transaction per batch, telemetry
  in one INSERT, acknowledgements after the commit), until its counter holds
  every point.

Messages are what the simulator sends (2 points: a system and an inference
point). Rates are wall clock over the drain, and per CPU second of this
process (what the drain would reach with a core to itself: the machine is
shared, and its load average is in the caption). Target for ingest: 20,000
points/s with every point stored once (the last row compares the table).
rollout.py measures the same ceiling through a real hub process and the
simulator.

With `--replicas N --database-url postgresql://...` (an empty database the bench
fills) each run drains the backlog instead into one hub's ingest and then into N
replicas', each a process of its own reading the MQTT shared subscription of
hub/ingest.py `replica_subscriptions` into the one PostgreSQL database: points/s
until the table holds every point, one hub against N in the same run.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose agent.py would shadow the package
from agent.mqtt import Message, MqttTimeout, Session  # noqa: E402
from contract import protocol  # noqa: E402
from harness import start_mosquitto  # noqa: E402
from hub.ingest import SUBSCRIPTIONS, Ingest, replica_subscriptions  # noqa: E402
from hub.storage.db import Database  # noqa: E402
from report import Row, print_table  # noqa: E402

DEVICES = 2000
TARGET = 20000.0  # points/s
CLIENT_ID = "edgefleet-hub"
LIMIT_S = 300.0


@dataclass
class Drain:
    seconds: float
    cpu_seconds: float
    points: int

    def rate(self) -> float:
        return self.points / self.seconds

    def per_cpu(self) -> float:
        return self.points / self.cpu_seconds


def messages(count: int) -> list[Message]:
    at = datetime.now(UTC)
    result = []
    for k in range(count):
        device, seq = f"dev-{k % DEVICES}", (k // DEVICES) * 2
        points = (
            protocol.Point(seq + 1, at, "system", {
                "cpu_percent": 12.3, "memory_percent": 40.1, "memory_available_mb": 900.2,
                "disk_free_mb": 9500.5, "agent_rss_mb": 41.2, "telemetry_dropped": 0}),
            protocol.Point(seq + 2, at, "inference", {
                "deployment": "d", "version": 2, "count": 10, "errors": 0, "mean_ms": 1.234,
                "p50_ms": 1.1, "p95_ms": 2.2, "p99_ms": 3.1}))
        result.append(Message(protocol.telemetry_topic(device), protocol.build_telemetry(
            protocol.TelemetryBatch(device, points)), qos=1))
    return result


def queue(url: str, backlog: list[Message]) -> None:
    """Subscribe the hub's persistent session, leave, and publish BACKLOG for it."""
    with Session(url, client_id=CLIENT_ID, subscriptions=SUBSCRIPTIONS) as hub:
        hub.wait_connected(15)
    queue_only(url, backlog)


def queue_only(url: str, backlog: list[Message]) -> None:
    """Publish BACKLOG for the sessions subscribed."""
    with Session(url, client_id="publisher") as publisher:
        publisher.wait_connected(15)
        for i in range(0, len(backlog), 1000):
            publisher.publish_many(backlog[i:i + 1000], timeout=60)


def timed(run: Callable[[], int]) -> Drain:
    wall, cpu = time.perf_counter(), time.process_time()
    points = run()
    return Drain(time.perf_counter() - wall, time.process_time() - cpu, points)


def drain_session(url: str, count: int) -> int:
    with Session(url, client_id=CLIENT_ID, subscriptions=SUBSCRIPTIONS) as session:
        taken = 0
        while taken < count:
            try:
                batch = session.take_many(500, 10)
            except MqttTimeout:
                raise RuntimeError(f"the backlog stopped after {taken} messages") from None
            session.ack_many(batch)
            taken += len(batch)
    return 2 * taken


def drain_ingest(url: str, db: Database, count: int) -> int:
    with Session(url, client_id=CLIENT_ID, subscriptions=SUBSCRIPTIONS) as session:
        ingest = Ingest(db, session)
        ingest.start()
        deadline = time.monotonic() + LIMIT_S
        while ingest.stats()["telemetry_points"] < 2 * count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest stored {ingest.stats()} in {LIMIT_S:.0f} s")
            time.sleep(0.01)
        ingest.stop()
        return int(ingest.stats()["telemetry_points"])


def one_run(root: Path, backlog: list[Message]) -> tuple[Drain, Drain, int]:
    broker = start_mosquitto(root / "mosquitto")
    try:
        queue(broker.url, backlog)
        baseline = timed(lambda: drain_session(broker.url, len(backlog)))
        db = Database(root / "hub.db")
        with db.transaction() as conn:
            conn.executemany("INSERT INTO devices (id, name, status) VALUES (?, ?, 'online')",
                             [(f"dev-{i}", f"dev-{i}") for i in range(DEVICES)])
        queue(broker.url, backlog)
        ingest = timed(lambda: drain_ingest(broker.url, db, len(backlog)))
        rows = sqlite3.connect(root / "hub.db").execute(
            "SELECT COUNT(*) FROM telemetry").fetchone()[0]
        return baseline, ingest, rows
    finally:
        broker.stop()


def replica_ids(replicas: int) -> list[str]:
    return [f"{CLIENT_ID}-{i}" for i in range(replicas)]


def replica(url: str, database_url: str, client_id: str, stop: object) -> None:
    """One replica's ingest loop, in a process of its own, until STOP is set."""
    session = Session(url, client_id=client_id,
                      subscriptions=replica_subscriptions(client_id)[0], inbox_size=1000)
    with session:
        ingest = Ingest(Database(database_url), session, shared=True)
        ingest.start()
        stop.wait()  # type: ignore[attr-defined]
        ingest.stop()


def drain_replicas(url: str, database_url: str, replicas: int, count: int) -> int:
    """Start REPLICAS ingest processes; return once the table holds every point."""
    db = Database(database_url)
    stop = multiprocessing.Event()
    workers = [multiprocessing.Process(target=replica, args=(url, database_url, c, stop))
               for c in replica_ids(replicas)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + LIMIT_S
    try:
        while (rows := stored_points(db)) < 2 * count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replicas} replica(s) stored {rows} in {LIMIT_S:.0f} s")
            time.sleep(0.01)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    return rows


def stored_points(db: Database) -> int:
    return int(db.query("SELECT COUNT(*) AS n FROM telemetry")[0]["n"])


def replicas_run(root: Path, backlog: list[Message], database_url: str,
                 replicas: int) -> tuple[Drain, Drain, int]:
    """One hub, then REPLICAS, each draining BACKLOG into an emptied database (and from
    a broker of its own: the first's group member would keep its turn of the second's)."""
    db = Database(database_url)
    drains = []
    try:
        for n in (1, replicas):
            with db.transaction() as conn:
                conn.execute("DELETE FROM telemetry")
                conn.execute("DELETE FROM devices")
                conn.executemany("INSERT INTO devices (id, name, status) VALUES (?, ?, 'online')",
                                 [(f"dev-{i}", f"dev-{i}") for i in range(DEVICES)])
            broker = start_mosquitto(root / f"mosquitto-{n}")
            try:
                for client_id in replica_ids(n):  # each member of the group, before the backlog
                    with Session(broker.url, client_id=client_id,
                                 subscriptions=replica_subscriptions(client_id)[0]) as member:
                        member.wait_connected(15)
                queue_only(broker.url, backlog)
                drains.append(timed(functools.partial(
                    drain_replicas, broker.url, database_url, n, len(backlog))))
            finally:
                broker.stop()
        return drains[0], drains[1], stored_points(db)
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30000, help="backlog (default 30000)")
    parser.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="hub replicas to compare with one hub (needs --database-url)")
    parser.add_argument("--database-url", help="an empty PostgreSQL database for --replicas")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    backlog = messages(args.messages)
    if args.replicas > 1:
        if not args.database_url:
            parser.error("--replicas needs --database-url")
        main_replicas(args, backlog, load)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-ingest-") as tmp:
        for run in range(1, args.runs + 1):
            root = Path(tmp) / f"run-{run}"
            baseline, ingest, stored = one_run(root, backlog)
            rows += [
                Row(f"run {run}: ingest drains {args.messages:,} messages "
                    f"({2 * args.messages:,} points)", f"{ingest.rate():,.0f} points/s",
                    f"session alone {baseline.rate():,.0f}",
                    f"{ingest.rate() / baseline.rate():.2f}x; target >= {TARGET:,.0f}: "
                    + ("ok" if ingest.rate() >= TARGET else "MISSES")),
                Row("  per CPU second of the process", f"{ingest.per_cpu():,.0f} points",
                    f"{baseline.per_cpu():,.0f}", f"{ingest.per_cpu() / baseline.per_cpu():.2f}x"),
                Row("  telemetry rows / points sent", f"{stored:,}", f"{2 * args.messages:,}",
                    "equal" if stored == 2 * args.messages else "DIFFER"),
            ]
    print_table(rows, "edgefleet ingest bench: draining a backlog, one hub",
                f"{os.cpu_count()} CPUs shared with everything else on the machine; "
                f"load average before the run: {load:.1f}.")


def main_replicas(args: argparse.Namespace, backlog: list[Message], load: float) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-ingest-") as tmp:
        for run in range(1, args.runs + 1):
            one, many, stored = replicas_run(Path(tmp) / f"run-{run}", backlog,
                                             args.database_url, args.replicas)
            rows += [
                Row(f"run {run}: {args.replicas} replicas drain {args.messages:,} messages "
                    f"({2 * args.messages:,} points)", f"{many.rate():,.0f} points/s",
                    f"one hub {one.rate():,.0f}", f"{many.rate() / one.rate():.2f}x"),
                Row("  telemetry rows / points sent", f"{stored:,}", f"{2 * args.messages:,}",
                    "equal" if stored == 2 * args.messages else "DIFFER"),
            ]
    print_table(rows, f"edgefleet ingest bench: one hub vs {args.replicas} replicas on "
                "PostgreSQL, draining a backlog",
                f"{os.cpu_count()} CPUs shared with everything else on the machine (the "
                f"broker and PostgreSQL too); load average before the run: {load:.1f}.")


if __name__ == "__main__":
    main()
