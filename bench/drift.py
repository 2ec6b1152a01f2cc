"""What data drift costs, in process, as ratios and times.

1. **Telemetry ingestion with sketches** (`hub.ingest.write_batch`, the ingest loop's
   batches of 500 messages): DEVICES devices each send one message with a system
   point and an inference point, the inference point with drift sketches of 10
   input features and 2 outputs (10 bins each, as the baseline's deciles make) or
   without; messages a second with sketches as a ratio to without, phases
   alternated (median of 3 each) so a busy machine hurts both alike.
2. **Drift computation** (`hub.drift.compute`): 10,000 devices x 10 features, one
   hour of sketches each (10,000 rows of 10 features, as the ingest writes them), merged
   and judged for the whole fleet and for a target tag that half the devices
   have; the median of 3 runs.
3. **The serving path** (`agent.sketches.Sketcher.observe`): microseconds to count
   one request of 1, 8 and 64 rows of a [rows, 10] input into 10 features' bins,
   against the same request's `json.loads` of its body (what the serving process
   does to every request anyway) as the ratio.

Run: `.venv/bin/python bench/drift.py` (~1 min on 2 cores); `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# Ahead of this directory, whose agent.py would shadow the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from agent.mqtt import Message  # noqa: E402
from agent.sketches import Sketcher  # noqa: E402
from contract import protocol  # noqa: E402
from contract.sketch import SketchSpec  # noqa: E402
from harness import timed  # noqa: E402
from hub import drift, drift_sketches  # noqa: E402
from hub.ingest import write_batch  # noqa: E402
from hub.storage.db import Database, dumps, format_time  # noqa: E402

FEATURES = 10
RNG = np.random.default_rng(0)


def fill(db: Database, devices: int) -> tuple[list[str], dict[str, list[int]]]:
    """DEVICES devices (half tagged group=a) serving tiny:1, whose baseline has FEATURES
    inputs and 2 outputs; returns their ids and a typical sketch per feature."""
    sample = RNG.normal(size=(5000, FEATURES))
    baseline = drift.summarise({"x": sample, "y": sample[:, :2]}, {"x": "input", "y": "output"})
    ids = [f"dev-{i:05d}" for i in range(devices)]
    stamp = format_time(datetime.now(UTC))
    with db.transaction() as conn:
        drift.set_baseline(conn, "tiny", 1, baseline, "bench")  # before it is deployed
        conn.executemany("INSERT INTO devices (id, name, tags, desired_generation,"
                         " applied_generation, published_generation) VALUES (?, ?, ?, 1, 1, 1)",
                         [(d, d, dumps({"group": "a" if i % 2 else "b"}))
                          for i, d in enumerate(ids)])
        conn.executemany("INSERT INTO deployments (device_id, name, model, version, active,"
                         " created_at, updated_at) VALUES (?, 'tiny', 'tiny', 1, 1, ?, ?)",
                         [(d, stamp, stamp) for d in ids])
    spec = SketchSpec.from_json([{k: f[k] for k in ("side", "tensor", "column", "edges")}
                                 for f in baseline["features"]])
    sketcher = Sketcher(spec)
    sketcher.observe({"x": RNG.normal(size=(60, FEATURES))}, {"y": RNG.normal(size=(60, 2))})
    return ids, sketcher.counts()


def ingestion(devices: int, work: Path) -> None:
    db = Database(work / "ingest.db")
    ids, sketches = fill(db, devices)
    seq = [0]

    def messages(with_sketches: bool) -> list[Message]:
        at = datetime.now(UTC)
        out = []
        for device in ids:
            seq[0] += 2
            points = (
                protocol.Point(seq[0], at, "system", {"cpu_percent": 12.5, "memory_percent": 40.0}),
                protocol.Point(seq[0] + 1, at, "inference", {
                    "deployment": "tiny", "version": 1, "count": 60, "errors": 0,
                    "mean_ms": 1.2, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0},
                    sketches if with_sketches else {}))
            out.append(Message(protocol.telemetry_topic(device),
                               protocol.build_telemetry(protocol.TelemetryBatch(device, points))))
        return out

    def run(with_sketches: bool) -> float:
        batch = messages(with_sketches)
        start = time.perf_counter()
        for i in range(0, len(batch), 500):
            counters = write_batch(db, batch[i:i + 500])
            assert not counters.dropped and not counters.sketches_dropped, counters
        return len(batch) / (time.perf_counter() - start)

    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for with_sketches in (False, True):
            rates[with_sketches].append(run(with_sketches))
    without, with_ = statistics.median(rates[False]), statistics.median(rates[True])
    size = len(messages(True)[0].payload), len(messages(False)[0].payload)
    print(f"\nTelemetry ingestion, {devices} devices, 1 message each (2 points), batches of 500\n"
          "\n| | msg/s | bytes/msg | x without |\n|---|---|---|---|")
    print(f"| without sketches | {without:,.0f} | {size[1]} | 1.00 |")
    print(f"| with 12 sketches | {with_:,.0f} | {size[0]} | {with_ / without:.2f} |")


def computation(devices: int, work: Path, repeat: int) -> None:
    db = Database(work / "compute.db")
    ids, _ = fill(db, devices)
    hour = drift_sketches.hour_of(datetime.now(UTC))
    rows = {("tiny", 1, hour, device): {f"x[{feature}]": RNG.multinomial(360, [0.1] * 10).tolist()
                                        for feature in range(FEATURES)} for device in ids}
    with db.transaction() as conn:
        drift_sketches.add_sketches(conn, rows)
    everyone = timed(lambda: drift.compute(db, "tiny", 1), repeat)
    half = timed(lambda: drift.compute(db, "tiny", 1, target=[("group", "a")]), repeat)
    print(f"\nDrift computation, {devices:,} devices x {FEATURES} features "
          f"({len(rows) * FEATURES:,} sketches, one hour each)\n\n| target | seconds |\n|---|---|")
    print(f"| all devices | {everyone:.3f} |")
    print(f"| group=a (half) | {half:.3f} |")


def serving(repeat: int) -> None:
    spec = SketchSpec.from_json([{"side": "input", "tensor": "x", "column": c,
                                  "edges": list(np.linspace(-2, 2, 9))} for c in range(FEATURES)])
    sketcher = Sketcher(spec)
    print("\nCounting one request into 10 features' bins (Sketcher.observe)\n"
          "\n| rows | us | x json.loads of the body |\n|---|---|---|")
    for rows in (1, 8, 64):
        x = RNG.normal(size=(rows, FEATURES)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, FEATURES],
                                       "data": x.ravel().tolist()}]})
        observe = timed(lambda x=x: [sketcher.observe({"x": x}, {}) for _ in range(100)], repeat)
        parse = timed(lambda body=body: [json.loads(body) for _ in range(100)], repeat)
        print(f"| {rows} | {observe * 1e4:.1f} | {observe / parse:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--devices", type=int, default=10_000,
                        help="devices for the drift computation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        ingestion(1000 if args.quick else 5000, Path(work))
    with tempfile.TemporaryDirectory() as work:
        computation(1000 if args.quick else args.devices, Path(work), 3)
    serving(5 if args.quick else 30)


if __name__ == "__main__":
    main()
