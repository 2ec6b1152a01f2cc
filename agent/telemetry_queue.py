"""The agent's bounded on-disk queue of telemetry points.

Points get a per-device sequence number when they are queued; they leave the
queue only when the hub has acknowledged them (the broker's PUBACK for the
batch that carried them). While the device is offline the queue grows up to
its bound, then drops its oldest points and counts what it dropped, so a
long outage costs old detail, never the disk and never the newest state.

SQLite (stdlib) keeps it crash-safe: a point is either queued or not, and a
sequence number is never handed out twice, even across a power loss.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.options import TELEMETRY_QUEUE_POINTS
from contract.protocol import format_time


@dataclass(frozen=True)
class Point:
    seq: int
    at: str
    kind: str
    values: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "kind": self.kind, "values": self.values}


class TelemetryQueue:
    def __init__(self, path: Path, *, max_points: int = TELEMETRY_QUEUE_POINTS.default) -> None:
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        self.max_points = max_points
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS points (seq INTEGER PRIMARY KEY, at TEXT, kind TEXT,"
            " value_json TEXT)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INT)")
        self._db.execute(
            "INSERT OR IGNORE INTO counters VALUES ('next_seq', 1), ('dropped', 0)"
        )

    def _counter(self, name: str) -> int:
        return self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    @property
    def dropped(self) -> int:
        """Points dropped, oldest first, because the queue was full (ever, on this device)."""
        return self._counter("dropped")

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM points").fetchone()[0]

    def append(self, kind: str, values: Mapping[str, Any], *, at: str | None = None) -> int:
        return self.extend([(kind, values)], at=at)[0]

    def extend(
        self, items: Iterable[tuple[str, Mapping[str, Any]]], *, at: str | None = None
    ) -> list[int]:
        """Queue points in one transaction; returns their sequence numbers."""
        stamp = at or format_time(datetime.now(UTC))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._counter("next_seq")
            rows = [(seq + i, stamp, kind, json.dumps(dict(values))) for i, (kind, values)
                    in enumerate(items)]
            self._db.executemany("INSERT INTO points VALUES (?, ?, ?, ?)", rows)
            self._db.execute(
                "UPDATE counters SET value = ? WHERE name = 'next_seq'", (seq + len(rows),)
            )
            excess = self._db.execute("SELECT COUNT(*) FROM points").fetchone()[0] - self.max_points
            if excess > 0:
                self._db.execute(
                    "DELETE FROM points WHERE seq IN (SELECT seq FROM points ORDER BY seq LIMIT ?)",
                    (excess,),
                )
                self._db.execute(
                    "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,)
                )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite ends it itself on some errors, e.g. a full disk
                self._db.execute("ROLLBACK")
            raise
        return [row[0] for row in rows]

    def peek(self, limit: int) -> list[Point]:
        """The oldest LIMIT points not yet acknowledged, in order."""
        rows = self._db.execute(
            "SELECT seq, at, kind, value_json FROM points ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [Point(seq, at, kind, json.loads(values)) for seq, at, kind, values in rows]

    def ack(self, up_to_seq: int) -> None:
        """The hub has every point up to UP_TO_SEQ: forget them."""
        self._db.execute("DELETE FROM points WHERE seq <= ?", (up_to_seq,))

    def close(self) -> None:
        self._db.close()
