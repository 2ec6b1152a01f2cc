"""The agent's on-disk telemetry queue: ordering, bound, drop counter, crash safety."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.telemetry_queue import TelemetryQueue


def test_points_keep_order_until_acknowledged(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "q.db")
    seqs = queue.extend([("system", {"cpu": i}) for i in range(5)])
    assert seqs == [1, 2, 3, 4, 5]
    assert [p.values["cpu"] for p in queue.peek(3)] == [0, 1, 2]
    queue.ack(3)
    assert [p.seq for p in queue.peek(10)] == [4, 5]
    assert queue.append("inference", {"count": 1}) == 6


def test_full_queue_drops_oldest_and_counts(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "q.db", max_points=10)
    queue.extend([("system", {"i": i}) for i in range(25)])
    assert len(queue) == 10 and queue.dropped == 15
    assert [p.values["i"] for p in queue.peek(100)] == list(range(15, 25))


def test_sequence_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    script = (
        "import os, sys; from pathlib import Path;"
        " from agent.telemetry_queue import TelemetryQueue;"
        f"q = TelemetryQueue(Path({str(path)!r})); q.extend([('system', {{}})] * 7); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    queue = TelemetryQueue(path)
    assert [p.seq for p in queue.peek(100)] == list(range(1, 8))
    queue.ack(7)
    queue.close()
    # numbers are never handed out twice, even after everything was acknowledged
    assert TelemetryQueue(path).append("system", {}) == 8
