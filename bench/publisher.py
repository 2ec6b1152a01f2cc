"""Benchmark the hub's desired-state publisher alone: real Mosquitto, real SQLite, real keys.

Run from the repository root (~1 min on 2 cores):

    .venv/bin/python bench/publisher.py                      # 10,000 devices, 3 rounds
    .venv/bin/python bench/publisher.py --devices 2000 --rounds 1

A fresh hub database gets DEVICES devices with one deployment each, and the
hub's own fleet link (hub/fleet.py `FleetLink`: its MQTT session, ingest loop
and publisher) connects to a real Mosquitto (bench/harness.py). Each round
counts every device as unpublished (`forget_published`, what a broker that lost
its retained messages causes) and asks for a catch-up, and times until the
publisher has recorded every state as acknowledged: reading the rows, building
and signing each state, publishing it retained with QoS 1, waiting for the
PUBACKs, recording. The hub's ingest loop judges its own states as they come
back (hub/retained.py), as in a running hub. No device is subscribed, so
Mosquitto's fan-out to devices is not in it; bench/rollout.py has that.

Baselines in the same run: the MQTT session alone publishing payloads of the
same size in batches of the same size (`publish_many`), with the session's
default of 20 messages in flight (paho's, which it was built on until December
2026) and with the hub's `desired.IN_FLIGHT`; and the signing alone (CPU
seconds). The machine is shared: the caption gives its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose agent.py would shadow the package
from agent.mqtt import Message, Session  # noqa: E402
from contract import cosign  # noqa: E402
from harness import start_mosquitto  # noqa: E402
from hub import deployments, desired  # noqa: E402
from hub.fleet import FleetLink  # noqa: E402
from hub.keys import KeyRing  # noqa: E402
from hub.storage.db import Database  # noqa: E402
from report import Row, print_table  # noqa: E402

DIGEST = f"sha256:{1:064x}"
VALIDITY = timedelta(days=30)
LIMIT_S = 300.0


def fleet(db: Database, devices: int) -> list[str]:
    """DEVICES devices, each with the tiny model's version 1 deployed."""
    ids = [f"dev-{i:06d}" for i in range(devices)]
    with db.transaction() as conn:
        conn.execute("INSERT INTO models VALUES ('tiny', 'now', 2)")
        conn.execute("INSERT INTO model_versions (model, version, created_at, tags, metrics,"
                     " lineage) VALUES ('tiny', 1, 'now', '{}', '{}', '{}')")
        conn.execute("INSERT INTO oci_manifests VALUES ('models/tiny', ?, ?, 512, 'now')",
                     (DIGEST, "application/vnd.oci.image.index.v1+json"))
        conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', '1', ?, 'now')", (DIGEST,))
        conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', ?, 'sha256:ff', 'now')",
                     (cosign.signature_tag(DIGEST),))  # its signature, as the hub stores it
        conn.executemany(
            "INSERT INTO devices (id, name, tags, desired_generation, applied_generation,"
            " published_generation) VALUES (?, ?, '{}', 0, 0, 0)", [(d, d) for d in ids])
    deployments.assign_many(db, ids, name="tiny", model="tiny", version=1)
    return ids


def publisher_round(link: FleetLink, devices: int) -> float:
    """Seconds until every one of DEVICES devices' state is published again and recorded."""
    expected = link.publisher.published + devices
    start = time.monotonic()
    desired.forget_published(link.db)
    link.publisher.catch_up()
    while link.publisher.published < expected:
        if time.monotonic() - start > LIMIT_S:
            raise RuntimeError(f"the publisher did not publish {devices:,} states in "
                               f"{LIMIT_S:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - start


def signed(db: Database, keys: KeyRing, ids: list[str]) -> tuple[list[bytes], float]:
    """Every device's state signed, and the CPU seconds that took."""
    now = datetime.now(UTC)
    states = [desired.build(d, generation, rows, issued_at=now, validity=VALIDITY)
              for d, (generation, rows) in deployments.desired_snapshot(db, ids).items()]
    cpu = time.process_time()
    payloads = [keys.sign_desired(s) for s in states]
    return payloads, time.process_time() - cpu


def session_round(url: str, payloads: list[bytes], in_flight: int) -> float:
    """Seconds for a bare session to publish PAYLOADS retained, a batch at a time."""
    with Session(url, client_id=f"bench-{in_flight}", max_inflight=in_flight) as session:
        session.wait_connected(10)
        start = time.monotonic()
        for i in range(0, len(payloads), desired.BATCH):
            session.publish_many(
                [Message(f"bench/{i + j}/desired", p, qos=1, retain=True)
                 for j, p in enumerate(payloads[i:i + desired.BATCH])], timeout=LIMIT_S)
        return time.monotonic() - start


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} states/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        broker = start_mosquitto(Path(tmp) / "mosquitto")
        try:
            db = Database(Path(tmp) / "hub.db")
            keys = KeyRing(Path(tmp) / "keys" / "hub-signing.key")
            ids = fleet(db, args.devices)
            payloads, sign_cpu = signed(db, keys, ids)
            link = FleetLink(db, keys, mqtt_url=broker.url, username=None, password=None,
                             validity=VALIDITY)
            link.start()
            try:
                link.session.wait_connected(10)
                n = len(ids)
                for r in range(args.rounds):
                    took = publisher_round(link, n)
                    narrow = session_round(broker.url, payloads, 20)
                    wide = session_round(broker.url, payloads, desired.IN_FLIGHT)
                    rows += [
                        Row(f"round {r + 1}: publisher, {n:,} states signed, published, "
                            "recorded", f"{took:.2f} s", rate(n, took)),
                        Row("  session alone, 20 in flight (its default)", f"{narrow:.2f} s",
                            rate(n, narrow), f"publisher at {narrow / took:.2f}x its speed"),
                        Row(f"  session alone, {desired.IN_FLIGHT} in flight", f"{wide:.2f} s",
                            rate(n, wide), f"publisher at {wide / took:.2f}x its speed"),
                    ]
            finally:
                link.stop()
            rows.append(Row(f"signing {n:,} states (CPU)", f"{sign_cpu:.2f} s",
                            rate(n, sign_cpu)))
        finally:
            broker.stop()
    print_table(rows, f"edgefleet publisher bench: {args.devices:,} devices, batches of "
                      f"{desired.BATCH}", f"Load average before the run: {load:.1f} "
                      f"({os.cpu_count()} CPUs, shared).")


if __name__ == "__main__":
    main()
