"""The metrics `edgefleet serve` exports at /metrics, declared once here.

Per model and version: requests, failures by reason, latency (end to end
and of the runtime call alone), and the shadow candidate's own numbers.
Process-wide: inferences in flight, requests queued, 503 rejections, and
one `model_loaded` sample per version naming its runtime and device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from agent.serving.limits import Limiter
from agent.serving.metrics import Counter, Gauge, Histogram, Labels, Registry
from agent.serving.sketching import SketchQueue
from agent.serving.table import ModelTable
from agent.sketches import Sketcher
from contract.sketch import SketchSpec

# Seconds; from sub-millisecond tiny models on a desktop to slow ones on a Raspberry Pi.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
MODEL = ("model", "version")
# The names others read back (Kubernetes mode scrapes them from the pods: agent/kube/scrape.py).
REQUESTS = "edgefleet_serving_requests_total"
FAILURES = "edgefleet_serving_failures_total"
REQUEST_DURATION = "edgefleet_serving_request_duration_seconds"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Telemetry:
    def __init__(self, table: ModelTable, limiter: Limiter) -> None:
        self.registry = r = Registry()
        self.requests = r.add(Counter(
            REQUESTS,
            "Inference requests routed to a model version, whatever their outcome.", MODEL,
        ))
        self.failures = r.add(Counter(
            FAILURES,
            "Inference requests that failed: reason bad_request (400),"
            " model_error or internal (500).",
            (*MODEL, "reason"),
        ))
        self.latency = r.add(Histogram(
            REQUEST_DURATION,
            "Arrival to response of successful inferences, queue wait included.",
            LATENCY_BUCKETS, MODEL,
        ))
        self.infer_latency = r.add(Histogram(
            "edgefleet_serving_inference_duration_seconds",
            "The runtime's infer call alone, for successful inferences.",
            LATENCY_BUCKETS, MODEL,
        ))
        self.batch_rows = r.add(Histogram(
            "edgefleet_serving_batch_rows",
            "Rows per runtime call of versions that batch (agent/serving/batching.py).",
            BATCH_BUCKETS, MODEL,
        ))
        self.rejected = r.add(Counter(
            "edgefleet_serving_rejected_total",
            "Inference requests answered 503: the queue was full or the wait over budget.",
            ("model",),
        ))
        r.add(Gauge(
            "edgefleet_serving_in_flight", "Inferences running now.",
            lambda: [((), limiter.running)],
        ))
        r.add(Gauge(
            "edgefleet_serving_queue_depth", "Inference requests waiting for a slot.",
            lambda: [((), limiter.waiting)],
        ))
        r.add(Gauge(
            "edgefleet_serving_model_loaded",
            "1 for each loaded version, with its role and the runtime and device it runs on.",
            lambda: _loaded(table), (*MODEL, "role", "runtime", "device"),
        ))
        self.shadow_requests = r.add(Counter(
            "edgefleet_serving_shadow_requests_total",
            "Copies of primary requests run on a shadow candidate.", MODEL,
        ))
        self.shadow_failures = r.add(Counter(
            "edgefleet_serving_shadow_failures_total",
            "Shadow copies the candidate failed on.", MODEL,
        ))
        self.shadow_dropped = r.add(Counter(
            "edgefleet_serving_shadow_dropped_total",
            "Shadow copies not run because the server was busy.", MODEL,
        ))
        self.shadow_latency = r.add(Histogram(
            "edgefleet_serving_shadow_duration_seconds",
            "The candidate's infer call on shadow copies.", LATENCY_BUCKETS, MODEL,
        ))
        self.shadow_agreement = r.add(Counter(
            "edgefleet_serving_shadow_agreement_total",
            "Shadow copies whose outputs agree or disagree with the primary's.",
            (*MODEL, "result"),
        ))

        self.sketch_dropped = r.add(Counter(
            "edgefleet_serving_sketch_dropped_total",
            "Answered requests not counted into drift sketches: the sketch queue was full.",
            MODEL,
        ))

        # Drift sketches per (deployment, version) whose control body carried bins
        # (agent/sketches.py); kept, like the counters, after the version retires.
        # Counted on a thread of their own (agent/serving/sketching.py).
        self.sketchers: dict[tuple[str, str], Sketcher] = {}
        self._sketching: SketchQueue | None = None

    def sketch_with(self, deployment: str, version: str, spec: SketchSpec | None) -> None:
        """Count this version's inputs and outputs into SPEC's bins from now on (the
        same spec again keeps the counts)."""
        key = (deployment, version)
        current = self.sketchers.get(key)
        if spec is None:
            self.sketchers.pop(key, None)
        elif current is None or current.spec != spec:
            self.sketchers[key] = Sketcher(spec)
            if self._sketching is None:  # its thread only once a version has bins
                self._sketching = SketchQueue()

    def sketch(self, deployment: str, version: str, inputs: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray]) -> None:
        """Count an answered request (or a shadow copy) into its version's bins, off this
        thread; never blocks (dropped and counted when the queue is full)."""
        sketcher = self.sketchers.get((deployment, version))
        if sketcher is None or self._sketching is None:
            return
        if not self._sketching.offer(sketcher, inputs, outputs):
            self.sketch_dropped.inc(deployment, version)

    def settle_sketches(self, timeout: float = 1.0) -> None:
        """Wait (up to TIMEOUT seconds) until requests answered so far are counted into
        their sketches: `stats` then holds them. Blocks: call it off the event loop."""
        if self._sketching is not None:
            self._sketching.settle(timeout)

    def render(self) -> str:
        return self.registry.render()

    def sketch_counts(self) -> list[dict[str, object]]:
        """The cumulative drift counts of each sketched version that counted something, as
        `stats` has them: [{"model", "version", "sketches": {feature: counts}}]."""
        counted = [(key, s.counts()) for key, s in list(self.sketchers.items())]
        return [{"model": model, "version": version, "sketches": counts}
                for (model, version), counts in sorted(counted) if counts]

    def stats(self) -> list[dict[str, object]]:
        """Counters per model version as JSON, for the agent's telemetry: it
        sends the differences between two reads."""
        requests = self.requests.snapshot()
        failures: dict[tuple[str, ...], float] = {}
        for (model, version, _reason), count in self.failures.snapshot().items():
            failures[(model, version)] = failures.get((model, version), 0.0) + count
        latency = self.latency.snapshot()
        sketches = {key: s.counts() for key, s in list(self.sketchers.items())}
        return [
            {
                "model": model,
                "version": version,
                "requests": int(requests.get((model, version), 0)),
                "failures": int(failures.get((model, version), 0)),
                "latency_buckets": [None if b == float("inf") else b for b in self.latency.bounds],
                "latency_counts": latency.get((model, version), ([], 0.0))[0],
                "latency_sum": latency.get((model, version), ([], 0.0))[1],
                "sketches": sketches.get((model, version), {}),
            }
            # A shadow candidate answers no request of its own: its sketches list it.
            for model, version in sorted(set(requests) | set(failures) | set(latency)
                                         | {key for key, counts in sketches.items() if counts})
        ]


def _loaded(table: ModelTable) -> Iterable[tuple[Labels, float]]:
    for deployment in table.deployments():
        for role, v in deployment.roles():
            yield (deployment.name, v.version, role, v.model.runtime, v.model.device), 1.0
