"""The hub's settings, each declared once with its help text.

`edgefleet hub serve` builds its options from the fields of HubSettings, so
the help text, the defaults and the docs all come from this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


def _setting(default: object, help: str) -> object:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class HubSettings:
    data_dir: Path = _setting(
        Path("./edgefleet-data"), "Where the hub keeps its database, blobs and keys."
    )  # type: ignore[assignment]
    host: str = _setting(
        "127.0.0.1", "Address the REST API and the managed broker listen on."
    )  # type: ignore[assignment]
    port: int = _setting(8080, "Port of the REST API (0 picks a free one).")  # type: ignore[assignment]
    mqtt_port: int = _setting(
        1883, "Port of the managed MQTT broker, Mosquitto (0 picks a free one)."
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
    public_host: str | None = _setting(
        None, "The name or address devices reach the hub by: put in the certificate the hub "
        "makes (localhost, 127.0.0.1 and --host are always in it) and in the broker URL "
        "enrollment answers."
    )  # type: ignore[assignment]
    desired_validity_days: int = _setting(
        30, "Days a signed desired state stays valid; agents refuse expired ones, so "
        "devices freeze on what they run if the hub is gone that long."
    )  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
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
        if self.insecure and (self.tls_cert or self.public_host):
            raise ValueError("--insecure serves plain text: --tls-cert, --tls-key and "
                             "--public-host are for TLS")
        if not 100 <= self.mqtt_max_queued_messages <= 100_000_000:
            raise ValueError(f"--mqtt-max-queued-messages must be 100-100000000, got "
                             f"{self.mqtt_max_queued_messages}")
        if not 1 <= self.heartbeat_seconds <= 3600:
            raise ValueError(f"--heartbeat-seconds must be 1-3600, got {self.heartbeat_seconds}")
        if not 1 <= self.desired_validity_days <= 3650:
            raise ValueError(f"--desired-validity-days must be 1-3650, got "
                             f"{self.desired_validity_days}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hub.db"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def signing_key_path(self) -> Path:
        return self.data_dir / "keys" / "hub-signing.key"

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
