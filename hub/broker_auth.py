"""The embedded broker (amqtt) and who may use it: logins, topic ACLs, retained messages.

Two identities exist:

- the hub itself: user `edgefleet-hub`, whose password is a secret made on
  the hub's first start (`DATA/mqtt-hub-password`, mode 0600). It may do
  anything.
- a device: user = its device id, password = its device token from
  enrollment, checked against the hash in `devices.token_hash`. Its client id
  must be its device id, its last will may only go to its own status topic,
  and it may publish only to its own reported, telemetry, status and command
  result topics and subscribe only to its own desired and commands topics.

`device_may` is that policy; the amqtt plugins below apply it to the
embedded broker. An external broker (Mosquitto, EMQX) is configured by its
operator to the same rules; docs/architecture.md shows how.

Two amqtt 0.12 behaviours matter here. On every connect it sends the new
client the retained messages matching every filter *any* client subscribed
to, bypassing the ACL; `EmbeddedBroker` sends only those of the client's own
subscriptions. And it checks credentials only after taking over a persistent
session with the same client id, so a client presenting someone else's
client id is refused but still disconnects that client once (which then
reconnects). Mosquitto authenticates first.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from contract.files import write_secret
from contract.protocol import ProtocolError, parse_topic, status_topic
from hub.storage.db import Database
from hub.tokens import hash_secret

log = logging.getLogger("edgefleet.hub.broker")

HUB_USERNAME = "edgefleet-hub"
_DEVICE_PUBLISHES = frozenset({"reported", "telemetry", "status", "command_result"})
_DEVICE_SUBSCRIBES = frozenset({"desired", "commands"})


def hub_secret(path: Path) -> str:
    """The hub's MQTT password for the embedded broker: made once, mode 0600 from the start."""
    write_secret(path, secrets.token_urlsafe(32) + "\n", replace=False)
    return path.read_text().strip()


def device_may(device_id: str, action: Literal["publish", "subscribe"], topic: str) -> bool:
    """May DEVICE_ID publish to TOPIC, or subscribe to (and receive) it?
    Wildcard filters are no edgefleet topic, so devices cannot subscribe to them."""
    try:
        owner, kind = parse_topic(topic)
    except ProtocolError:
        return False
    allowed = _DEVICE_PUBLISHES if action == "publish" else _DEVICE_SUBSCRIBES
    return owner == device_id and kind in allowed


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


class DeviceAuthentication(BaseAuthPlugin):
    """amqtt plugin: the hub by its secret, devices by their token."""

    @dataclass
    class Config:
        db_path: str
        hub_password_sha256: str

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._db = Database(Path(self.config.db_path))

    async def authenticate(self, *, session: Session) -> bool:
        username, password = _text(session.username), _text(session.password)
        if username == HUB_USERNAME:
            ok = hmac.compare_digest(hash_secret(password), self.config.hub_password_sha256)
            return ok or self._refuse(session, "wrong password for the hub's user")
        try:
            own_status = status_topic(username)
        except ProtocolError:
            return self._refuse(session, "the user name is no device id")
        if session.client_id != username:
            return self._refuse(session, f"client id {session.client_id!r} is not the device id")
        if session.will_flag and _text(session.will_topic) != own_status:
            return self._refuse(session, f"last will on {_text(session.will_topic)!r}, not on "
                                "the device's own status topic")
        # The database lookup runs in a thread: the broker shares its loop with the REST API.
        known = await asyncio.to_thread(
            self._db.query_one, "SELECT 1 FROM devices WHERE id = ? AND token_hash = ?",
            (username, hash_secret(password)))
        return known is not None or self._refuse(session, "unknown device or wrong device token")

    def _refuse(self, session: Session, reason: str) -> Literal[False]:
        log.warning("MQTT login refused for client %r (user %r): %s", session.client_id,
                    _text(session.username)[:128], reason)
        return False


class TopicAccess(BaseTopicPlugin):
    """amqtt plugin: the per-device topic ACL; the hub may use every topic."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or topic is None:
            return False
        username = _text(session.username)
        if username == HUB_USERNAME:
            return True
        if device_may(username, "publish" if action == Action.PUBLISH else "subscribe", topic):
            return True
        if action != Action.RECEIVE:  # receiving is checked per message; subscribing was refused
            log.warning("MQTT %s on %r refused for device %r", action, topic, username[:128])
        return False


class EmbeddedBroker(Broker):
    """amqtt's broker, sending retained messages only for the client's own subscriptions."""

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def embedded_broker(mqtt_url: str, *, db_path: Path, hub_password: str) -> Broker:
    """The broker listening on MQTT_URL's host and port, with these plugins and no others."""
    return EmbeddedBroker({
        "listeners": {"default": {"type": "tcp", "bind": mqtt_url.removeprefix("mqtt://")}},
        "plugins": {
            f"{__name__}.DeviceAuthentication": {
                "db_path": str(db_path), "hub_password_sha256": hash_secret(hub_password),
            },
            f"{__name__}.TopicAccess": {},
        },
    })
