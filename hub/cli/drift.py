"""The drift side of `edgefleet model`: a baseline from a sample file, and drift shown.

The sample stays on this machine: only its per-feature summary (hub/drift.py
`summarise`: statistics, bin edges, counts) goes to the hub, which checks it
against the version's signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from hub.cli.client import HubClient
from hub.cli.output import emit, emit_one, say
from hub.drift import summarise
from hub.validation import InvalidInput


def read_sample(path: Path, signature: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Tensor name -> rows of PATH: .npz (arrays named as the model's inputs, and outputs
    for prediction drift), or .npy / .csv (rows of the model's only input; a CSV's
    first line may be a header)."""
    inputs = [t["name"] for t in (signature or {}).get("inputs", [])]
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as found:
                return {name: found[name] for name in found.files}
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            array = _read_csv(path)
        else:
            raise click.BadParameter(f"{path.name}: expected a .npy, .npz or .csv file",
                                     param_hint="FILE")
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path.name}: {exc}", param_hint="FILE") from None
    if len(inputs) != 1:
        raise click.BadParameter(
            f"the model has {len(inputs)} inputs ({', '.join(inputs) or 'none known'}): give "
            "an .npz file with one array per input name", param_hint="FILE")
    return {inputs[0]: array}


def _read_csv(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    try:
        float(lines[0].split(",")[0])
        skip = 0
    except (ValueError, IndexError):
        skip = 1  # a header
    return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)


def send_baseline(hub: HubClient, name: str, version: str, path: Path) -> dict[str, Any]:
    record = hub.get(f"/api/v1/models/{name}/versions/{version}")
    signature = record["signature"]
    arrays = read_sample(path, signature)
    sides = {t["name"]: side for side in ("input", "output")
             for t in (signature or {}).get(f"{side}s", [])}
    unknown = sorted(set(arrays) - set(sides))
    if unknown:
        raise click.BadParameter(
            f"{path.name} has array(s) {', '.join(unknown)}, which {name}:{record['version']} "
            f"has no input or output of (it has {', '.join(sides) or 'none'})",
            param_hint="FILE")
    try:
        baseline = summarise(arrays, sides)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="FILE") from None
    answer: dict[str, Any] = hub.request(
        "PUT", f"/api/v1/models/{name}/versions/{record['version']}/baseline",
        json=baseline).json()
    return answer


def show_drift(report: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        emit_one(report, as_json=True)
        return
    say((f"{report['model']}:{report['version']}", "bold"),
        f" on {report['target'] or 'all devices'}, last {_span(report['window_seconds'])};"
        f" drifting at PSI >= {report['psi_threshold']} on >= {report['min_observed']} values")
    rows = [{**f, "psi": _round(f["psi"]), "js_distance": _round(f["js_distance"]),
             "drifted": "DRIFT" if f["drifted"] else ""} for f in report["features"]]
    emit(rows, ["feature", "side", "observed", "psi", "js_distance", "drifted"], as_json=False)


def _span(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
