"""The hub's own metrics, in the Prometheus text format (hub/prometheus.py).

`HubMetrics` counts the API's requests as they happen (by method, route template and
status, with latency histograms per route); everything else is read when scraped: the
ingest loop's counters, the broker link (hub/fleet.py's status, read only), the
retention thread, devices by status, rollouts by state, and the sizes of the database
and the blob store. Served at `GET /metrics` to any API token, and without one on
`--metrics-port` (hub/api/metrics.py). examples/grafana/ has a dashboard of them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from hub.prometheus import Exposition, Histogram, HistogramSnapshot
from hub.webhooks import DeliveryState

if TYPE_CHECKING:
    from hub.api.state import HubState

LATENCY_BOUNDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BOUNDS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
BLOB_USAGE_SECONDS: Final = 60.0  # walking the blob store is cached this long
UNMATCHED: Final = "<unmatched>"  # requests no route took: their paths would be unbounded


class HubMetrics:
    """What is counted as it happens, shared by the request middleware and the scrape."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._latency: dict[tuple[str, str], Histogram] = {}
        self._blob_usage: tuple[float, tuple[int, int]] | None = None

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[method, route, str(status)] += 1
            histogram = self._latency.get((method, route))
            if histogram is None:
                histogram = self._latency[method, route] = Histogram(LATENCY_BOUNDS)
        histogram.observe(seconds)

    def blob_usage(self, state: HubState) -> tuple[int, int]:
        now = self._clock()
        cached = self._blob_usage
        if cached is None or now - cached[0] > BLOB_USAGE_SECONDS:
            cached = self._blob_usage = (now, state.blobs.usage())
        return cached[1]

    def render(self, state: HubState) -> str:
        out = Exposition()
        with self._lock:
            requests = dict(self._requests)
            latency = dict(self._latency)
        out.family("edgefleet_http_requests", "counter",
                   "REST API requests answered, by method, route template and status.")
        for (method, route, status), n in sorted(requests.items()):
            out.sample(n, {"method": method, "route": route, "status": status})
        out.family("edgefleet_http_request_duration_seconds", "histogram",
                   "Time from a request's arrival to its response's first byte, by route.")
        for (method, route), histogram in sorted(latency.items()):
            out.histogram(histogram.snapshot(), {"method": method, "route": route})
        _ingest(out, state)
        _fleet(out, state)
        _retention(out, state)
        _webhooks(out, state)
        _database(out, state)
        blobs, size = self.blob_usage(state)
        out.family("edgefleet_blob_store_bytes", "gauge", "Bytes in the blob store.")
        out.sample(size)
        out.family("edgefleet_blob_store_blobs", "gauge", "Blobs in the blob store.")
        out.sample(blobs)
        return out.text()


def _ingest(out: Exposition, state: HubState) -> None:
    totals = state.fleet.ingest.totals() if state.fleet is not None else None
    out.family("edgefleet_ingest_messages", "counter",
               "MQTT messages from devices written to the database, by kind.")
    for kind, n in sorted(totals.ingested.items()) if totals else ():
        out.sample(n, {"kind": kind})
    out.family("edgefleet_ingest_dropped", "counter",
               "MQTT messages dropped (logged), by kind and reason.")
    for (kind, reason), n in sorted(totals.dropped.items()) if totals else ():
        out.sample(n, {"kind": kind, "reason": reason})
    out.family("edgefleet_ingest_points", "counter", "Telemetry points stored.")
    out.sample(totals.points if totals else 0)
    out.family("edgefleet_ingest_duplicate_points", "counter",
               "Telemetry points received again (resent after a reconnect) and ignored.")
    out.sample(totals.duplicate_points if totals else 0)
    out.family("edgefleet_ingest_sketches", "counter",
               "Drift sketches (one feature of one point) stored.")
    out.sample(totals.sketches if totals else 0)
    out.family("edgefleet_ingest_sketches_dropped", "counter",
               "Drift sketches dropped (logged): malformed, no_baseline or unknown_version.")
    for reason, n in sorted(totals.sketches_dropped.items()) if totals else ():
        out.sample(n, {"reason": reason})
    out.family("edgefleet_ingest_batch_messages", "histogram",
               "Messages per ingest batch (one database transaction).")
    sizes = totals.batch_sizes if totals else Counter()
    counts = [0] * (len(BATCH_BOUNDS) + 1)
    for size, n in sizes.items():
        counts[next((i for i, b in enumerate(BATCH_BOUNDS) if size <= b), len(BATCH_BOUNDS))] += n
    out.histogram(HistogramSnapshot(BATCH_BOUNDS, counts, sum(s * n for s, n in sizes.items())))
    out.family("edgefleet_ingest_lag_seconds", "gauge",
               "The hub's clock minus the newest point's time in the last telemetry batch "
               "(device clock skew included).")
    if totals is not None and totals.lag_seconds is not None:
        out.sample(totals.lag_seconds)


def _fleet(out: Exposition, state: HubState) -> None:
    status = state.fleet.status() if state.fleet is not None else None
    out.family("edgefleet_broker_connected", "gauge", "1 while the hub's MQTT session is up.")
    out.sample(1 if status and status["connected"] else 0)
    out.family("edgefleet_broker_receiving", "gauge",
               "1 while the hub's heartbeats come back through the broker.")
    out.sample(1 if status and status["receiving"] else 0)
    out.family("edgefleet_broker_heartbeat_age_seconds", "gauge",
               "Seconds since the hub's last heartbeat came back through the broker.")
    if status and status["last_heartbeat_seconds_ago"] is not None:
        out.sample(status["last_heartbeat_seconds_ago"])
    broker = status["broker"] if status else {"managed": False}
    out.family("edgefleet_broker_process_running", "gauge",
               "1 while the managed Mosquitto runs (absent with an external broker).")
    if broker.get("managed"):
        out.sample(1 if broker.get("running") else 0)
    out.family("edgefleet_broker_restarts", "counter", "Restarts of the managed Mosquitto.")
    if broker.get("managed"):
        out.sample(broker.get("restarts", 0))
    out.family("edgefleet_desired_published", "counter", "Signed desired states published.")
    desired = status["desired"] if status else {}
    out.sample(desired.get("published", 0))
    out.family("edgefleet_desired_pending", "gauge", "Devices whose desired state waits to "
               "be published.")
    out.sample(desired.get("pending", 0))
    out.family("edgefleet_desired_failures", "counter", "Desired-state publishes that failed.")
    out.sample(desired.get("failures", 0))


def _retention(out: Exposition, state: HubState) -> None:
    stats = state.retention.stats() if state.retention is not None else None
    out.family("edgefleet_retention_rolled_up_points", "counter",
               "Raw telemetry points rolled up into minute and hour rollups.")
    out.sample(stats["rolled_up"] if stats else 0)
    out.family("edgefleet_retention_deleted_rows", "counter",
               "Telemetry rows deleted past retention, by resolution.")
    for resolution, n in sorted((stats or {}).get("deleted", {}).items()):
        out.sample(n, {"resolution": resolution})
    out.family("edgefleet_retention_pass_seconds", "gauge",
               "How long the last retention pass (roll up, then delete) took.")
    if stats and stats["last_pass_seconds"] is not None:
        out.sample(stats["last_pass_seconds"])
    out.family("edgefleet_retention_failures", "counter",
               "Retention passes that failed (retried next interval).")
    out.sample(stats["failures"] if stats else 0)


def _webhooks(out: Exposition, state: HubState) -> None:
    stats = state.webhooks.stats() if state.webhooks is not None else {}
    out.family("edgefleet_events_deleted", "counter", "Events deleted past --events-days.")
    out.sample(state.retention.stats()["events_deleted"] if state.retention is not None else 0)
    out.family("edgefleet_webhook_attempts", "counter",
               "Webhook delivery attempts, by what they came to (failed: to be retried).")
    for outcome in ("delivered", "failed_attempts", "dead"):
        out.sample(stats.get(outcome, 0), {"outcome": outcome.removesuffix("_attempts")})
    out.family("edgefleet_webhook_dispatch_failures", "counter",
               "Rounds of the webhook dispatcher that failed (a busy database; retried).")
    out.sample(stats.get("dispatch_failures", 0))
    out.family("edgefleet_webhook_deliveries", "gauge", "Webhook deliveries, by state.")
    counts = {r["state"]: r["n"] for r in state.db.query(
        "SELECT state, COUNT(*) AS n FROM webhook_deliveries GROUP BY state")}
    for delivery_state in DeliveryState:
        out.sample(counts.get(delivery_state.value, 0), {"state": delivery_state.value})


def _database(out: Exposition, state: HubState) -> None:
    db = state.db
    out.family("edgefleet_devices", "gauge", "Enrolled devices, by status.")
    for row in db.query("SELECT COALESCE(status, 'unknown') AS status, COUNT(*) AS n"
                        " FROM devices GROUP BY 1 ORDER BY 1"):
        out.sample(row["n"], {"status": row["status"]})
    out.family("edgefleet_devices_marked_offline", "counter",
               "Devices the hub marked offline for their silence (no will from the broker).")
    out.sample(state.liveness.marked if state.liveness is not None else 0)
    out.family("edgefleet_rollouts", "gauge", "Rollouts, by state.")
    for row in db.query("SELECT state, COUNT(*) AS n FROM rollouts GROUP BY state"
                        " ORDER BY state"):
        out.sample(row["n"], {"state": row["state"]})
    out.family("edgefleet_database_bytes", "gauge",
               "Size of the hub's database, by file: SQLite's main file (db) and its WAL"
               " (wal); on PostgreSQL its tables with their indexes (db).")
    for name, size in db.sizes().items():
        out.sample(size, {"file": name})
