"""Data drift: a version's baseline, the sketches devices send, and drift per feature.

A baseline is a sample of the version's training inputs (and, optionally, of
its predictions) summarised per feature: count, mean, std, min, max, fixed
bin edges (the sample's deciles) and the sample's counts in those bins. The
CLI computes it from the file (`summarise`) and the hub checks it against the
version's signature (`check_baseline`) before storing it. It is set once,
before the version is deployed: devices count into its edges
(contract/sketch.py, sent with the desired state).

Ingest adds the sketch counts devices send into `drift_sketches`
(hub/drift_sketches.py); `compute` merges the rows of a window for all
devices or those with given tags, and gives per feature the
Population Stability Index and the Jensen-Shannon distance (base 2, 0..1)
between the baseline's bin shares and the observed ones. A feature drifts
when its PSI reaches `PSI_THRESHOLD` on at least `MIN_OBSERVED` values; the
first computation that finds it drifting (for that version and target)
records a `drift.detected` event. The hub computes every version with a
baseline on a schedule (`DriftWatch`) and on demand (the API).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np

from agent.sketches import histogram
from contract.sketch import Feature, SketchError, SketchSpec
from contract.tensors import Signature
from hub import events
from hub.devices import tag_filter
from hub.drift_sketches import hour_of
from hub.errors import Conflict, NotFound
from hub.events import EventType
from hub.periodic import Periodic
from hub.storage.db import Connection, Database, dumps, format_time, now
from hub.validation import InvalidInput

log = logging.getLogger("edgefleet.hub.drift")

BINS: Final = 10                 # deciles of the baseline sample
PSI_THRESHOLD: Final = 0.2       # the usual "significant shift"
MIN_OBSERVED: Final = 100        # fewer values than this say nothing either way
WINDOW: Final = timedelta(hours=24)
FLOOR: Final = 1e-4              # a share of 0 would make PSI infinite
STATS: Final = ("count", "mean", "std", "min", "max")


# -- baseline ---------------------------------------------------------------------------

def summarise(arrays: Mapping[str, np.ndarray], sides: Mapping[str, str]) -> dict[str, Any]:
    """The baseline of ARRAYS (tensor name -> [rows, columns] or [rows]); SIDES says
    whether each tensor is an 'input' or an 'output'."""
    features = []
    for tensor, array in arrays.items():
        data = np.asarray(array, dtype=np.float64)
        if data.ndim not in (1, 2) or data.shape[0] < 2:
            raise InvalidInput(f"baseline {tensor}: expected rows x columns (or one column) "
                               f"with at least 2 rows, got shape {list(data.shape)}")
        for index in range(1 if data.ndim == 1 else data.shape[1]):
            values = data if data.ndim == 1 else data[:, index]
            values = values[np.isfinite(values)]
            if values.size < 2:
                raise InvalidInput(f"baseline {tensor}[{index}]: fewer than 2 finite values")
            edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]))
            if edges.size == 0:  # a constant column
                edges = np.asarray([values[0]])
            features.append({
                "side": sides[tensor], "tensor": tensor, "column": index,
                "edges": edges.tolist(), "counts": histogram(edges, values).tolist(),
                "count": int(values.size), "mean": float(values.mean()),
                "std": float(values.std()), "min": float(values.min()),
                "max": float(values.max()),
            })
    return {"features": features}


def check_baseline(baseline: object, signature: Signature | None) -> dict[str, Any]:
    """BASELINE if it fits SIGNATURE (each feature a column of a tensor the model has on
    that side, numbers sane); InvalidInput saying what does not."""
    if signature is None:
        raise InvalidInput("the version has no signature, so a baseline cannot be checked "
                           "against its inputs")
    if not isinstance(baseline, dict) or set(baseline) != {"features"} \
            or not isinstance(baseline["features"], list):
        raise InvalidInput('a baseline is {"features": [...]}')
    items = baseline["features"]
    if not all(isinstance(item, dict) for item in items):
        raise InvalidInput("each baseline feature must be an object")
    keys = ("side", "tensor", "column", "edges")
    try:
        spec = SketchSpec.from_json([{k: f.get(k) for k in keys} for f in items])
    except SketchError as exc:
        raise InvalidInput(f"baseline: {exc}") from None
    tensors = {"input": {t.name: t for t in signature.inputs},
               "output": {t.name: t for t in signature.outputs}}
    columns: dict[tuple[str, str], set[int]] = {}
    for feature, item in zip(spec.features, items, strict=True):
        _check_feature(feature, item, tensors[feature.side])
        columns.setdefault((feature.side, feature.tensor), set()).add(feature.column)
    for (side, name), seen in columns.items():
        shape = tensors[side][name].shape
        width = 1 if len(shape) <= 1 else shape[-1]
        if width != -1 and len(seen) != width:
            raise InvalidInput(f"baseline {side} {name}: {len(seen)} column(s), but the "
                               f"model's {name} has {width} (shape {list(shape)})")
    if not any(f.side == "input" for f in spec.features):
        raise InvalidInput("a baseline needs at least one input feature")
    return {"features": items}


def _check_feature(feature: Feature, item: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    where = f"baseline {feature.side} {feature.name}"
    tensor = tensors.get(feature.tensor)
    if tensor is None:
        raise InvalidInput(f"{where}: the model has no {feature.side} named "
                           f"{feature.tensor!r} (it has {', '.join(sorted(tensors)) or 'none'})")
    shape = tensor.shape
    width = 1 if len(shape) <= 1 else shape[-1]
    if len(shape) > 2 and all(n != -1 for n in shape[1:-1]) and int(np.prod(shape[1:-1])) != 1:
        raise InvalidInput(f"{where}: {feature.tensor} has shape {list(shape)}; only "
                           "[rows, columns] or [rows] tensors can be sketched")
    if width != -1 and feature.column >= width:
        raise InvalidInput(f"{where}: {feature.tensor} has {width} column(s) (shape "
                           f"{list(shape)}), the baseline has column {feature.column}")
    if tensor.datatype not in ("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
                               "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"):
        raise InvalidInput(f"{where}: {feature.tensor} is {tensor.datatype}, not numeric")
    counts = item.get("counts")
    if not isinstance(counts, list) or len(counts) != feature.bins or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) \
            or not any(counts):
        raise InvalidInput(f"{where}: counts must be {feature.bins} non-negative integers, "
                           "not all 0")
    for stat in STATS:
        value = item.get(stat)
        if not isinstance(value, int | float) or isinstance(value, bool) \
                or not np.isfinite(value):
            raise InvalidInput(f"{where}: {stat} must be a finite number")
    extra = set(item) - {*("side", "tensor", "column", "edges", "counts"), *STATS}
    if extra:
        raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(extra))}")


def set_baseline(conn: Connection, model: str, version: int, baseline: dict[str, Any],
                 actor: str) -> None:
    """Store the (checked) baseline; Conflict once the version has one or is deployed:
    devices count into the edges their desired state gave them."""
    if conn.execute("SELECT 1 FROM drift_baselines WHERE model = ? AND version = ?",
                    (model, version)).fetchone():
        raise Conflict(f"{model}:{version} already has a baseline; a baseline is fixed "
                       "(register a new version for a new one)")
    if conn.execute("SELECT 1 FROM deployments WHERE model = ? AND active = 1 AND"
                    " (version = ? OR candidate_version = ?) LIMIT 1",
                    (model, version, version)).fetchone():
        raise Conflict(f"{model}:{version} is deployed already; its devices would not count "
                       "into a baseline set now. Set it before deploying")
    conn.execute("INSERT INTO drift_baselines (model, version, baseline, spec, created_at,"
                 " created_by) VALUES (?, ?, ?, ?, ?, ?)",
                 (model, version, dumps(baseline), dumps(_spec_json(baseline)), now(), actor))


def _spec_json(baseline: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{k: f[k] for k in ("side", "tensor", "column", "edges")}
            for f in baseline["features"]]


def get_baseline(db: Database, model: str, version: int) -> dict[str, Any]:
    row = db.query_one("SELECT baseline FROM drift_baselines WHERE model = ? AND version = ?",
                       (model, version))
    if row is None:
        raise NotFound(f"{model}:{version} has no baseline (edgefleet model baseline)")
    baseline: dict[str, Any] = json.loads(row["baseline"])
    return baseline


# -- drift ------------------------------------------------------------------------------

def shares(counts: np.ndarray) -> np.ndarray:
    return counts / counts.sum()


def psi(expected: np.ndarray, observed: np.ndarray) -> float:
    """Population Stability Index of two count vectors over the same bins."""
    p = np.maximum(shares(expected), FLOOR)
    q = np.maximum(shares(observed), FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(expected: np.ndarray, observed: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2: 0 for the same shares, 1 for disjoint ones."""
    p, q = shares(expected), shares(observed)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    side: str
    observed: int
    psi: float | None
    js: float | None
    drifted: bool

    def to_json(self) -> dict[str, Any]:
        return {"feature": self.feature, "side": self.side, "observed": self.observed,
                "psi": self.psi, "js_distance": self.js, "drifted": self.drifted}


def target_text(target: Sequence[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(target))


def merged_counts(db: Database, model: str, version: int, target: Sequence[tuple[str, str]],
                  since: datetime) -> dict[str, np.ndarray]:
    """Feature -> the counts of every device (with TARGET's tags) since SINCE, summed."""
    sql = ("SELECT s.counts FROM drift_sketches s WHERE s.model = ?"
           " AND s.version = ? AND s.hour >= ?")
    params: list[Any] = [model, version, hour_of(since)]
    if target:
        matching, values = tag_filter(target, "d")
        sql += (" AND EXISTS (SELECT 1 FROM devices d WHERE d.id = s.device_id AND "
                + " AND ".join(matching) + ")")
        params += values
    totals: dict[str, list[list[int]]] = {}
    for row in db.query(sql, params):
        for feature, counts in json.loads(row["counts"]).items():
            totals.setdefault(feature, []).append(counts)
    # Ingest checked every count against the baseline's bins, which never change.
    return {feature: np.asarray(lists, dtype=np.int64).sum(axis=0)
            for feature, lists in totals.items()}


def judge(baseline: Mapping[str, Any], merged: Mapping[str, np.ndarray]) -> list[FeatureDrift]:
    out = []
    for item in baseline["features"]:
        name = f"{item['tensor']}[{item['column']}]"
        expected = np.asarray(item["counts"], dtype=np.int64)
        observed = merged.get(name)
        if observed is None or observed.shape != expected.shape:
            out.append(FeatureDrift(name, item["side"], 0, None, None, False))
            continue
        n = int(observed.sum())
        value = psi(expected, observed)
        out.append(FeatureDrift(name, item["side"], n, value, js_distance(expected, observed),
                                n >= MIN_OBSERVED and value >= PSI_THRESHOLD))
    return out


def compute(db: Database, model: str, version: int, *, target: Sequence[tuple[str, str]] = (),
            window: timedelta = WINDOW, clock: datetime | None = None,
            actor: str = "drift") -> dict[str, Any]:
    """Drift of MODEL:VERSION on the devices with TARGET's tags over the last WINDOW. Over
    the standard WINDOW it is also stored, with a `drift.detected` event for each feature
    that newly drifts (another window only shows: it would make features flap)."""
    at = clock or datetime.now(UTC)
    baseline = get_baseline(db, model, version)
    features = judge(baseline, merged_counts(db, model, version, target, at - window))
    where = target_text(target)
    stamp = format_time(at)
    report = {"model": model, "version": version, "target": where, "computed_at": stamp,
              "window_seconds": int(window.total_seconds()), "psi_threshold": PSI_THRESHOLD,
              "min_observed": MIN_OBSERVED, "features": [f.to_json() for f in features]}
    if window != WINDOW:
        return report
    with db.transaction() as conn:
        before = {r[0] for r in conn.execute(
            "SELECT feature FROM drift_results WHERE model = ? AND version = ? AND target = ?"
            " AND drifted = 1", (model, version, where))}
        conn.executemany(
            "INSERT INTO drift_results (model, version, target, feature, observed, psi, js,"
            " drifted, computed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (model, version, target, feature) DO UPDATE SET"
            " observed = excluded.observed, psi = excluded.psi, js = excluded.js,"
            " drifted = excluded.drifted, computed_at = excluded.computed_at",
            [(model, version, where, f.feature, f.observed, f.psi, f.js, int(f.drifted), stamp)
             for f in features])
        for f in features:
            if f.drifted and f.feature not in before:
                events.record(conn, EventType.DRIFT_DETECTED, subject=f"{model}:{version}",
                              actor=actor,
                              detail=f"{f.side} {f.feature}: PSI {f.psi:.3f} >= "
                                     f"{PSI_THRESHOLD} on {f.observed} values"
                                     + (f" (target {where})" if where else ""))
    return report


class DriftWatch(Periodic):
    """The schedule: every INTERVAL seconds, each version with a baseline, all devices."""

    def __init__(self, db: Database, *, interval: float = 60.0,
                 leads: Callable[[], bool] = lambda: True) -> None:
        """LEADS says whether this hub runs the one-replica jobs now (hub/leader.py)."""
        super().__init__("drift", self.sweep, interval=interval, leads=leads)
        self.db = db

    def sweep(self) -> None:
        for row in self.db.query("SELECT model, version FROM drift_baselines"):
            try:
                compute(self.db, row["model"], row["version"])
            except Exception:  # one version's trouble must not stop the others'
                log.exception("computing drift of %s:%s failed", row["model"], row["version"])

