"""Drift sketches from devices, as ingest stores them (hub/ingest.py calls `Sketches`).

Each inference point's sketches (contract/sketch.py) are read one by one
against the baseline of the point's deployment version (hub/drift.py): one
that breaks the rules is dropped and counted by reason, the rest of the point
is stored all the same. Good counts are added into `drift_sketches`, one row
per (version, hour, device) holding every feature's counts: read, added to
and written back in the ingest batch's transaction. A point stored before (a
batch sent again after a reconnect) is not counted again.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import orjson

from contract import protocol
from contract.sketch import SketchError, SketchSpec, read_counts
from hub.storage.db import Connection


def bins_of(conn: Connection, model: str, version: int) -> dict[str, int] | None:
    """Feature name -> bins of the version's baseline; None if it has none."""
    row = conn.execute("SELECT spec FROM drift_baselines WHERE model = ? AND version = ?",
                       (model, version)).fetchone()
    if row is None:
        return None
    return {f.name: f.bins for f in SketchSpec.from_json(json.loads(row[0])).features}


Key = tuple[str, int, str, str]  # model, version, hour, device


class Sketches:
    """One ingest batch's sketches: read, checked against their version's baseline and
    summed per key; what is dropped is counted by reason ("dropped") with a line."""

    def __init__(self, conn: Connection, devices: Sequence[str]) -> None:
        """DEVICES: those whose points may come, their deployments read in one query."""
        self.conn, self.devices = conn, devices
        self.rows: dict[Key, dict[str, list[int]]] = {}
        self.stored = 0
        self.dropped: dict[str, int] = {}
        self.note = ""
        self._bins: dict[tuple[str, int], dict[str, int] | None] = {}
        self._models: dict[tuple[str, str], str] | None = None

    def add(self, device: str, point: protocol.Point) -> None:
        if not point.sketches:
            return
        name, version = point.values.get("deployment"), point.values.get("version")
        model = self._model(device, str(name)) if isinstance(version, int) else None
        if model is None or not isinstance(version, int):
            self._drop("unknown_version", len(point.sketches), f"{device}: the point names "
                       f"no deployment version of this device ({name!r} {version!r})")
            return
        bins = self._bins_of(model, version)
        totals = self.rows.setdefault((model, version, hour_of(point.at), device), {})
        for feature, raw in point.sketches.items():
            if bins is None or feature not in bins:
                self._drop("no_baseline", 1, f"{device}: {model}:{version} has no baseline "
                           f"feature {feature}")
                continue
            try:
                counts = read_counts(feature, raw, bins[feature])
            except SketchError as exc:
                self._drop("malformed", 1, f"{device}: {exc}")
                continue
            if feature in totals:  # two points of one hour in a batch
                _add(totals, feature, counts)
            else:
                totals[feature] = list(counts)
            self.stored += 1

    def _drop(self, reason: str, n: int, line: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.note = f"dropped {n} drift sketch(es) from {line[:300]}"

    def _model(self, device: str, name: str) -> str | None:
        """The model of DEVICE's deployment NAME (its row stays, inactive, once removed)."""
        if self._models is None:
            self._models = {(r[0], r[1]): r[2] for r in self.conn.execute(
                "SELECT device_id, name, model FROM deployments WHERE device_id IN"
                " (SELECT value FROM json_each(?))",
                (json.dumps(sorted(set(self.devices))),))}
        return self._models.get((device, name))

    def _bins_of(self, model: str, version: int) -> dict[str, int] | None:
        if (model, version) not in self._bins:
            self._bins[model, version] = bins_of(self.conn, model, version)
        return self._bins[model, version]

    def write(self) -> None:
        add_sketches(self.conn, {key: rows for key, rows in self.rows.items() if rows})


def stored_points(conn: Connection,
                  points: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of POINTS, (device, seq), the hub has stored before: their sketches are
    counted already (a batch comes again after a reconnect, maybe with more points)."""
    if not points:
        return set()
    return {(r[0], r[1]) for r in conn.execute(
        "SELECT t.device_id, t.seq FROM json_each(?) AS j CROSS JOIN telemetry AS t"
        " ON t.device_id = j.value ->> 0 AND t.seq = j.value ->> 1",  # a key look-up each
        (json.dumps(points),))}


def hour_of(moment: datetime) -> str:
    """The start of MOMENT's hour (UTC), as the database stores times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:00:00.000000Z")


def _add(totals: dict[str, list[int]], feature: str, counts: Sequence[int]) -> None:
    """Add COUNTS to FEATURE's in TOTALS; both have the baseline's bins, which never change."""
    before = totals.get(feature)
    if before is not None and len(before) != len(counts):
        raise ValueError(f"{feature}: {len(counts)} counts to add to {len(before)}")
    totals[feature] = list(counts) if before is None else list(map(operator.add, before, counts))


# A stored row is JSON as `_counts_json` writes it: ints only. orjson reads one of 20
# digits or more (beyond 64 bits: a device's hour of absurd counts) as a float; json not.
_LONG_NUMBER = re.compile(r"[0-9]{20}")


def _read_counts_json(text: str) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = (json.loads(text) if _LONG_NUMBER.search(text)
                                    else orjson.loads(text))
    return counts


def _counts_json(totals: dict[str, list[int]]) -> str:
    """The row's JSON, compact (ASCII names, ints): orjson's, or json's beyond 64 bits."""
    try:
        return orjson.dumps(totals).decode("ascii")
    except orjson.JSONEncodeError:
        return json.dumps(totals, separators=(",", ":"))


def add_sketches(conn: Connection, rows: Mapping[Key, dict[str, list[int]]]) -> None:
    """Add counts, keyed (model, version, hour, device) then feature, to what is stored."""
    if not rows:
        return
    stored: dict[Key, dict[str, list[int]]] = {}
    for model, version, hour in {key[:3] for key in rows}:
        devices = [key[3] for key in rows if key[:3] == (model, version, hour)]
        stored.update(((model, version, hour, r[0]), _read_counts_json(r[1])) for r in conn.execute(
            "SELECT device_id, counts FROM drift_sketches WHERE model = ? AND version = ?"
            " AND hour = ? AND device_id IN (SELECT value FROM json_each(?))",
            (model, version, hour, json.dumps(devices))))
    merged = []
    for key, features in rows.items():
        totals = stored.get(key)
        if totals is None:
            totals = features
        else:
            for feature, counts in features.items():
                _add(totals, feature, counts)
        merged.append((*key, _counts_json(totals)))
    conn.executemany(
        "INSERT INTO drift_sketches (model, version, hour, device_id, counts)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, version, hour, device_id)"
        " DO UPDATE SET counts = excluded.counts", merged)
