"""What the REST handlers share: the database, the blob store and the settings.

One HubState is built by the server and hung on `app.state.hub`; handlers get
it through the `hub_state` dependency, never from a module global.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Request

from hub.keys import KeyRing
from hub.metrics import HubMetrics
from hub.oci_registry import Uploads
from hub.rollout_engine import RolloutEngine
from hub.settings import HubSettings
from hub.storage.blobs import BlobStore
from hub.storage.db import Database

if TYPE_CHECKING:
    from hub.broker_certs import BrokerCertificates
    from hub.broker_logins import BrokerLogins
    from hub.fleet import FleetLink
    from hub.liveness import Liveness
    from hub.retention import Retention
    from hub.webhooks import Dispatcher


@dataclass
class HubState:
    settings: HubSettings
    db: Database
    blobs: BlobStore
    keys: KeyRing  # the signing key: in memory and its file, never logged, never in the db
    mqtt_url: str
    uploads: Uploads
    fleet: FleetLink | None = None  # the MQTT link, once the server has started it
    rollouts: RolloutEngine | None = None  # the rollout engine, once the server has started it
    broker: BrokerLogins | None = None  # device logins on the managed broker (None: external)
    retention: Retention | None = None  # telemetry rollups and deletion, once started
    liveness: Liveness | None = None  # devices silent too long marked offline, once started
    metrics: HubMetrics = field(default_factory=HubMetrics)  # counted as requests happen
    # Device certificates, when the managed broker speaks TLS (then `broker` is None).
    certificates: BrokerCertificates | None = None
    trust_pem: str | None = None  # what clients pin and verify the hub with (None: --insecure)
    webhooks: Dispatcher | None = None  # webhook deliveries, once started
    # True once the server is stopping: long answers (the event stream) end then.
    stopping: Callable[[], bool] = lambda: False


    @property
    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        return self.keys.key

    @property
    def signing_public_key(self) -> str:
        return self.keys.public_pem


def hub_state(request: Request) -> HubState:
    return request.app.state.hub
