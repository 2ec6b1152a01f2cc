"""The serving pods' inference metrics, read from their /metrics, as inference points.

On a device the agent reads its serving process's counters over the control
socket; a cluster's pods are `edgefleet serve` processes the agent does not
drive, so it reads the same counters from each pod's Prometheus endpoint
(the names are agent/serving/telemetry.py's): requests, failures and the
request-duration histogram per model version. Where the pods are is a
parameter (`Addresses`): in production the pod IPs the API server lists
(`Namespace.metrics_addresses`), in tests a real local `edgefleet serve`.

Counters are per pod and start again when a pod restarts, so each pod's
increase since the last read (all of it after a restart: a counter that went
down) is added into one running total per deployment version, and those
totals go through the device's `InferenceDeltas`: the same points (count,
errors, mean and percentiles) as a device sends.

A deployment whose version has drift bins (its pods run with
`EDGEFLEET_SERVE_SKETCH`) also has each pod's drift counts read, as JSON from
`/metrics/sketches` beside `/metrics` (a feature's bins as Prometheus samples
would be a line each), with the same key. They go the same way: a pod's
increase per feature (agent/telemetry.py `sketch_deltas`, which also finds a
feature whose counts went down), summed into the version's total, and the
total's moved counts sent by `InferenceDeltas` in the point's sketches, as a
device's. A pod whose serving build has no `/metrics/sketches` (404) has its
counters read all the same.

A pod is untrusted input: a read is bounded in bytes and time, only the
deployment's own model and numeric versions are taken, and a pod that is
unreachable, answers garbage or too much is counted in the round's
`ScrapeRound` (reported beside the replicas), never raised.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import httpx

from agent.serving.telemetry import FAILURES, REQUEST_DURATION, REQUESTS
from agent.telemetry import InferenceDeltas, Values, sketch_deltas
from contract.sketch import SketchError, check_sketches, read_counts

MAX_BYTES = 1 << 20      # an edgefleet serve with a few versions renders ~10 kB
TIMEOUT = 2.0            # seconds to connect, and between bytes
READ_SECONDS = 5.0       # a whole read, against a pod that drips bytes
WORKERS = 8              # pods read at once
_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?[0-9]+)?")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_VERSION = re.compile(r"[0-9]{1,12}")
_WANTED = (REQUESTS, FAILURES, f"{REQUEST_DURATION}_bucket", f"{REQUEST_DURATION}_sum")


@dataclass(frozen=True)
class PodAddress:
    pod: str   # the pod's name: whose counters these are
    url: str   # its /metrics, e.g. http://10.1.2.3:8500/metrics

    @property
    def sketches_url(self) -> str:
        """Its drift counts, beside /metrics (agent/serving/app.py `SKETCHES_PATH`)."""
        return f"{self.url}/sketches"


# A Deployment's object name -> where its pods' /metrics are.
Addresses = Callable[[str], list[PodAddress]]
# One pod's read: its /metrics, and its /metrics/sketches (None: not read, or not served).
_Bodies = tuple[str, str | None]


class ScrapeError(Exception):
    """One pod's /metrics could not be read or understood (one line)."""


class NotServed(ScrapeError):
    """The pod answered 404: its serving build has no such endpoint."""


@dataclass
class Counters:
    """One model version's cumulative counters, as one pod (or a sum of pods) has them."""

    requests: float = 0.0
    failures: float = 0.0
    bounds: tuple[float, ...] = ()   # the histogram's upper bounds, +Inf last
    counts: list[float] = field(default_factory=list)   # per bucket, not cumulative
    latency_sum: float = 0.0
    sketches: dict[str, list[int]] = field(default_factory=dict)   # drift counts per feature

    def since(self, before: Counters | None) -> Counters:
        """The increase from BEFORE; all of it if a counter went down (the pod restarted)."""
        if before is None or before.bounds != self.bounds or self.requests < before.requests \
                or self.failures < before.failures \
                or any(a < b for a, b in zip(self.counts, before.counts, strict=True)):
            return self
        return Counters(self.requests - before.requests, self.failures - before.failures,
                        self.bounds, [a - b for a, b in zip(self.counts, before.counts,
                                                            strict=True)],
                        max(self.latency_sum - before.latency_sum, 0.0),
                        sketch_deltas(self.sketches, before.sketches))

    def add(self, other: Counters) -> None:
        self.requests += other.requests
        self.failures += other.failures
        if not self.bounds:
            self.bounds, self.counts = other.bounds, [0.0] * len(other.bounds)
        if other.bounds == self.bounds:   # pods of another serving build: counts only
            self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
            self.latency_sum += other.latency_sum
        for name, counts in other.sketches.items():
            mine = self.sketches.get(name)
            self.sketches[name] = list(counts) if mine is None or len(mine) != len(counts) \
                else [a + b for a, b in zip(mine, counts, strict=True)]

    def row(self, model: str, version: str) -> dict[str, Any]:
        """As the serving process's /control/stats has it (what InferenceDeltas reads)."""
        return {"model": model, "version": version, "requests": int(self.requests),
                "failures": int(self.failures),
                "latency_buckets": [None if math.isinf(b) else b for b in self.bounds],
                "latency_counts": [int(c) for c in self.counts],
                "latency_sum": self.latency_sum,
                "sketches": {name: list(c) for name, c in self.sketches.items()}}


def _labels(text: str, line: int) -> dict[str, str]:
    labels, at = {}, 0
    while at < len(text):
        found = _LABEL.match(text, at)
        if found is None:
            raise ScrapeError(f"line {line}: labels are not in the Prometheus text format")
        labels[found.group(1)] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n"
                                        else m.group(1), found.group(2))
        at = found.end()
    return labels


def parse(text: str, model: str) -> dict[str, Counters]:
    """MODEL's counters per version from a /metrics body; ScrapeError if it is not one."""
    found: dict[str, Counters] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise ScrapeError(f"line {number} is not in the Prometheus text format")
        name, value = match.group(1), _number(match.group(3), number)
        if name not in _WANTED:
            continue
        labels = _labels(match.group(2) or "", number)
        version = labels.get("version", "")
        if labels.get("model") != model or not _VERSION.fullmatch(version):
            continue   # another model, or a version no release of ours can have
        if not 0 <= value < 2**53:
            raise ScrapeError(f"line {number}: {name} is {value}")
        counters = found.setdefault(version, Counters())
        if name == REQUESTS:
            counters.requests = value
        elif name == FAILURES:
            counters.failures += value   # one sample per reason
        elif name.endswith("_sum"):
            counters.latency_sum = value
        else:
            buckets.setdefault(version, []).append((_number(labels.get("le", ""), number), value))
    for version, cumulative in buckets.items():
        cumulative.sort()
        bounds = tuple(b for b, _ in cumulative)
        totals = [c for _, c in cumulative]
        if len(set(bounds)) != len(bounds) or not math.isinf(bounds[-1]) \
                or any(b < a for a, b in pairwise(totals)):
            raise ScrapeError(f"{REQUEST_DURATION} of {model}:{version} is not a histogram")
        found[version].bounds = bounds
        found[version].counts = [b - a for a, b in pairwise([0.0, *totals])]
    return found


def parse_sketches(text: str, model: str) -> dict[str, dict[str, list[int]]]:
    """MODEL's drift counts per version from a /metrics/sketches body; ScrapeError if it
    is not one (each feature's counts checked as the hub checks a point's)."""
    try:
        rows = json.loads(text)
    except ValueError:
        raise ScrapeError("the sketches are not JSON") from None
    if not isinstance(rows, list):
        raise ScrapeError("the sketches are not a list")
    found: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        if not isinstance(row, dict) or set(row) != {"model", "version", "sketches"}:
            raise ScrapeError("a sketches row is not an object of model, version and sketches")
        version = row["version"]
        if row["model"] != model or not isinstance(version, str) \
                or not _VERSION.fullmatch(version):
            continue   # another model, or a version no release of ours can have
        try:
            found[version] = {name: list(read_counts(name, counts))
                              for name, counts in check_sketches(row["sketches"]).items()}
        except SketchError as exc:
            raise ScrapeError(f"{model}:{version}: {exc}") from None
    return found


def _number(text: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScrapeError(f"line {line}: {text[:40]!r} is not a number") from None
    if math.isnan(value):
        raise ScrapeError(f"line {line}: NaN")
    return value


def read(client: httpx.Client, url: str, key: str | None) -> str:
    """The body at URL, at most MAX_BYTES in READ_SECONDS; ScrapeError otherwise."""
    deadline = time.monotonic() + READ_SECONDS
    try:
        with client.stream("GET", url, headers={"Authorization": f"Bearer {key}"} if key
                           else {}) as answer:
            if answer.status_code == 404:
                raise NotServed(f"{url} answered 404")
            if answer.status_code != 200:
                raise ScrapeError(f"{url} answered {answer.status_code}")
            body = bytearray()
            for chunk in answer.iter_raw():
                body += chunk
                if len(body) > MAX_BYTES:
                    raise ScrapeError(f"{url} sent more than {MAX_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise ScrapeError(f"{url} took longer than {READ_SECONDS:.0f} s")
    except httpx.HTTPError as exc:
        raise ScrapeError(f"{url}: {' '.join(str(exc).split())[:200] or type(exc).__name__}"
                          ) from None
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise ScrapeError(f"{url} sent bytes that are not UTF-8 text") from None


@dataclass(frozen=True)
class ScrapeRound:
    """One deployment's read of its pods: what is reported beside the replicas."""

    pods: int      # pods with an address
    failed: int    # of those, unreadable this round
    error: str     # the last failure, one line ("" if none)

    def values(self) -> dict[str, int | str]:
        values: dict[str, int | str] = {"metrics_pods": self.pods, "metrics_failed": self.failed}
        if self.error:
            values["metrics_error"] = self.error[:128]   # the contract's longest string
        return values


class Scraper:
    """Reads every deployment's pods each telemetry interval (see the module docstring)."""

    def __init__(self, addresses: Addresses, *, client: httpx.Client | None = None) -> None:
        self.addresses = addresses
        self.client = client or httpx.Client(timeout=TIMEOUT, follow_redirects=False)
        # deployment -> pod -> version -> its counters at the last read
        self._pods: dict[str, dict[str, dict[str, Counters]]] = {}
        self._totals: dict[str, dict[str, Counters]] = {}   # deployment -> version -> sum
        self._deltas: dict[str, InferenceDeltas] = {}       # deployment -> points

    def close(self) -> None:
        self.client.close()

    def scrape(self, deployments: Mapping[str, str], key: str | None,
               sketched: Collection[str] = ()) -> dict[str, tuple[list[Values], ScrapeRound]]:
        """Per deployment, its inference points since the last call and how the read went.

        DEPLOYMENTS maps each deployment to its Deployment's object name; KEY is the
        scoring API key the pods want; the pods of the deployments in SKETCHED have their
        drift counts read too. Every pod of the round is read at once."""
        listed: dict[str, list[PodAddress] | str] = {}
        for deployment, object_name in deployments.items():
            try:
                listed[deployment] = self.addresses(object_name)
            except Exception as exc:  # the API server away: said in the round
                listed[deployment] = f"pods not listed: {' '.join(str(exc).split())}"
        reads = [(p, deployment in sketched) for deployment, found in listed.items()
                 if not isinstance(found, str) for p in found]
        with ThreadPoolExecutor(max_workers=min(WORKERS, max(len(reads), 1))) as pool:
            bodies = dict(zip((p for p, _ in reads),
                              pool.map(lambda r: self._read(r[0], key, r[1]), reads),
                              strict=True))
        return {deployment: ([], ScrapeRound(0, 0, found)) if isinstance(found, str)
                else self._count(deployment, found, bodies)
                for deployment, found in listed.items()}

    def _count(self, deployment: str, pods: list[PodAddress],
               bodies: Mapping[PodAddress, _Bodies | ScrapeError]
               ) -> tuple[list[Values], ScrapeRound]:
        totals = self._totals.setdefault(deployment, {})
        last = self._pods.get(deployment, {})
        kept: dict[str, dict[str, Counters]] = {}   # pods gone from the list are forgotten
        failed, error = 0, ""
        for pod in pods:
            before = last.get(pod.pod, {})
            try:
                body = bodies[pod]
                if isinstance(body, ScrapeError):
                    raise body
                metrics, sketches = body
                now = parse(metrics, deployment)
                if sketches is not None:
                    for version, counts in parse_sketches(sketches, deployment).items():
                        now.setdefault(version, Counters()).sketches = counts
            except ScrapeError as exc:
                failed, error = failed + 1, f"{pod.pod}: {exc}"
                kept[pod.pod] = before   # its next good read counts from the last one
                continue
            for version, counters in now.items():
                totals.setdefault(version, Counters()).add(counters.since(before.get(version)))
            kept[pod.pod] = now
        self._pods[deployment] = kept
        rows = [c.row(deployment, v) for v, c in sorted(totals.items())]
        points = self._deltas.setdefault(deployment, InferenceDeltas()).points(rows)
        return points, ScrapeRound(len(pods), failed, error)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is kept for deployments not in KEEP (no longer served)."""
        keep = set(keep)
        self._pods = {k: v for k, v in self._pods.items() if k in keep}
        self._totals = {k: v for k, v in self._totals.items() if k in keep}
        self._deltas = {k: v for k, v in self._deltas.items() if k in keep}

    def _read(self, pod: PodAddress, key: str | None, sketched: bool) -> _Bodies | ScrapeError:
        try:
            return read(self.client, pod.url, key), \
                self._read_sketches(pod, key) if sketched else None
        except ScrapeError as exc:
            return exc

    def _read_sketches(self, pod: PodAddress, key: str | None) -> str | None:
        try:
            return read(self.client, pod.sketches_url, key)
        except NotServed:   # a serving build from before drift sketches: counters only
            return None
