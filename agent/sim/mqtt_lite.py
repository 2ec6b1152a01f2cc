"""A small asyncio MQTT 3.1.1 client: thousands of broker sessions on one event loop.

The agent's `agent.mqtt.Session` runs a thread per connection (paho's
model), which is right for one device and wrong for ten thousand in one
process. Here a connection is an `asyncio.Protocol`: bytes arrive in
`data_received`, every waiting caller holds a future, the keepalive is a
timer handle, and an idle connection costs no task and no thread.

What it speaks (MQTT 3.1.1), in the packets agent/mqtt_wire.py builds and reads
for the agent's own session too: CONNECT (client id, will, username/password,
clean_session, keepalive) and CONNACK; SUBSCRIBE and SUBACK; PUBLISH at QoS 0
and 1 in both directions, with PUBACK and the retain flag; PINGREQ and
PINGRESP; DISCONNECT; over TCP or TLS. Not QoS 2, UNSUBSCRIBE or MQTT 5: the
simulator needs none of them.

One `Client` is one network connection, used once: reconnecting means a new
`Client` (the caller owns the backoff; agent.mqtt.BackoffPolicy). Delivery:

- `publish` at QoS 1 waits for the PUBACK. If the connection drops first it
  raises `ConnectionLost`, and the caller sends again on its next
  connection; the protocol's generations and sequence numbers make a
  repeat harmless. (The spec's resend-with-DUP on reconnect would need the
  state to outlive the connection; the caller already keeps it.)
- An incoming QoS 1 message is acknowledged once `on_message` has returned,
  so `on_message` must only record it (append to a queue), never wait.

Errors reuse `agent.mqtt`'s types, so one `except MqttError` covers both
clients; every wait has a timeout that raises `MqttTimeout`.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from agent import mqtt_wire as wire
from agent.mqtt import Message, MqttError, MqttTimeout


class ConnectionRefused(MqttError):
    """The broker answered CONNECT with a non-zero return code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"connection refused ({code}): {wire.reason_text(code, False)}")
        self.code = code


class ConnectionLost(MqttError):
    """The connection closed while something waited on it."""


class ProtocolViolation(MqttError):
    """The broker sent something MQTT 3.1.1 does not allow; the connection is closed."""


def parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} is not mqtt://HOST[:PORT] or mqtts://...")
    return parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)


# --- the connection -----------------------------------------------------------


@dataclass(frozen=True)
class ConnectOptions:
    """What CONNECT says; the same for every connection of one device."""

    client_id: str
    username: str | None = None
    password: str | None = None
    will: Message | None = None
    clean_session: bool = True
    keepalive: int = 60  # seconds; 0 turns the keepalive off

    def __post_init__(self) -> None:
        if not self.client_id and not self.clean_session:
            raise ValueError("a persistent session (clean_session=False) needs a client id")
        if not 0 <= self.keepalive <= 0xFFFF:
            raise ValueError(f"keepalive must be 0-65535 seconds, got {self.keepalive}")
        if self.will is not None and self.will.qos not in (0, 1):
            raise ValueError(f"will QoS must be 0 or 1, got {self.will.qos}")


class Client(asyncio.Protocol):
    """One MQTT connection to HOST:PORT. `connect` opens it; `disconnect` or
    `abort` ends it, as does the broker or the keepalive.

    ON_MESSAGE is called on the event loop for every PUBLISH received; ON_CLOSE
    once when the connection ends, with the reason (None after `disconnect`).
    """

    def __init__(self, host: str, port: int, options: ConnectOptions, *,
                 on_message: Callable[[Message], None] = lambda message: None,
                 on_close: Callable[[BaseException | None], None] = lambda reason: None,
                 tls: ssl.SSLContext | None = None) -> None:
        """TLS: connect over TLS with this context (mqtts://)."""
        self.host, self.port, self.options = host, port, options
        self._tls = tls
        self._on_message = on_message
        self._on_close = on_close
        self._reader = wire.Reader()
        self._transport: asyncio.Transport | None = None
        self._connack: asyncio.Future[bool] | None = None
        self._closed: asyncio.Future[BaseException | None] | None = None
        self._close_reason: BaseException | None = None
        self._disconnecting = False
        self._waiting: dict[int, asyncio.Future[bytes]] = {}  # packet id -> PUBACK/SUBACK body
        self._next_id = 0
        self._last_sent = 0.0
        self._pinged_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return (self._connack is not None and self._connack.done()
                and not self._connack.cancelled() and self._connack.exception() is None
                and self._transport is not None and not self._transport.is_closing())

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.disconnect()

    async def connect(self, *, timeout: float = 10.0) -> bool:
        """Open the connection and log in; True if the broker kept a session for us."""
        if self._closed is not None:
            raise MqttError("a Client is one connection: make a new one to connect again")
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._connack = loop.create_future()
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: self, self.host, self.port, ssl=self._tls)
                o = self.options
                w = o.will
                will = None if w is None else (w.topic, w.payload, w.qos, w.retain)
                self._write(wire.connect(o.client_id, v5=False, keepalive=o.keepalive,
                                         clean=o.clean_session, username=o.username,
                                         password=o.password, will=will))
                return await self._connack
        except TimeoutError:
            error: MqttError = MqttTimeout(f"no CONNACK from {where} within {timeout} s")
        except OSError as exc:
            error = ConnectionLost(f"cannot connect to {where}: {exc}")
        except MqttError as exc:
            error = exc
        self._fail(error)
        raise error

    async def subscribe(self, filters: Sequence[tuple[str, int]], *,
                        timeout: float = 10.0) -> list[int]:
        """Subscribe to (filter, QoS) pairs; the QoS the broker granted for each."""
        packet_id = self._packet_id()
        body = await self._request(wire.subscribe(packet_id, filters, v5=False), packet_id,
                                   timeout, "SUBACK")
        _, granted = wire.parse_suback(body, False)
        refused = [topic for (topic, _), code in zip(filters, granted, strict=False)
                   if code == 0x80]
        if refused or len(granted) != len(filters):
            raise MqttError(f"the broker refused the subscription to {', '.join(refused)}")
        return granted

    async def publish(self, message: Message, *, timeout: float = 10.0) -> None:
        """Send MESSAGE; at QoS 1, return once the broker has acknowledged it."""
        m = message
        if m.qos == 0:
            self._write(wire.publish(m.topic, m.payload, 0, m.retain, 0, v5=False))
            return
        if m.qos != 1:
            raise ValueError(f"QoS must be 0 or 1, got {m.qos}")
        packet_id = self._packet_id()
        await self._request(wire.publish(m.topic, m.payload, 1, m.retain, packet_id, v5=False),
                            packet_id, timeout, "PUBACK")

    async def disconnect(self, *, timeout: float = 5.0) -> None:
        """Say DISCONNECT (so the broker drops the will) and close."""
        if self._transport is None or self._closed is None or self._closed.done():
            return
        self._disconnecting = True
        if not self._transport.is_closing():
            self._transport.write(wire.DISCONNECT_PACKET)
            self._transport.close()  # sends what is buffered first
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed)
        except TimeoutError:
            self._transport.abort()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would: the broker
        publishes the will."""
        self._fail(ConnectionLost("aborted"))

    async def wait_closed(self) -> BaseException | None:
        """Wait until the connection is gone; why (None after `disconnect`)."""
        if self._closed is None:
            raise MqttError("never connected")
        return await asyncio.shield(self._closed)

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for first, body in self._reader.feed(data):
                self._handle(first, body)
        except wire.ProtocolError as exc:
            self._fail(ProtocolViolation(str(exc)))
        except MqttError as exc:  # a refusal, or an answer written to a closing socket
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_reason is None and not self._disconnecting:
            self._close_reason = ConnectionLost(
                "the broker closed the connection" + (f": {exc}" if exc else ""))
        self._closed_with(self._close_reason)

    # -- internals ---------------------------------------------------------------

    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == wire.PUBLISH:
            topic, payload, qos, retain, packet_id = wire.parse_publish(first, body, False)
            self._on_message(Message(topic, payload, qos, retain))
            if qos:
                self._write(wire.puback(packet_id))
        elif kind in (wire.PUBACK, wire.SUBACK):
            future = self._waiting.pop(wire.parse_packet_id(body, "an answer"), None)
            if future is not None and not future.done():
                future.set_result(body)
        elif kind == wire.CONNACK:
            if self._connack is None or self._connack.done():
                raise ProtocolViolation("unexpected CONNACK")
            present, code, _ = wire.parse_connack(body, False)
            if code:
                raise ConnectionRefused(code)
            self._connack.set_result(present)
            if self.options.keepalive:
                # A random first phase spreads the pings of devices that connected together.
                self._schedule_ping(self.options.keepalive / 2 * random.uniform(0.5, 1.0))
        elif kind == wire.PINGRESP:
            self._pinged_at = None
        else:  # the reader lets through only what a client receives
            raise ProtocolViolation(f"a client does not expect packet type {kind}")

    def _schedule_ping(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._keepalive)

    def _keepalive(self) -> None:
        """Runs every keepalive/2: ping when idle that long; give up when a ping
        has gone unanswered for a whole keepalive (the broker or the path is dead)."""
        keepalive = self.options.keepalive
        now = asyncio.get_running_loop().time()
        if self._pinged_at is not None and now - self._pinged_at >= keepalive:
            self._fail(MqttTimeout(f"no PINGRESP within the {keepalive} s keepalive"))
            return
        if self._pinged_at is None and now - self._last_sent >= keepalive / 2:
            self._write(wire.PINGREQ_PACKET)
            self._pinged_at = now
        self._schedule_ping(keepalive / 2)

    def _packet_id(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise MqttError("all 65535 packet ids are waiting for an answer")

    async def _request(self, packet: bytes, packet_id: int, timeout: float, answer: str) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[packet_id] = future
        try:
            self._write(packet)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise MqttTimeout(f"no {answer} within {timeout} s") from None
        finally:
            self._waiting.pop(packet_id, None)

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionLost("not connected")
        self._transport.write(data)
        self._last_sent = asyncio.get_running_loop().time()

    def _fail(self, reason: BaseException) -> None:
        """Close at once, without DISCONNECT, remembering the first reason."""
        if self._close_reason is None:
            self._close_reason = reason
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows and wakes every waiter
        else:
            self._closed_with(self._close_reason)

    def _closed_with(self, reason: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        lost = reason or ConnectionLost("disconnected")
        pending = [f for f in (self._connack, *self._waiting.values())
                   if f is not None and not f.done()]
        for future in pending:
            future.set_exception(lost)
            # Whoever waits gets it; with nobody waiting (a connection refused before the
            # CONNACK was awaited, as every retry during a broker outage is), asyncio would
            # log "Future exception was never retrieved" for it. The reason is told by
            # connect() and wait_closed() anyway, so this one is marked as read.
            future.exception()
        self._waiting.clear()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(reason)
            self._on_close(reason)
