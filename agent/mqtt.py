"""An MQTT session that survives: the agent's link to the hub, and the hub's ingest loop.

A `Session` keeps one broker connection alive for as long as it runs. It
reconnects with exponential backoff and jitter, subscribes again to every
wanted topic filter after each connect, publishes a birth message after each
connect and leaves a last will, and hands received messages to one consumer
(`get`, `messages`, or `amessages` for asyncio; `take` and `ack` for one that
acknowledges later). The packets are `agent.mqtt_wire`'s; this module runs
the connection on a plain socket (or an SSL socket: `use_tls`) with select.

Threads. Each session has one thread of its own. It runs the outer loop
(connect, serve the connection, back off, repeat) and, while connected,
does all the socket's reading and writing: it splits what it reads into
packets, puts messages into the inbox, notes PUBACKs and SUBACKs, and
writes what callers queued (their packets, acknowledgements, pings).
Callers use a Session from any thread; they queue packets under the
session's lock and wake the loop through a socket pair.

Delivery is at least once, and a slow consumer slows the broker down
instead of losing messages:

- A QoS 1 message is acknowledged (PUBACK) when the consumer takes it from
  the inbox, not when it arrives; a consumer that uses `take` acknowledges
  it with `ack` when it is safe, e.g. committed to a database. A process
  that dies with messages in its inbox, or taken and not yet acknowledged,
  has not acknowledged them, so the broker delivers them again, and the
  broker holds back what its in-flight window does not allow (MQTT 3.1.1:
  Mosquitto's max_inflight_messages; MQTT 5: the Receive Maximum we send,
  the inbox size).
- Brokers do not always keep to that window (Mosquitto 2.0.11 sends a whole
  window more for every PUBACK once it drains a backlog), so the backstop
  is TCP: while the inbox is full the session stops reading the socket,
  logs it, and the broker's queue for this client grows instead - hence
  Mosquitto's max_queued_messages must be large. Writing goes on, so
  acknowledgements, pings and publishes still go out. An answer we wait for
  (PUBACK, SUBACK) may sit behind unread messages in the stream, so while a
  `publish` or `subscribe` waits, reading goes on past the limit; the
  overshoot is what the broker had already sent. A consumer that takes
  nothing for about twice the keepalive is disconnected by the PINGRESP it
  cannot read; its messages come again after the reconnect.
- The session is persistent: a fixed client id with clean_session=False
  (MQTT 5: clean_start=False and a session expiry), so the broker keeps the
  subscriptions and queues QoS 1 messages while a device is offline. Our
  side of it lives in the Session: QoS 1 messages not acknowledged yet are
  sent again (with DUP) after a reconnect.
- `publish` waits for the PUBACK; `publish_many` puts a whole batch in
  flight at once and waits for every PUBACK; `send_many` puts it in flight
  and returns, so the caller can prepare the next batch meanwhile, and
  `Sent.wait` waits for the PUBACKs. At most `max_inflight` QoS 1 messages
  are unacknowledged at a time (MQTT 5: fewer if the broker's Receive
  Maximum says so); the rest go out as PUBACKs come. `MqttTimeout` there
  means "not confirmed", not "not delivered": a QoS 1 message can still
  arrive, later or twice.
  The protocol's generations and sequence numbers make repeats harmless.

What the broker sends that MQTT does not allow (a malformed or oversized
packet, a packet type or flags a client never receives) is logged and drops
the connection; the reconnect starts afresh.

MQTT 3.1.1 is the default (what every broker speaks);
MQTT 5 adds the session expiry and Receive Maximum above. mqtt:// is plain
TCP; mqtts:// is TLS with the SSL context given to `use_tls`. QoS 0 and 1
only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from agent import mqtt_wire as wire

if TYPE_CHECKING:
    import ssl  # the caller's context; the module is loaded only for mqtts://

log = logging.getLogger("edgefleet.mqtt")

CONNECT_TIMEOUT = 10.0  # seconds for TCP, TLS, and again for the CONNACK
READ_SIZE = 256 * 1024  # one recv(): many messages a system call under load


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

    def put_many(self, items: list[Delivery]) -> None:
        """Add what one read brought, under one lock."""
        with self._changed:
            if self.closed:
                return  # read after close(): unacknowledged, so the broker sends it again
            self._items.extend(items)
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


class _Outgoing:
    """A message `send_many` queued: its packet, and whether the broker has it."""

    __slots__ = ("topic", "packet", "sent", "done")

    def __init__(self, topic: str, packet: bytes) -> None:
        self.topic, self.packet = topic, packet
        self.sent = False  # written on some connection: a resend carries DUP
        self.done = False  # PUBACK received (QoS 0: handed to the socket)


class Sent:
    """Messages `Session.send_many` put in flight: `wait` for their PUBACKs."""

    def __init__(self, session: Session, messages: list[_Outgoing], deadline: float,
                 timeout: float, *, counted: bool) -> None:
        self.session, self.messages = session, messages
        self.deadline, self.timeout = deadline, timeout
        self._counted = counted  # holds one of the session's `_awaiting`

    def wait(self) -> None:
        """Wait for every PUBACK, up to the deadline `send_many` set; MqttTimeout if one
        did not come (that message may still be delivered)."""
        try:
            state = self.session._state
            with state:
                state.wait_for(lambda: all(m.done for m in self.messages),
                               max(self.deadline - time.monotonic(), 0.001))
                missing = next((m for m in self.messages if not m.done), None)
            if missing is not None:
                raise MqttTimeout(f"no PUBACK for {missing.topic} within {self.timeout:g} s; "
                                  "it may still be delivered")
        finally:
            self.done()

    def done(self) -> None:
        if self._counted:
            self._counted = False
            self.session._done_awaiting()


class _Dropped(Exception):
    """The connection ends; the message says why."""


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
        self._tls_context: ssl.SSLContext | None = None
        self._v5 = protocol == "5"
        self._keepalive = keepalive
        self._inbox_size = inbox_size
        self._max_inflight = max_inflight
        self._will = will
        self._birth = birth
        self._backoff = backoff
        # Built once and checked now: a bad will or credentials fail here, not later.
        self._connect_packet = wire.connect(
            client_id, v5=self._v5, keepalive=keepalive, clean=False, username=username,
            password=password,
            will=None if will is None else (will.topic, will.payload, will.qos, will.retain),
            session_expiry=session_expiry, receive_maximum=inbox_size,
            maximum_packet_size=wire.DEFAULT_LIMIT)

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
        self._open = False                  # a socket is up (CONNECT may not be answered yet)
        self._connected = False             # CONNACK received
        self._ready = False                 # ... and the replayed subscriptions acknowledged
        self._replaying: tuple[int, list[str]] | None = None  # SUBSCRIBE packet id, filters
        self._subacks: dict[int, list[int] | None] = {}  # [] = connection lost
        self._awaiting = 0                  # publish/subscribe calls waiting for an answer
        self._epoch = 0
        self._up_since: float | None = None
        self._last_error: str | None = None
        self._out: list[bytes] = []         # packets for the loop to write, in order
        self._out_qos0: list[_Outgoing] = []  # ... of which these are done once written
        self._disconnecting = False         # a DISCONNECT is queued: nothing after it
        # Our half of the persistent session: QoS 1 messages without a PUBACK, by
        # packet id in the order sent, and those the in-flight window holds back.
        self._unacked: dict[int, _Outgoing] = {}
        self._held: deque[int] = deque()
        self._in_flight = 0
        self._window = max_inflight
        self._next_id = 0

    def use_tls(self, context: ssl.SSLContext) -> None:
        """For an mqtts:// URL, before `start`: CONTEXT verifies the broker and holds the
        client certificate, if any. Load a renewed certificate into the same context
        (`load_cert_chain`): the next connection presents it."""
        if not self._tls:
            raise ValueError(f"{self.url} is plain MQTT; TLS needs mqtts://")
        self._tls_context = context

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
            if self._tls and self._tls_context is None:
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
            self._disconnect()
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
            self._disconnect()
        self._wake()

    def _disconnect(self) -> None:
        """Queue a DISCONNECT: the loop writes what is before it, then closes."""
        with self._state:
            if self._open and not self._disconnecting:
                self._out.append(wire.DISCONNECT_PACKET)
                self._disconnecting = True

    def _run(self) -> None:
        """The outer loop: connect, serve the connection, back off, again."""
        attempt = 0
        while True:
            sock = None
            with self._lifecycle:  # close() comes first, or finds a connection to end
                if self._stop.is_set():
                    return
                self._up_since = None
                try:
                    sock = self._connect()
                except OSError as exc:  # refused, unreachable, DNS, timeout, TLS
                    with self._state:
                        self._last_error = f"cannot connect to {self.url}: {exc}"
                    log.warning("%s: cannot connect to %s: %s", self.client_id, self.url, exc)
            if sock is not None:
                try:
                    self._serve(sock)
                    reason = "disconnected"
                except _Dropped as exc:
                    reason = str(exc)
                except wire.ProtocolError as exc:
                    reason = f"the broker broke the protocol: {exc}"
                except OSError as exc:
                    reason = str(exc) or type(exc).__name__
                except Exception as exc:  # a bug of ours must not end the session for good
                    log.exception("%s: the session's loop failed", self.client_id)
                    reason = f"internal error: {exc!r}"
                finally:
                    sock.close()
                self._lost(reason)
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

    def _connect(self) -> socket.socket:
        """A socket to the broker with our CONNECT queued; the loop reads the CONNACK."""
        sock = socket.create_connection((self._host, self._port), timeout=CONNECT_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                sock = self._tls_context.wrap_socket(sock, server_hostname=self._host)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        with self._state:
            self._open, self._disconnecting = True, False
            self._out, self._out_qos0 = [self._connect_packet], []
        return sock

    def _serve(self, sock: socket.socket) -> None:
        """Read and write one connection until it ends: returns after our DISCONNECT is
        out, raises _Dropped, ProtocolError or OSError otherwise. Reading pauses while
        the inbox is full."""
        assert self._wakeup is not None
        wakeup, paused = self._wakeup[0], False
        retry: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)
        if self._tls_context is not None:
            import ssl  # loaded anyway by whoever made the context

            retry += (ssl.SSLWantReadError, ssl.SSLWantWriteError)
        reader = wire.Reader()
        unsent = b""
        opened = last_in = last_out = time.monotonic()
        ping_at: float | None = None
        while True:
            if self._stop.is_set() and time.monotonic() > self._close_by:
                return  # our DISCONNECT did not get out in time; the next connect resets
            # An answer we wait for may be queued behind messages: read on to it.
            full = self._inbox.full() and not self._awaiting
            if full and not paused:
                self._note_pause()
            paused = full
            with self._state:
                if self._out:
                    unsent += b"".join(self._out)
                    self._out = []
                    written, self._out_qos0 = self._out_qos0, []
                    for m in written:  # QoS 0: as done as it gets once handed on
                        m.done = True
                    if written:
                        self._state.notify_all()
                bye = self._disconnecting
            if unsent:
                try:
                    unsent = unsent[sock.send(unsent):]
                    last_out = time.monotonic()
                except retry:
                    pass
            if bye and not unsent:
                self._linger(sock)
                return
            # An SSL socket may hold decrypted bytes that select() cannot see.
            buffered = not full and self._tls_context is not None and sock.pending()  # type: ignore[attr-defined]
            readable, _, _ = select.select(
                [wakeup] if full else [wakeup, sock], [sock] if unsent else [], [],
                0 if buffered else 1.0)
            if wakeup in readable:
                with contextlib.suppress(BlockingIOError):
                    wakeup.recv(4096)
            if buffered or sock in readable:
                try:
                    data = sock.recv(READ_SIZE)
                except retry:
                    data = None
                if data is not None:
                    if not data:
                        truncated = f" in the middle of a packet ({reader.pending} bytes)" \
                            if reader.pending else ""
                        raise _Dropped(f"the broker closed the connection{truncated}")
                    packets = reader.feed(data)
                    if packets:
                        last_in = time.monotonic()
                        if self._handle(packets):
                            ping_at = None
            # Keepalive (MQTT 3.1.1 section 3.1.2.10): a PINGREQ when either way has been
            # quiet that long; no answer within as long again ends the connection.
            now = time.monotonic()
            if not self._connected and now - opened > CONNECT_TIMEOUT:
                raise _Dropped(f"no CONNACK within {CONNECT_TIMEOUT:g} s")
            keepalive = self._keepalive
            if keepalive and self._connected:
                if ping_at is not None:
                    if now - ping_at >= keepalive:
                        raise _Dropped(f"no PINGRESP within {keepalive} s")
                elif now - last_out >= keepalive or now - last_in >= keepalive:
                    ping_at = now
                    self._send(wire.PINGREQ_PACKET)

    def _linger(self, sock: socket.socket) -> None:
        """After our DISCONNECT: end our side and read until the broker closes. Closing
        with unread bytes (messages it sent meanwhile) would reset the connection, and
        the broker would drop what it had not read yet: the last PUBACKs with it."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            deadline = min(self._close_by if self._stop.is_set() else math.inf,
                           time.monotonic() + 2.0)
            while (left := deadline - time.monotonic()) > 0:
                if select.select([sock], [], [], left)[0] and not sock.recv(READ_SIZE):
                    return

    def _handle(self, packets: list[tuple[int, bytes]]) -> bool:
        """Act on packets read; True if one was a PINGRESP."""
        v5, epoch, pong = self._v5, self._epoch, False
        deliveries: list[Delivery] = []
        acked: list[int] = []
        for first, body in packets:
            kind = first >> 4
            if kind == wire.PUBLISH:
                topic, payload, qos, retain, mid = wire.parse_publish(first, body, v5)
                deliveries.append(Delivery(Message(topic, payload, qos, retain), mid, epoch))
            elif kind == wire.PUBACK:
                acked.append(wire.parse_packet_id(body, "PUBACK"))
            elif kind == wire.PINGRESP:
                pong = True
            elif kind == wire.SUBACK:
                self._on_suback(*wire.parse_suback(body, v5))
            elif kind == wire.CONNACK:
                self._on_connack(*wire.parse_connack(body, v5))
                epoch = self._epoch
            else:  # DISCONNECT, the only other type the reader lets through
                code = wire.parse_disconnect(body)
                raise _Dropped(f"the broker disconnected: {wire.reason_text(code, v5)}")
        if deliveries:
            if not self._connected:
                raise wire.ProtocolError("PUBLISH before CONNACK")
            self._inbox.put_many(deliveries)
        if acked:
            with self._state:
                unacked = self._unacked
                for mid in acked:
                    message = unacked.pop(mid, None)
                    if message is not None:  # else a duplicate, or from before close()
                        message.done = True
                        self._in_flight -= 1
                self._fill_window()
                self._state.notify_all()
        return pong

    def _on_connack(self, session_present: bool, code: int, properties: dict[int, int]) -> None:
        if code:
            with self._state:
                self._last_error = (f"{self.url} refused the connection: "
                                    f"{wire.reason_text(code, self._v5)}")
            log.error("%s: %s", self.client_id, self._last_error)
            raise _Dropped(self._last_error)
        with self._state:
            if self._connected:
                raise wire.ProtocolError("a second CONNACK")
            self._epoch += 1
            self._connected = True
            self._up_since = time.monotonic()
            self._last_error = None
            self._keepalive = properties.get(wire.SERVER_KEEP_ALIVE, self._keepalive)
            self._window = min(self._max_inflight,
                               properties.get(wire.RECEIVE_MAXIMUM, self._max_inflight))
            # Always subscribe again, even when the broker kept the session:
            # it costs one packet and covers a broker that lost its state.
            wanted = list(self._wanted.items())
            if wanted:
                mid = self._new_id()
                self._out.append(wire.subscribe(mid, wanted, v5=self._v5))
                self._replaying = (mid, [f for f, _ in wanted])
            else:
                self._ready = True
            # What the last connection left without a PUBACK goes again, in order.
            self._in_flight = 0
            self._held = deque(self._unacked)
            self._fill_window()
            if self._birth is not None:
                self._queue(self._birth)
            self._state.notify_all()
        log.info("%s: connected to %s (session present: %s)", self.client_id, self.url,
                 session_present)

    def _on_suback(self, mid: int, codes: list[int]) -> None:
        with self._state:
            if self._replaying is not None and self._replaying[0] == mid:
                refused = [f for f, c in zip(self._replaying[1], codes, strict=False)
                           if c >= 0x80]
                if refused:
                    self._last_error = f"the broker refused the subscriptions {refused}"
                    log.error("%s: %s", self.client_id, self._last_error)
                self._replaying = None
                self._ready = True
            elif mid in self._subacks:
                self._subacks[mid] = codes
            self._state.notify_all()

    def _lost(self, reason: str) -> None:
        with self._state:
            if self._connected and not self._closing:
                self._last_error = f"connection lost: {reason}"
                log.warning("%s: %s", self.client_id, self._last_error)
            elif not self._connected and self._last_error is None:
                self._last_error = reason
            self._open = self._connected = self._ready = False
            self._replaying = None
            self._out, self._out_qos0 = [], []
            for mid, answer in self._subacks.items():
                if answer is None:
                    self._subacks[mid] = []
            self._state.notify_all()

    # --- the send side, under _state --------------------------------------------

    def _send(self, packet: bytes) -> None:
        with self._state:
            if self._open and not self._disconnecting:
                self._out.append(packet)
        self._wake()

    def _new_id(self) -> int:
        """A packet id no PUBLISH or SUBSCRIBE of ours is using."""
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._unacked and self._next_id not in self._subacks \
                    and (self._replaying is None or self._replaying[0] != self._next_id):
                return self._next_id
        raise MqttError("all 65535 packet ids are waiting for an answer")

    def _queue(self, m: Message) -> _Outgoing:
        """A message into the session: QoS 1 waits for a place in the window."""
        if m.qos:
            mid = self._new_id()
            out = _Outgoing(m.topic, wire.publish(m.topic, m.payload, 1, m.retain, mid,
                                                  v5=self._v5))
            self._unacked[mid] = out
            self._held.append(mid)
            if self._connected:
                self._fill_window()
        else:
            out = _Outgoing(m.topic, wire.publish(m.topic, m.payload, 0, m.retain, 0,
                                                  v5=self._v5))
            if self._connected and not self._disconnecting:
                self._out.append(out.packet)
                self._out_qos0.append(out)
        return out

    def _fill_window(self) -> None:
        held, unacked = self._held, self._unacked
        while held and self._in_flight < self._window and not self._disconnecting:
            out = unacked.get(held.popleft())
            if out is None:
                continue  # acknowledged meanwhile (a PUBACK for an earlier send)
            packet = out.packet
            self._out.append(packet if not out.sent else bytes([packet[0] | 0x08]) + packet[1:])
            out.sent = True
            self._in_flight += 1

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
        wire.subscribe(1, [(topic_filter, qos)], v5=self._v5)  # a bad filter or QoS fails here
        with self._state:
            self._wanted[topic_filter] = qos
            if not self._connected or self._disconnecting:
                return  # the next connect subscribes to everything wanted
            mid = self._new_id()
            self._out.append(wire.subscribe(mid, [(topic_filter, qos)], v5=self._v5))
            self._subacks[mid] = None
            self._awaiting += 1
            self._wake()
            self._state.wait_for(lambda: self._subacks[mid] is not None, timeout)
            self._awaiting -= 1
            answer = self._subacks.pop(mid)
            if answer is None:
                raise MqttTimeout(f"no SUBACK for {topic_filter!r} within {timeout:g} s")
            if answer and answer[0] >= 0x80:
                del self._wanted[topic_filter]
                raise MqttError(f"the broker refused the subscription {topic_filter!r}: "
                                f"{wire.reason_text(answer[0], True)}")

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
        sent = Sent(self, [], deadline, timeout, counted=True)
        try:
            # If the connection drops meanwhile, QoS 1 goes out after the reconnect.
            with self._state:
                sent.messages.extend(self._queue(m) for m in messages)
        except BaseException:
            sent.done()
            raise
        finally:
            self._wake()
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

        def wake() -> None:  # runs on the session's thread or close()'s
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
            if not self._connected or self._disconnecting:
                return
            # A PUBACK on a later connection could acknowledge another
            # message with the same id. The broker redelivers this one.
            epoch, puback = self._epoch, wire.puback
            acks = b"".join([puback(d.mid) for d in deliveries
                             if d.epoch == epoch and d.message.qos])
            if not acks:
                return
            self._out.append(acks)
        self._wake()
