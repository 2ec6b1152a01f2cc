"""The hub's link to its devices: one MQTT session, the ingest loop and the publisher.

The session (client id `edgefleet-hub`; the managed broker names it by its
login; on PostgreSQL, where replicas may share the broker, its login name and a
shared subscription, see hub/ingest.py `replica_subscriptions`) subscribes to what
devices send;
`hub.ingest` writes that to the database and `hub.desired` publishes their
desired states over the same session. Starting does not wait for the
broker: the session connects in the background and keeps reconnecting, so
a hub whose broker is down still serves its REST API, and catches up once
the broker is back.

"Connected" alone can lie: a session whose subscriptions a broker dropped,
or an ingest loop stuck on the database, looks connected and receives
nothing. So the hub sends itself a heartbeat through the broker every
`heartbeat` seconds (QoS 0, on a topic only the hub may use) and the ingest
loop notes its arrival; `status` says `receiving: false` once none has
arrived for three intervals.

A link that has not been receiving for `_STALE_BEATS` intervals while
connected reconnects: a new connection is the one cure for a broker that
stopped delivering on an open one (Mosquitto 2.0.11 denied everything to a
client whose ACL it lost, see hub/broker_config.py). A frozen broker shows
as `receiving: false` long before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from agent.mqtt import Message, MqttError, Session
from contract import protocol
from hub import desired
from hub.ingest import HEARTBEAT_TOPIC, SUBSCRIPTIONS, Ingest, replica_subscriptions
from hub.keys import KeyRing
from hub.retained import RetainedWatch
from hub.storage.db import Database

log = logging.getLogger("edgefleet.hub.fleet")

CLIENT_ID = "edgefleet-hub"
_MISSED_BEATS = 3  # heartbeats missed before the link counts as not receiving
_STALE_BEATS = 10  # ... and before a connected link reconnects


class FleetLink:
    def __init__(
        self, db: Database, keys: KeyRing, *, mqtt_url: str,
        username: str | None, password: str | None, validity: timedelta,
        heartbeat: float = 10.0, broker_status: Callable[[], dict[str, Any]] | None = None,
        replica: str | None = None,
    ) -> None:
        """BROKER_STATUS describes the managed broker's process; None for an external one.
        REPLICA is this hub's client id when it is one of several on one broker (it then
        shares what devices send with the others, hub/ingest.py); None for a hub alone."""
        if heartbeat <= 0:
            raise ValueError(f"the heartbeat interval must be positive, not {heartbeat}")
        self.mqtt_url = mqtt_url
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        self._started_at = time.monotonic()
        self._broker_status = broker_status
        # The inbox is the ingest loop's largest batch, twice over: reading
        # from the broker pauses only when the loop falls well behind.
        subscriptions, self._heartbeat_topic = (
            (SUBSCRIPTIONS, HEARTBEAT_TOPIC) if replica is None
            else replica_subscriptions(replica))
        # The publisher's batches go out whole, not 20 messages a round trip (the
        # session's default), and the next one while the last waits for its PUBACKs.
        self.session = Session(mqtt_url, client_id=replica or CLIENT_ID, username=username,
                               password=password, subscriptions=subscriptions, inbox_size=1000,
                               max_inflight=desired.IN_FLIGHT)
        self.db = db
        self.watch = RetainedWatch(db, keys)
        self.ingest = Ingest(db, self.session, max_batch=500, watch=self.watch,
                             heartbeat_topic=self._heartbeat_topic, shared=replica is not None)
        self.publisher = desired.Publisher(db, self.session, keys, validity=validity,
                                           watch=self.watch)

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._stop.clear()
        self.session.start()
        self.ingest.start()
        self.publisher.start()
        self._beating = threading.Thread(target=self._beat, name="mqtt-heartbeat", daemon=True)
        self._beating.start()

    def stop(self) -> None:
        """Stop publishing, finish the batch being written, disconnect."""
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        self.publisher.stop()
        self.ingest.stop()
        self.session.close()

    def _beat(self) -> None:
        since = time.monotonic()  # of the connection or the last forced reconnect
        while not self._stop.wait(self._heartbeat):
            if not self.session.connected:
                since = time.monotonic()
                continue
            last = max(since, self.ingest.heartbeat_at or since)
            if time.monotonic() - last >= _STALE_BEATS * self._heartbeat:
                self.session.reconnect()
                since = time.monotonic()
                continue
            try:
                self.session.publish(self._heartbeat_topic, b"", qos=0, timeout=self._heartbeat)
            except MqttError as exc:
                log.debug("heartbeat not sent: %s", exc)

    def receiving(self) -> bool:
        """Has a heartbeat come back within the last three intervals (or is the
        link younger than that)?"""
        limit = _MISSED_BEATS * self._heartbeat
        last = self.ingest.heartbeat_at
        now = time.monotonic()
        if last is None:
            return now - self._started_at < limit
        return now - last < limit

    def notify(self, device_ids: Iterable[str]) -> None:
        """These devices' desired state changed and is committed: publish it."""
        self.publisher.notify(device_ids)

    def send_command(self, device_id: str, payload: bytes) -> None:
        """Publish a signed command (QoS 1, not retained: a command is for now, and one
        queued for an offline device expires); MqttError if the broker does not take it."""
        self.session.publish(protocol.commands_topic(device_id), payload, timeout=5)

    def forget(self, device_id: str) -> None:
        """Clear a deleted device's retained messages (its desired state and
        status) from the broker; best effort, a broker not reachable keeps them."""
        try:
            self.session.publish_many([
                Message(protocol.desired_topic(device_id), b"", retain=True),
                Message(protocol.status_topic(device_id), b"", retain=True)], timeout=5)
        except MqttError as exc:
            log.warning("could not clear the retained messages of deleted device %s: %s",
                        device_id, exc)

    def status(self) -> dict[str, Any]:
        last = self.ingest.heartbeat_at
        return {
            "mqtt_url": self.mqtt_url,
            "connected": self.session.connected,
            "receiving": self.receiving(),
            "last_heartbeat_seconds_ago": None if last is None
            else round(time.monotonic() - last, 1),
            "broker": self._broker_status() if self._broker_status else {"managed": False},
            "ingest": self.ingest.stats(),
            "desired": {**self.publisher.stats(), **self.watch.stats()},
        }
