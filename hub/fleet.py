"""The hub's link to its devices: one MQTT session, the ingest loop and the publisher.

The session (client id `edgefleet-hub`) subscribes to what devices send;
`hub.ingest` writes that to the database and `hub.desired` publishes their
desired states over the same session. Starting does not wait for the
broker: the session connects in the background and keeps reconnecting, so
a hub whose broker is down still serves its REST API, and catches up once
the broker is back.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.mqtt import Session
from hub import desired
from hub.ingest import SUBSCRIPTIONS, Ingest
from hub.storage.db import Database

CLIENT_ID = "edgefleet-hub"


class FleetLink:
    def __init__(
        self, db: Database, key: ec.EllipticCurvePrivateKey, *, mqtt_url: str,
        username: str | None, password: str | None, validity: timedelta,
        broker_keeps_retained: bool,
    ) -> None:
        """BROKER_KEEPS_RETAINED is false for the embedded broker, which starts
        empty with the hub: then every device's desired state is published again."""
        self.mqtt_url = mqtt_url
        self._broker_keeps_retained = broker_keeps_retained
        # The inbox is the ingest loop's largest batch, twice over: reading
        # from the broker pauses only when the loop falls well behind.
        self.session = Session(mqtt_url, client_id=CLIENT_ID, username=username,
                               password=password, subscriptions=SUBSCRIPTIONS, inbox_size=1000)
        self.db = db
        self.ingest = Ingest(db, self.session, max_batch=500)
        self.publisher = desired.Publisher(db, self.session, key, validity=validity)

    def start(self) -> None:
        if not self._broker_keeps_retained:
            desired.forget_published(self.db)
        self.session.start()
        self.ingest.start()
        self.publisher.start()

    def stop(self) -> None:
        """Stop publishing, finish the batch being written, disconnect."""
        self.publisher.stop()
        self.ingest.stop()
        self.session.close()

    def notify(self, device_ids: Iterable[str]) -> None:
        """These devices' desired state changed and is committed: publish it."""
        self.publisher.notify(device_ids)

    def status(self) -> dict[str, Any]:
        return {
            "mqtt_url": self.mqtt_url,
            "connected": self.session.connected,
            "ingest": self.ingest.stats(),
            "desired": self.publisher.stats(),
        }
