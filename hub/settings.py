"""The hub's settings, each declared once with its help text.

`edgefleet hub serve` builds its options from the fields of HubSettings, so
the help text, the defaults and the docs all come from this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from hub.retention import RetentionPolicy
from hub.storage.s3 import S3Location
from hub.webhooks import DeliveryPolicy


def _setting(default: object, help: str) -> object:
    return field(default=default, metadata={"help": help})


# Addresses that mean "every interface" to a listener and nothing to a device.
UNSPECIFIED = frozenset({"0.0.0.0", "::", ""})


def _check_public(url: str | None, flag: str, schemes: tuple[str, ...], example: str) -> None:
    """URL must be one a device can reach: its scheme, a host that is no wildcard, a port."""
    if url is None:
        return
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (parts.scheme not in schemes or not parts.hostname or parts.hostname in UNSPECIFIED
            or port is None or parts.path not in ("", "/") or parts.query):
        raise ValueError(f"{flag} must be an address devices reach, like {example} (no "
                         f"0.0.0.0, no path), got {url!r}")


@dataclass(frozen=True)
class HubSettings:
    data_dir: Path = _setting(
        Path("./edgefleet-data"), "Where the hub keeps its database, blobs and keys."
    )  # type: ignore[assignment]
    database_url: str | None = _setting(
        None, "The hub's database on a PostgreSQL server, for large fleets: "
        "postgresql://USER@HOST:PORT/DATABASE (better set EDGEFLEET_DATABASE_URL if it "
        "holds a password, which `ps` would show) [default: SQLite, hub.db in --data-dir]."
    )  # type: ignore[assignment]
    shared_dir: Path | None = _setting(
        None, "Where the hub keeps what its replicas share: blobs/ (model files, package "
        "layers) and keys/ (the signing key devices trust). Hub replicas on one "
        "--database-url give each its own --data-dir and all the same --shared-dir, a "
        "directory they all reach [default: --data-dir]."
    )  # type: ignore[assignment]
    blob_url: str | None = _setting(
        None, "Keep blobs in an S3-compatible bucket instead, s3://BUCKET[/PREFIX] (hub "
        "replicas then need no shared blobs/ directory); credentials from AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY. A local cache in --data-dir serves downloads."
    )  # type: ignore[assignment]
    s3_endpoint: str | None = _setting(
        None, "The object store of --blob-url, http(s)://HOST[:PORT] [default: AWS's "
        "https://s3.REGION.amazonaws.com]."
    )  # type: ignore[assignment]
    s3_region: str = _setting(
        "us-east-1", "The region --blob-url's requests are signed for."
    )  # type: ignore[assignment]
    blob_cache_mb: int = _setting(
        10240, "Most MB of blobs the local cache of a --blob-url store keeps; the least "
        "recently used copies go first (every one is in the bucket)."
    )  # type: ignore[assignment]
    host: str = _setting(
        "127.0.0.1", "Address the REST API and the managed broker listen on."
    )  # type: ignore[assignment]
    port: int = _setting(8080, "Port of the REST API (0 picks a free one).")  # type: ignore[assignment]
    mqtt_port: int = _setting(
        1883, "Port of the managed MQTT broker, Mosquitto (0 picks a free one)."
    )  # type: ignore[assignment]
    public_url: str | None = _setting(
        None, "The hub's address as devices and users reach it, e.g. http://hub.lan:8080 "
        "[default: --host and --port; this machine's name for --host 0.0.0.0]."
    )  # type: ignore[assignment]
    mqtt_public_url: str | None = _setting(
        None, "The broker address handed to devices at enrollment, e.g. mqtt://hub.lan:1883 "
        "[default: --public-url's host with the broker's port]."
    )  # type: ignore[assignment]
    mqtt_url: str | None = _setting(
        None, "Use this broker (mqtt://HOST:PORT) instead of starting and managing "
        "Mosquitto; its operator sets up logins and ACLs (docs/architecture.md)."
    )  # type: ignore[assignment]
    mqtt_username: str | None = _setting(
        None, "The hub's user on the --mqtt-url broker (it must be allowed every "
        "edgefleet/v1/# topic; see docs/architecture.md)."
    )  # type: ignore[assignment]
    mqtt_password: str | None = _setting(
        None, "Password of --mqtt-username; better set EDGEFLEET_MQTT_PASSWORD, which "
        "`ps` does not show."
    )  # type: ignore[assignment]
    mosquitto: str | None = _setting(
        None, "The Mosquitto program the hub runs as its broker (default: `mosquitto` "
        "on PATH or in /usr/sbin)."
    )  # type: ignore[assignment]
    mqtt_max_queued_messages: int = _setting(
        100_000, "Messages the managed broker queues per client beyond those in flight "
        "(the hub during a burst, a device while offline); more are dropped, so size "
        "it for the fleet's bursts."
    )  # type: ignore[assignment]
    heartbeat_seconds: int = _setting(
        10, "How often the hub sends itself a message through the broker; GET "
        "/fleet/status says receiving: false after three are missed."
    )  # type: ignore[assignment]
    drift_interval_seconds: int = _setting(
        60, "How often the hub computes the drift of every version with a baseline "
        "(hub/drift.py); `edgefleet model drift` computes it on demand too."
    )  # type: ignore[assignment]
    insecure: bool = _setting(
        False, "Plain HTTP and MQTT, no certificates: anyone on the network reads and "
        "changes everything (tokens, models, desired states). For tests on one host only."
    )  # type: ignore[assignment]
    tls_cert: str | None = _setting(
        None, "Serve this PEM certificate (then its issuers; clients pin and trust the last "
        "one in the file) instead of one from the hub's own CA in DATA/tls."
    )  # type: ignore[assignment]
    tls_key: str | None = _setting(
        None, "The private key of --tls-cert (PEM)."
    )  # type: ignore[assignment]
    desired_validity_days: int = _setting(
        30, "Days a signed desired state stays valid; agents refuse expired ones, so "
        "devices freeze on what they run if the hub is gone that long."
    )  # type: ignore[assignment]
    telemetry_raw_hours: int = _setting(
        48, "Hours raw telemetry points are kept; then only their per-minute and per-hour "
        "rollups (longer windows are read from those)."
    )  # type: ignore[assignment]
    telemetry_minute_days: int = _setting(
        7, "Days per-minute telemetry rollups are kept (the largest of the three: about "
        "13 GB for 1,000 devices reporting every 10 s; bench/retention.py)."
    )  # type: ignore[assignment]
    telemetry_hour_days: int = _setting(
        400, "Days per-hour telemetry rollups are kept."
    )  # type: ignore[assignment]
    events_days: int = _setting(
        30, "Days events (GET /api/v1/events, webhooks) are kept, with their webhook "
        "deliveries and dead letters."
    )  # type: ignore[assignment]
    webhook_attempts: int = _setting(
        10, "Attempts to deliver an event to a webhook before it becomes a dead letter."
    )  # type: ignore[assignment]
    webhook_retry_seconds: float = _setting(
        5.0, "Wait before a webhook's first retry; doubled per attempt (with jitter) up to "
        "an hour."
    )  # type: ignore[assignment]
    webhook_timeout_seconds: float = _setting(
        10.0, "Longest one webhook request may take, connecting and answering; longer "
        "counts as a failed attempt."
    )  # type: ignore[assignment]
    device_offline_heartbeats: int = _setting(
        6, "A device the hub has heard nothing from for this many --heartbeat-seconds "
        "(agents send telemetry every 10 s by default) counts as offline, even if the "
        "broker never said so."
    )  # type: ignore[assignment]
    metrics_port: int = _setting(
        0, "Also serve the hub's Prometheus metrics, without authentication, on this port "
        "of --host (0: none; /metrics on --port always answers with any API token)."
    )  # type: ignore[assignment]
    max_request_bytes: int = _setting(
        4 << 20, "Largest request body the REST API reads (JSON bodies, OCI manifests); "
        "larger ones are answered 413 before they are read."
    )  # type: ignore[assignment]
    max_upload_bytes: int = _setting(
        64 << 30, "Largest file one upload may send (POST /api/v1/blobs, one request of "
        "an OCI blob upload); the upload stops with 413 where it passes this."
    )  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.shared_dir is not None:
            object.__setattr__(self, "shared_dir", Path(self.shared_dir))
        _check_public(self.public_url, "--public-url", ("http", "https"), "http://hub.lan:8080")
        if self.database_url is not None and urlsplit(self.database_url).scheme not in (
                "postgresql", "postgres"):
            raise ValueError("--database-url must be a PostgreSQL URL, like "
                             "postgresql://edgefleet@db.lan:5432/edgefleet")
        _check_public(self.mqtt_public_url, "--mqtt-public-url", ("mqtt", "mqtts"),
                      "mqtt://hub.lan:1883")
        if self.mqtt_url is not None:
            parts = urlsplit(self.mqtt_url)
            if parts.scheme != "mqtt" or not parts.hostname:
                raise ValueError(
                    f"--mqtt-url must look like mqtt://HOST:PORT, got {self.mqtt_url!r}"
                )
            if self.mosquitto is not None:
                raise ValueError("--mosquitto is for the broker the hub runs; --mqtt-url names "
                                 "a broker you run")
        elif self.mqtt_username is not None or self.mqtt_password is not None:
            raise ValueError("--mqtt-username and --mqtt-password are for a --mqtt-url broker; "
                             "the managed broker uses the hub's own secret in the data dir")
        if self.mqtt_password is not None and self.mqtt_username is None:
            raise ValueError("--mqtt-password needs --mqtt-username")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.insecure and self.tls_cert:
            raise ValueError("--insecure serves plain text: --tls-cert and --tls-key are "
                             "for TLS")
        if not 100 <= self.mqtt_max_queued_messages <= 100_000_000:
            raise ValueError(f"--mqtt-max-queued-messages must be 100-100000000, got "
                             f"{self.mqtt_max_queued_messages}")
        if not 1 <= self.heartbeat_seconds <= 3600:
            raise ValueError(f"--heartbeat-seconds must be 1-3600, got {self.heartbeat_seconds}")
        if not 1 <= self.drift_interval_seconds <= 86400:
            raise ValueError(f"--drift-interval-seconds must be 1-86400, got "
                             f"{self.drift_interval_seconds}")
        if not 64 << 10 <= self.max_request_bytes <= 1 << 30:
            raise ValueError(f"--max-request-bytes must be 65536-1073741824, got "
                             f"{self.max_request_bytes}")
        if not 1 << 20 <= self.max_upload_bytes <= 1 << 50:
            raise ValueError(f"--max-upload-bytes must be 1048576-{1 << 50}, got "
                             f"{self.max_upload_bytes}")
        if not 1 <= self.desired_validity_days <= 3650:
            raise ValueError(f"--desired-validity-days must be 1-3650, got "
                             f"{self.desired_validity_days}")
        if not 2 <= self.device_offline_heartbeats <= 1000:
            raise ValueError(f"--device-offline-heartbeats must be 2-1000, got "
                             f"{self.device_offline_heartbeats}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be 0-65535, got {self.metrics_port}")
        if self.blob_url is not None:
            _ = self.blob_location  # checks --blob-url and --s3-endpoint
        elif self.s3_endpoint is not None:
            raise ValueError("--s3-endpoint is the object store of --blob-url; give both")
        if not 1 <= self.blob_cache_mb <= 1 << 30:
            raise ValueError(f"--blob-cache-mb must be 1-{1 << 30}, got {self.blob_cache_mb}")
        _ = self.retention  # building the policy checks the retention settings
        _ = self.webhook_policy  # and this the webhook settings

    @property
    def retention(self) -> RetentionPolicy:
        try:
            return RetentionPolicy(raw=timedelta(hours=self.telemetry_raw_hours),
                                   minute=timedelta(days=self.telemetry_minute_days),
                                   hour=timedelta(days=self.telemetry_hour_days),
                                   events=timedelta(days=self.events_days))
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"--telemetry-raw-hours/--telemetry-minute-days/"
                             f"--telemetry-hour-days/--events-days: {exc}") from None

    @property
    def webhook_policy(self) -> DeliveryPolicy:
        try:
            return DeliveryPolicy(attempts=self.webhook_attempts,
                                  initial=self.webhook_retry_seconds,
                                  timeout=self.webhook_timeout_seconds)
        except ValueError as exc:
            raise ValueError(f"--webhook-attempts/--webhook-retry-seconds/"
                             f"--webhook-timeout-seconds: {exc}") from None

    @property
    def database(self) -> Path | str:
        """--database-url, or else the SQLite file in the data dir."""
        return self.database_url or self.data_dir / "hub.db"

    @property
    def blob_dir(self) -> Path:
        """The blobs, or with --blob-url this hub's cache of them."""
        if self.blob_url is not None:
            return self.data_dir / "blob-cache"
        return (self.shared_dir or self.data_dir) / "blobs"

    @property
    def blob_location(self) -> S3Location | None:
        if self.blob_url is None:
            return None
        endpoint = self.s3_endpoint or f"https://s3.{self.s3_region}.amazonaws.com"
        return S3Location.parse(self.blob_url, endpoint, self.s3_region)

    @property
    def signing_key_path(self) -> Path:
        return (self.shared_dir or self.data_dir) / "keys" / "hub-signing.key"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def broker_dir(self) -> Path:
        """The managed broker's configuration, logins and saved state."""
        return self.data_dir / "broker"

    @property
    def tls_dir(self) -> Path:
        """The hub's CA and the certificates it made for itself."""
        return self.data_dir / "tls"

    @property
    def mqtt_secret_path(self) -> Path:
        """The hub's password on the managed broker (--insecure: with TLS its certificate)."""
        return self.data_dir / "mqtt-hub-password"
