"""What drift sketching costs a request: counted on the request's thread (as before) or
handed to the serving process's sketch queue (agent/serving/sketching.py), in one run.

    .venv/bin/python bench/sketching.py               # ~10 s
    .venv/bin/python bench/sketching.py --rounds 5

A version with 12 sketched features (10 input columns of 16 bins, 2 output columns)
sees requests of 1 and of 32 rows. Per request, "inline" is `Sketcher.observe` (what
the request path ran before), "queued" is `SketchQueue.offer` (what it runs now); the
ratio is inline over queued in the same round. Offers are made in bursts smaller than
the queue, so none is dropped, and "counted/s" is how many requests the queue's
thread counts a second (the offers' burst until `settle` returns): above a serving
process's request rate, nothing is dropped. Medians over --rounds; the machine is
shared, so run it 2-3 times and quote the spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Ahead of this directory, whose agent.py would shadow the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from agent.serving.sketching import MAXSIZE, SketchQueue  # noqa: E402
from agent.sketches import Sketcher  # noqa: E402
from contract.sketch import SketchSpec  # noqa: E402

SPEC = SketchSpec.from_json(
    [{"side": "input", "tensor": "x", "column": c, "edges": list(np.linspace(-2, 2, 15))}
     for c in range(10)]
    + [{"side": "output", "tensor": "y", "column": c, "edges": [0.0, 0.5, 1.0]}
       for c in range(2)])
BURST = MAXSIZE // 2


def _round(rows: int, calls: int) -> tuple[float, float, float]:
    """Seconds per request inline and queued, and requests counted per second queued."""
    rng = np.random.default_rng(rows)
    inputs = {"x": rng.normal(size=(rows, 10)).astype(np.float32)}
    outputs = {"y": rng.random(size=(rows, 2)).astype(np.float32)}
    sketcher = Sketcher(SPEC)
    began = time.perf_counter()
    for _ in range(calls):
        sketcher.observe(inputs, outputs)
    inline = (time.perf_counter() - began) / calls
    queue, offering, counting, done = SketchQueue(), 0.0, 0.0, 0
    while done < calls:
        began = time.perf_counter()
        for _ in range(BURST):
            assert queue.offer(sketcher, inputs, outputs)
        offered = time.perf_counter()
        assert queue.settle(timeout=60)
        offering += offered - began
        counting += time.perf_counter() - began
        done += BURST
    return inline, offering / done, done / counting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4096)
    args = parser.parse_args()
    print(f"{'rows':>5} {'inline us':>10} {'queued us':>10} {'ratio':>7} {'counted/s':>10}")
    for rows in (1, 32):
        results = [_round(rows, args.calls) for _ in range(args.rounds)]
        inline = statistics.median(r[0] for r in results)
        queued = statistics.median(r[1] for r in results)
        ratio = statistics.median(r[0] / r[1] for r in results)
        rate = statistics.median(r[2] for r in results)
        print(f"{rows:>5} {inline * 1e6:>10.1f} {queued * 1e6:>10.1f} {ratio:>6.1f}x "
              f"{rate:>10.0f}")


if __name__ == "__main__":
    main()
