"""An MQTT session that survives: the agent's link to the hub, and the hub's ingest loop.

A `Session` keeps one broker connection alive for as long as it runs. It
reconnects with exponential backoff and jitter, subscribes again to every
wanted topic filter after each connect, publishes a birth message after each
connect and leaves a last will, and hands received messages to one consumer
(`get`, `messages`, or `amessages` for asyncio; `take` and `ack` for one that
acknowledges later). Built on paho-mqtt 2.x.

Threads. Each session has one thread of its own. It runs the outer loop
(connect, serve the connection, back off, repeat) and, while connected,
paho's network loop through paho's external-loop API (`loop_read`,
`loop_write`, `loop_misc`). paho's callbacks run there and only record
state, wake a waiting `subscribe`, or put a message into the inbox. Callers
use a Session from any thread; their packets are written by that thread.

Delivery is at least once, and a slow consumer slows the broker down
instead of losing messages:

- A QoS 1 message is acknowledged (PUBACK) when the consumer takes it from
  the inbox, not when it arrives (paho's manual_ack); a consumer that uses
  `take` acknowledges it with `ack` when it is safe, e.g. committed to a
  database. A process that dies with messages in its inbox, or taken and
  not yet acknowledged, has not acknowledged them, so the broker delivers
  them again, and the broker holds back what its in-flight window
  does not allow (MQTT 3.1.1: Mosquitto's max_inflight_messages; MQTT 5: the
  Receive Maximum we send, the inbox size).
- Brokers do not always keep to that window (Mosquitto 2.0.11 sends a whole
  window more for every PUBACK once it drains a backlog), so the backstop
  is TCP: while the inbox is full the session stops reading the socket,
  logs it, and the broker's queue for this client grows instead - hence
  Mosquitto's max_queued_messages must be large. Writing goes on, so
  acknowledgements, pings and publishes still go out. An answer we wait for
  (PUBACK, SUBACK) may sit behind unread messages in the stream, so while a
  `publish` or `subscribe` waits, reading goes on past the limit; the
  overshoot is what the broker had already sent. This is why the session
  runs paho's loop itself instead of `loop_start`: there, the only way to
  stop reading is to block paho's thread in the message callback, which
  stops its writes too. A consumer that takes nothing for about twice the
  keepalive is disconnected by the PINGRESP it cannot read; its messages
  come again after the reconnect.
- The session is persistent: a fixed client id with clean_session=False
  (MQTT 5: clean_start=False and a session expiry), so the broker keeps the
  subscriptions and queues QoS 1 messages while a device is offline.
- `publish` waits for the PUBACK; `publish_many` puts a whole batch in
  flight at once and waits for every PUBACK; `send_many` puts it in flight
  and returns, so the caller can prepare the next batch meanwhile, and
  `Sent.wait` waits for the PUBACKs. paho keeps at most `max_inflight`
  QoS 1 messages unacknowledged (its default, 20, is one round trip per 20
  messages) and sends the rest as PUBACKs come. `MqttTimeout` there means
  "not confirmed", not "not delivered": a QoS 1 message can still arrive,
  later or twice.
  The protocol's generations and sequence numbers make repeats harmless.

MQTT 3.1.1 is the default (what every broker speaks);
MQTT 5 adds the session expiry and Receive Maximum above. Plain TCP only
(mqtt://) for now.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, LogLevel, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("edgefleet.mqtt")
_paho_log = logging.getLogger("edgefleet.mqtt.paho")


class MqttError(Exception):
    """The session could not do what was asked; the message says why."""


class MqttTimeout(MqttError):
    """A wait ran out of time: not connected, no PUBACK, no SUBACK, no message."""


@dataclass(frozen=True)
class Message:
    """A message received, or one to send as birth message or last will."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait before reconnect attempt number N (0, 1, ...).

    Exponential, capped, and shortened by a random fraction of up to
    `jitter`, so a fleet that lost the broker together does not come back in
    one wave. A connection that lasted `stable_after` seconds starts the
    count again; one that keeps dropping right away keeps backing off (two
    devices sharing a client id would otherwise kick each other off forever).
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    stable_after: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {self.initial}, "
                             f"{self.maximum}")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"backoff needs multiplier >= 1 and 0 <= jitter < 1, got "
                             f"{self.multiplier}, {self.jitter}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))
        return base * (1 - self.jitter * rand())


@dataclass(frozen=True)
class Delivery:
    """A message from `take`, not acknowledged until it is passed to `ack`."""

    message: Message
    mid: int
    epoch: int  # which connection it came on: a PUBACK only means something there


class _Inbox:
    """Received messages waiting for the consumer, oldest first.

    `size` is where the session stops reading from the broker; a read that
    was under way when it filled up may still add a few messages."""

    def __init__(self, size: int, on_room: Callable[[], None]) -> None:
        self._size = size
        self._on_room = on_room
        self._items: deque[Delivery] = deque()
        self._changed = threading.Condition()
        self._wakers: set[Callable[[], None]] = set()
        self.closed = False

    def full(self) -> bool:
        return len(self._items) >= self._size

    def put(self, item: Delivery) -> None:
        with self._changed:
            if self.closed:
                return  # read after close(): unacknowledged, so the broker sends it again
            self._items.append(item)
            self._changed.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def take(self, timeout: float | None) -> Delivery | None:
        """The oldest item; None on timeout or once closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._items or self.closed, timeout)
            if self.closed or not self._items:
                return None
            was_full = self.full()
            item = self._items.popleft()
        if was_full:
            self._on_room()
        return item

    def take_many(self, most: int, timeout: float | None) -> list[Delivery]:
        """The oldest MOST items or fewer, waiting up to TIMEOUT for the first; [] on
        timeout or once closed. One lock for all: the hub's ingest takes hundreds."""
        with self._changed:
            self._changed.wait_for(lambda: self._items or self.closed, timeout)
            if self.closed:
                return []
            was_full = self.full()
            items = [self._items.popleft() for _ in range(min(most, len(self._items)))]
        if was_full and items:
            self._on_room()
        return items

    def add_waker(self, wake: Callable[[], None]) -> None:
        with self._changed:
            self._wakers.add(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        with self._changed:
            self._wakers.discard(wake)

    def close(self) -> None:
        # What is left was never acknowledged: the broker delivers it again.
        with self._changed:
            self.closed = True
            self._items.clear()
            self._changed.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def reopen(self) -> None:
        with self._changed:
            self.closed = False


class Sent:
    """Messages `Session.send_many` put in flight: `wait` for their PUBACKs."""

    def __init__(self, session: Session, infos: list[tuple[str, paho.MQTTMessageInfo]],
                 deadline: float, timeout: float, *, counted: bool) -> None:
        self.session, self.infos = session, infos
        self.deadline, self.timeout = deadline, timeout
        self._counted = counted  # holds one of the session's `_awaiting`

    def wait(self) -> None:
        """Wait for every PUBACK, up to the deadline `send_many` set; MqttTimeout if one
        did not come (that message may still be delivered)."""
        try:
            for topic, info in self.infos:
                info.wait_for_publish(max(self.deadline - time.monotonic(), 0.001))
                if not info.is_published():
                    raise MqttTimeout(f"no PUBACK for {topic} within {self.timeout:g} s; "
                                      "it may still be delivered")
        finally:
            self.done()

    def done(self) -> None:
        if self._counted:
            self._counted = False
            self.session._done_awaiting()


class Session:
    """One client's MQTT session; see the module docstring.

    Use as a context manager (entering starts it, leaving closes it) or call
    `start` and `close`. Starting does not wait for the broker: the session
    keeps trying in the background, and `wait_connected` waits for it. A
    Session can be started again after `close`, but not while it runs.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        will: Message | None = None,
        birth: Message | None = None,
        subscriptions: Iterable[str] = (),
        protocol: Literal["3.1.1", "5"] = "3.1.1",
        keepalive: int = 30,
        inbox_size: int = 1000,
        session_expiry: int = 7 * 24 * 3600,
        backoff: BackoffPolicy = BackoffPolicy(),
        max_inflight: int = 20,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname \
                or parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError(f"broker URL {url!r} is not mqtt://HOST[:PORT] or mqtts://... "
                             "(give credentials as username/password)")
        if not client_id:
            raise ValueError("a Session needs a fixed client id: the broker keeps its "
                             "subscriptions and queued messages under it")
        if protocol not in ("3.1.1", "5"):
            raise ValueError(f"protocol must be '3.1.1' or '5', not {protocol!r}")
        if not 1 <= inbox_size <= 65535:  # 65535: the most MQTT 5's Receive Maximum can say
            raise ValueError(f"inbox_size must be 1..65535, not {inbox_size}")
        if not 1 <= max_inflight <= 65535:  # the same bound for what we send
            raise ValueError(f"max_inflight must be 1..65535, not {max_inflight}")
        self.url = url
        self.client_id = client_id
        self._host = parts.hostname
        self._port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self._tls = parts.scheme == "mqtts"
        self._tls_set = False
        self._v5 = protocol == "5"
        self._keepalive = keepalive
        self._session_expiry = session_expiry
        self._inbox_size = inbox_size
        self._will = will
        self._birth = birth
        self._backoff = backoff

        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self._v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,  # our outer loop reconnects, with jitter
            manual_ack=True,             # acknowledged when the consumer takes it
        )
        self._client.suppress_exceptions = True  # a bug in a callback must not kill the loop
        self._client.max_inflight_messages = max_inflight
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_log = self._on_log

        self._client.on_socket_register_write = self._on_write_wanted

        self._inbox = _Inbox(inbox_size, on_room=self._wake)
        self._stop = threading.Event()      # set by close(): ends the outer loop
        self._lifecycle = threading.Lock()  # connecting, or close(): not both at once
        self._close_by = 0.0                # how long close() waits for the DISCONNECT to go
        self._wakeup: tuple[socket.socket, socket.socket] | None = None  # interrupts select()
        self._pauses = 0                    # reading paused for a full inbox, since...
        self._warned_at = -math.inf         # ... the last warning about it
        self._thread: threading.Thread | None = None
        # Everything below is guarded by _state and read by waiters through it.
        self._state = threading.Condition()
        self._wanted: dict[str, int] = dict.fromkeys(subscriptions, 1)
        self._running = False
        self._closing = False
        self._connected = False             # CONNACK received
        self._ready = False                 # ... and the replayed subscriptions acknowledged
        self._replaying: tuple[int, list[str]] | None = None  # SUBSCRIBE mid, filters
        self._subacks: dict[int, list[ReasonCode] | None] = {}  # [] = connection lost
        self._awaiting = 0                  # publish/subscribe calls waiting for an answer
        self._epoch = 0
        self._up_since: float | None = None
        self._last_error: str | None = None

    def use_tls(self, context: ssl.SSLContext) -> None:
        """For an mqtts:// URL, before `start`: CONTEXT verifies the broker and holds the
        client certificate, if any. Load a renewed certificate into the same context
        (`load_cert_chain`): the next connection presents it."""
        if not self._tls:
            raise ValueError(f"{self.url} is plain MQTT; TLS needs mqtts://")
        self._client.tls_set_context(context)
        self._tls_set = True

    # --- lifecycle ------------------------------------------------------------

    def __enter__(self) -> Session:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start connecting in the background, for good, until `close`."""
        with self._state:
            if self._running:
                raise MqttError(f"session {self.client_id!r} is already running; "
                                "a Session is not re-entrant")
            if self._tls and not self._tls_set:
                raise MqttError(f"{self.url} needs TLS: call use_tls before start")
            self._running, self._closing, self._last_error = True, False, None
        self._stop.clear()
        self._inbox.reopen()
        self._wakeup = socket.socketpair()
        for end in self._wakeup:
            end.setblocking(False)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"mqtt-session-{self.client_id}")
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Publish the will's payload, disconnect, stop. A clean DISCONNECT
        makes the broker discard the last will, so the session says it itself."""
        with self._state:
            if not self._running:
                return
            ready = self._ready
        if ready and self._will is not None:
            try:
                w = self._will
                self.publish(w.topic, w.payload, qos=w.qos, retain=w.retain, timeout=timeout)
            except MqttError as exc:
                log.warning("%s: could not publish the goodbye message: %s", self.client_id, exc)
        with self._lifecycle:
            with self._state:
                self._closing = True
                self._state.notify_all()
            self._close_by = time.monotonic() + timeout
            self._stop.set()
            self._client.disconnect()
        self._wake()
        self._inbox.close()
        assert self._thread is not None and self._wakeup is not None
        self._thread.join()
        for end in self._wakeup:
            end.close()
        with self._state:
            self._running = self._connected = self._ready = False
            self._state.notify_all()

    def reconnect(self) -> None:
        """Drop the connection and connect again: for one that looks
        open but no longer delivers (the caller's heartbeat tells). A no-op
        while not connected."""
        with self._lifecycle:
            with self._state:
                if self._stop.is_set() or not self._connected:
                    return
            log.warning("%s: reconnecting to %s: the connection stopped delivering",
                        self.client_id, self.url)
            self._client.disconnect()
        self._wake()

    def _run(self) -> None:
        """The outer loop: connect, serve the connection, back off, again."""
        attempt = 0
        while True:
            with self._lifecycle:  # close() comes first, or finds a connection to end
                if self._stop.is_set():
                    return
                self._up_since = None
                try:
                    self._connect()
                    connected = True
                except OSError as exc:  # refused, unreachable, DNS, timeout
                    with self._state:
                        self._last_error = f"cannot connect to {self.url}: {exc}"
                    log.warning("%s: cannot connect to %s: %s", self.client_id, self.url, exc)
                    connected = False
            if connected:
                self._serve()
                up = self._up_since
                if up is not None and time.monotonic() - up >= self._backoff.stable_after:
                    attempt = 0
            if self._stop.is_set():
                return
            delay = self._backoff.delay(attempt)
            attempt += 1
            log.info("%s: reconnecting to %s in %.1f s", self.client_id, self.url, delay)
            if self._stop.wait(delay):
                return

    def _serve(self) -> None:
        """paho's network loop for one connection, except that reading pauses
        while the inbox is full. Returns once paho has closed the socket."""
        assert self._wakeup is not None
        wakeup, client, paused = self._wakeup[0], self._client, False
        while (sock := client.socket()) is not None:
            if self._stop.is_set() and time.monotonic() > self._close_by:
                return  # our DISCONNECT did not get out in time; the next connect resets
            # An answer we wait for may be queued behind messages: read on to it.
            full = self._inbox.full() and not self._awaiting
            if full and not paused:
                self._note_pause()
            paused = full
            readable, writable, _ = select.select(
                [wakeup] if full else [wakeup, sock],
                [sock] if client.want_write() else [], [], 1.0)
            if wakeup in readable:
                with contextlib.suppress(BlockingIOError):
                    wakeup.recv(4096)
            # On an error paho closes the socket and calls on_disconnect itself.
            if sock in readable and client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                continue
            if sock in writable and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                continue
            client.loop_misc()  # keepalive

    def _note_pause(self) -> None:
        self._pauses += 1
        now = time.monotonic()
        if now - self._warned_at >= 60:
            log.warning("%s: inbox full (%d messages): reading from the broker paused until "
                        "the consumer catches up (%d pause(s) since the last warning)",
                        self.client_id, self._inbox_size, self._pauses)
            self._warned_at, self._pauses = now, 0

    def _wake(self) -> None:
        """Interrupt the loop's select(): something to write, or room in the inbox."""
        wakeup = self._wakeup
        if wakeup is not None:
            with contextlib.suppress(OSError):  # full (it is awake anyway) or closed
                wakeup[1].send(b"!")

    def _connect(self) -> None:
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry
            properties.ReceiveMaximum = self._inbox_size
            self._client.connect(self._host, self._port, self._keepalive,
                                 clean_start=False, properties=properties)
        else:
            self._client.connect(self._host, self._port, self._keepalive)

    # --- paho callbacks (paho's thread) ---------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            with self._state:
                self._last_error = f"{self.url} refused the connection: {reason}"
            log.error("%s: %s", self.client_id, self._last_error)
            return
        with self._state:
            self._epoch += 1
            self._connected = True
            self._up_since = time.monotonic()
            self._last_error = None
            # Always subscribe again, even when the broker kept the session:
            # it costs one packet and covers a broker that lost its state.
            wanted = list(self._wanted.items())
            if wanted:
                _, mid = client.subscribe(wanted)
                self._replaying = (mid, [f for f, _ in wanted]) if mid is not None else None
            else:
                self._ready = True
                self._state.notify_all()
        if self._birth is not None:
            b = self._birth
            client.publish(b.topic, b.payload, b.qos, b.retain)
        log.info("%s: connected to %s (session present: %s)", self.client_id, self.url,
                 flags.session_present)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        with self._state:
            if self._replaying is not None and self._replaying[0] == mid:
                refused = [f for f, r in zip(self._replaying[1], reasons, strict=False)
                           if r.is_failure]
                if refused:
                    self._last_error = f"the broker refused the subscriptions {refused}"
                    log.error("%s: %s", self.client_id, self._last_error)
                self._replaying = None
                self._ready = True
            elif mid in self._subacks:
                self._subacks[mid] = reasons
            self._state.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.qos, msg.retain)
        self._inbox.put(Delivery(message, msg.mid, self._epoch))

    def _on_write_wanted(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._wake()  # a packet was queued, maybe from another thread

    def _on_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        _paho_log.log(paho.LOGGING_LEVEL[LogLevel(level)], "%s: %s", self.client_id, text)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        with self._state:
            if self._connected and not self._closing:
                self._last_error = f"connection lost: {reason}"
                log.warning("%s: %s", self.client_id, self._last_error)
            self._connected = self._ready = False
            self._replaying = None
            for mid, answer in self._subacks.items():
                if answer is None:
                    self._subacks[mid] = []
            self._state.notify_all()

    # --- what callers use -------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected, and the wanted subscriptions are in place."""
        with self._state:
            return self._ready

    @property
    def connection(self) -> int | None:
        """The number of the current connection while `connected`, else None.
        It grows with every connect, so a caller that polls sees a reconnect
        even when it happened between two looks."""
        with self._state:
            return self._epoch if self._ready else None

    def wait_connected(self, timeout: float) -> None:
        """Return once connected with subscriptions in place; MqttTimeout if not in time."""
        with self._state:
            self._state.wait_for(lambda: self._ready or not self._running or self._closing,
                                 timeout)
            if not self._running or self._closing:
                raise MqttError(f"session {self.client_id!r} is not running")
            if not self._ready:
                why = f"; last error: {self._last_error}" if self._last_error else ""
                raise MqttTimeout(f"not connected to {self.url} after {timeout:g} s{why}")

    def subscribe(self, topic_filter: str, *, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe now (waiting for the SUBACK if connected) and after every reconnect."""
        with self._state:
            self._wanted[topic_filter] = qos
            if not self._connected:
                return  # the next connect subscribes to everything wanted
            rc, mid = self._client.subscribe([(topic_filter, qos)])
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return  # the connection just dropped; the reconnect covers it
            self._subacks[mid] = None
            self._awaiting += 1
            self._wake()
            self._state.wait_for(lambda: self._subacks[mid] is not None, timeout)
            self._awaiting -= 1
            answer = self._subacks.pop(mid)
            if answer is None:
                raise MqttTimeout(f"no SUBACK for {topic_filter!r} within {timeout:g} s")
            if answer and answer[0].is_failure:
                del self._wanted[topic_filter]
                raise MqttError(f"the broker refused the subscription {topic_filter!r}: "
                                f"{answer[0]}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout: float = 10.0) -> None:
        """Publish and wait for the broker's PUBACK, including any wait for a connection."""
        self.publish_many([Message(topic, payload, qos, retain)], timeout=timeout)

    def publish_many(self, messages: Sequence[Message], *, timeout: float = 10.0) -> None:
        """Publish MESSAGES (each with its own qos and retain) all at once and wait
        for every PUBACK: one round trip for the batch instead of one per message.
        On MqttTimeout some of them may have been delivered, or may still be."""
        self.send_many(messages, timeout=timeout).wait()

    def send_many(self, messages: Sequence[Message], *, timeout: float = 10.0) -> Sent:
        """`publish_many` without the wait for the PUBACKs: `Sent.wait` waits for them,
        by TIMEOUT from now (which includes any wait for a connection). Call it once,
        always: until then the session reads on past a full inbox (a PUBACK may sit
        behind messages)."""
        first = (messages[0].topic if messages else "nothing") + (
            f" and {len(messages) - 1} more" if len(messages) > 1 else "")
        deadline = time.monotonic() + timeout
        if not messages:
            return Sent(self, [], deadline, timeout, counted=False)
        try:
            self.wait_connected(timeout)
        except MqttTimeout as exc:
            raise MqttTimeout(f"cannot publish to {first}: {exc}") from None
        with self._state:
            self._awaiting += 1
        self._wake()
        sent = Sent(self, [], deadline, timeout, counted=True)
        try:
            for m in messages:
                info = self._client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise MqttError(f"publish to {m.topic} failed: {paho.error_string(info.rc)}"
                                    " (a QoS 1 message is sent again after reconnecting)")
                sent.infos.append((m.topic, info))
        except BaseException:
            sent.done()
            raise
        return sent

    def _done_awaiting(self) -> None:
        with self._state:
            self._awaiting -= 1

    def get(self, timeout: float | None = None) -> Message:
        """The next message, acknowledged as it is handed over.

        MqttTimeout if none arrives within TIMEOUT; MqttError once closed."""
        return self._hand_over(self.take(timeout))

    def take(self, timeout: float | None = None) -> Delivery:
        """The next message, not acknowledged yet: pass it to `ack` once it is
        safe (the hub's ingest: committed), so a consumer that dies first gets
        it again. Until then it counts in the broker's in-flight window.
        Acknowledge in the order taken: MQTT 3.1.1 wants PUBACKs in order.

        MqttTimeout if none arrives within TIMEOUT; MqttError once closed."""
        item = self._inbox.take(timeout)
        if item is None:
            if self._inbox.closed:
                raise MqttError(f"session {self.client_id!r} is closed")
            raise MqttTimeout(f"no message within {timeout:g} s")
        return item

    def take_many(self, most: int, timeout: float | None = None) -> list[Delivery]:
        """`take` for a batch: the messages that have arrived, at most MOST, waiting up
        to TIMEOUT for the first. MqttTimeout if none arrives; MqttError once closed."""
        items = self._inbox.take_many(most, timeout)
        if not items:
            if self._inbox.closed:
                raise MqttError(f"session {self.client_id!r} is closed")
            raise MqttTimeout(f"no message within {timeout:g} s")
        return items

    def messages(self) -> Iterator[Message]:
        """Messages as they come, until the session is closed."""
        while (item := self._inbox.take(None)) is not None:
            yield self._hand_over(item)

    async def amessages(self) -> AsyncIterator[Message]:
        """`messages` for asyncio: waits without a thread, and a cancelled
        wait takes nothing out of the inbox."""
        import asyncio  # here: the threaded agent daemon need not load it

        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def wake() -> None:  # runs on paho's thread or close()'s
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:
                pass  # that event loop is closed: nobody is waiting any more

        self._inbox.add_waker(wake)
        try:
            while True:
                arrived.clear()
                item = self._inbox.take(0)
                if item is not None:
                    yield self._hand_over(item)
                elif self._inbox.closed:
                    return
                else:
                    await arrived.wait()
        finally:
            self._inbox.remove_waker(wake)

    def _hand_over(self, item: Delivery) -> Message:
        self.ack(item)
        return item.message

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a message from `take`. If the connection it came on is
        gone nothing is sent: the broker delivers the message again."""
        self.ack_many((delivery,))

    def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        """`ack` for several, in their order, under one lock."""
        with self._state:
            for delivery in deliveries:
                # A PUBACK on a later connection could acknowledge another
                # message with the same id. The broker redelivers this one.
                if delivery.message.qos > 0 and self._connected \
                        and delivery.epoch == self._epoch:
                    self._client.ack(delivery.mid, delivery.message.qos)
