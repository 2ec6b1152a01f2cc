"""MQTT 3.1.1 and 5 packets for a client: builders and an incremental reader.

Pure functions on bytes, no sockets and no state beyond the reader's buffer;
`agent.mqtt.Session` runs the connection. Written from the OASIS specs
(MQTT 3.1.1, section 2-3; MQTT 5.0, sections 2-3). What a client needs:
CONNECT, PUBLISH at QoS 0 and 1, PUBACK, SUBSCRIBE, PINGREQ and DISCONNECT
out; CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP and (MQTT 5) DISCONNECT in.
No QoS 2: the session neither sends nor subscribes at it.

Strict on what comes in: a packet this client must never receive, fixed
header flags the spec fixes otherwise, a remaining length over four bytes or
over the reader's limit, or a body shorter than its fields is a
`ProtocolError`, and the session drops the connection.

The hot path is the broker's PUBLISH: `Reader.feed` splits a read into
(first byte, body) pairs in one pass, and `parse_publish` takes one apart
with two slices and no intermediate objects.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

# Control packet types, in the first byte's high nibble (3.1.1 section 2.2.1).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBSCRIBE: Final = 8
SUBACK: Final = 9
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

MAX_REMAINING_LENGTH: Final = 268_435_455  # what four length bytes can say
# The protocol's biggest document (a telemetry batch) is 1 MiB; a larger
# packet is refused before it is buffered.
DEFAULT_LIMIT: Final = 2 * 2**20

# What a client may receive, with the low nibble the spec fixes (None: PUBLISH's
# flags are its DUP, QoS and RETAIN). PUBREC/PUBREL/PUBCOMP need QoS 2, which we
# never use, so they are as wrong here as a CONNECT.
_INCOMING_FLAGS: Final[dict[int, int | None]] = {
    CONNACK: 0, PUBLISH: None, PUBACK: 0, SUBACK: 0, PINGRESP: 0, DISCONNECT: 0,
}

_PUBACK: Final = struct.Struct(">BBH")
PINGREQ_PACKET: Final = bytes([PINGREQ << 4, 0])
DISCONNECT_PACKET: Final = bytes([DISCONNECT << 4, 0])  # also MQTT 5's "normal" (no reason code)

CONNACK_3: Final = {  # MQTT 3.1.1 section 3.2.2.3
    1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized",
}
REASONS_5: Final = {  # MQTT 5 section 2.4, the ones a client meets
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client id not valid", 0x86: "bad user name or password", 0x87: "not authorized",
    0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned",
    0x8B: "server shutting down", 0x8D: "keep alive timeout", 0x8E: "session taken over",
    0x8F: "topic filter invalid", 0x90: "topic name invalid", 0x93: "receive maximum exceeded",
    0x95: "packet too large", 0x97: "quota exceeded", 0x99: "payload format invalid",
    0x9C: "use another server", 0x9D: "server moved", 0x9F: "connection rate exceeded",
}

# MQTT 5 property identifiers we send or read, and the size of every value
# type, so that the ones we do not use can be skipped (section 2.2.2.2).
SESSION_EXPIRY: Final = 0x11
SERVER_KEEP_ALIVE: Final = 0x13
RECEIVE_MAXIMUM: Final = 0x21
MAXIMUM_PACKET_SIZE: Final = 0x27
_FIXED_SIZE: Final = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
}
_LENGTH_PREFIXED: Final = frozenset((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F))
_USER_PROPERTY: Final = 0x26   # a string pair
_SUBSCRIPTION_ID: Final = 0x0B  # a variable byte integer


class ProtocolError(ValueError):
    """The peer sent something the spec (or this client) does not allow."""


def reason_text(code: int, v5: bool) -> str:
    name = REASONS_5.get(code) if v5 else CONNACK_3.get(code)
    return f"{name or 'unknown'} (0x{code:02x})"


# --- building -------------------------------------------------------------------


def encode_length(n: int) -> bytes:
    """A variable byte integer: 7 bits a byte, least significant first, high bit = more."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{n} is outside 0..{MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"a {len(data)}-byte field; MQTT allows 65535")
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_length(len(body)) + body


def _check_id(packet_id: int) -> None:
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id} is outside 1..65535")


def connect(client_id: str, *, v5: bool, keepalive: int, clean: bool,
            username: str | None = None, password: str | None = None,
            will: tuple[str, bytes, int, bool] | None = None,
            session_expiry: int = 0, receive_maximum: int = 0,
            maximum_packet_size: int = 0) -> bytes:
    """CONNECT. WILL is (topic, payload, qos, retain). MQTT 5 sends SESSION_EXPIRY,
    RECEIVE_MAXIMUM and MAXIMUM_PACKET_SIZE when they are not 0 (0: the default; a
    broker does not send an MQTT 5 client packets over its maximum)."""
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError(f"keepalive {keepalive} is outside 0..65535 s")
    if password is not None and username is None and not v5:
        raise ValueError("MQTT 3.1.1 allows a password only with a user name")
    flags = 0x02 if clean else 0
    payload = _string(client_id.encode())
    if will is not None:
        topic, message, qos, retain = will
        _check_topic(topic)
        if qos not in (0, 1):
            raise ValueError(f"will QoS {qos}; this client uses 0 or 1")
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        payload += (b"\x00" if v5 else b"") + _string(topic.encode()) + _string(message)
    if username is not None:
        flags |= 0x80
        payload += _string(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _string(password.encode())
    header = _string(b"MQTT") + bytes([5 if v5 else 4, flags]) + keepalive.to_bytes(2, "big")
    if v5:
        props = b""
        if session_expiry:
            props += bytes([SESSION_EXPIRY]) + session_expiry.to_bytes(4, "big")
        if receive_maximum:
            props += bytes([RECEIVE_MAXIMUM]) + receive_maximum.to_bytes(2, "big")
        if maximum_packet_size:
            props += bytes([MAXIMUM_PACKET_SIZE]) + maximum_packet_size.to_bytes(4, "big")
        header += encode_length(len(props)) + props
    return _packet(CONNECT << 4, header + payload)


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"{topic!r} is not a topic name to publish to")


def publish(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int, *,
            v5: bool, dup: bool = False) -> bytes:
    """PUBLISH; PACKET_ID is used at QoS 1 only. DUP marks a resend after reconnecting."""
    _check_topic(topic)
    if qos not in (0, 1):
        raise ValueError(f"QoS {qos}; this client publishes at 0 or 1")
    first = PUBLISH << 4 | qos << 1 | (0x01 if retain else 0) | (0x08 if dup and qos else 0)
    variable = _string(topic.encode())
    if qos:
        _check_id(packet_id)
        variable += packet_id.to_bytes(2, "big")
    if v5:
        variable += b"\x00"  # no properties
    return _packet(first, variable + payload)


def puback(packet_id: int) -> bytes:
    """PUBACK; in MQTT 5 too, where a missing reason code means success."""
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id} is outside 1..65535")
    return _PUBACK.pack(PUBACK << 4, 2, packet_id)


def subscribe(packet_id: int, filters: Sequence[tuple[str, int]], *, v5: bool) -> bytes:
    """SUBSCRIBE to (topic filter, qos) pairs, in one packet."""
    _check_id(packet_id)
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    body = packet_id.to_bytes(2, "big") + (b"\x00" if v5 else b"")
    for topic_filter, qos in filters:
        if not topic_filter or qos not in (0, 1):
            raise ValueError(f"cannot subscribe to {topic_filter!r} at QoS {qos}")
        body += _string(topic_filter.encode()) + bytes([qos])
    return _packet(SUBSCRIBE << 4 | 0x02, body)  # bits 3-0 fixed at 0010


# --- reading --------------------------------------------------------------------


class Reader:
    """Splits a byte stream into packets, however the reads cut it up."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._buffer = bytearray()
        self._limit = limit

    @property
    def pending(self) -> int:
        """Bytes of a packet not complete yet (at end of stream: a truncated one)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """(first byte, body) of every packet DATA completes, in order."""
        buffer = self._buffer
        buffer += data
        packets: list[tuple[int, bytes]] = []
        start, end = 0, len(buffer)
        with memoryview(buffer) as view:  # one copy a body, and released before the del
            start = self._split(buffer, view, start, end, packets)
        if start:
            del buffer[:start]
        return packets

    def _split(self, buffer: bytearray, view: memoryview, start: int, end: int,
               packets: list[tuple[int, bytes]]) -> int:
        """Append the complete packets from START to PACKETS; where the rest begins."""
        while end - start >= 2:
            first = buffer[start]
            # The remaining length, inline: one byte for anything under 128.
            length = buffer[start + 1]
            at = start + 2
            if length & 0x80:
                length &= 0x7F
                shift = 7
                while True:
                    if at == end:  # the length itself is not all here yet
                        length = -1
                        break
                    digit = buffer[at]
                    at += 1
                    length |= (digit & 0x7F) << shift
                    if not digit & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("remaining length is longer than four bytes")
                if length < 0:
                    break
            kind = first >> 4
            flags = _INCOMING_FLAGS.get(kind, -1)
            if flags == -1:
                raise ProtocolError(f"packet type {kind} is not one a client receives")
            if flags is not None and first & 0x0F != flags:
                raise ProtocolError(f"packet type {kind} with flags {first & 0x0F:#06b}")
            if length > self._limit:
                raise ProtocolError(f"a {length}-byte packet is over the {self._limit}-byte "
                                    "limit")
            if end - at < length:
                break
            packets.append((first, view[at:at + length].tobytes()))
            start = at + length
        return start


def parse_publish(first: int, body: bytes, v5: bool) -> tuple[str, bytes, int, bool, int]:
    """(topic, payload, qos, retain, packet id; 0 at QoS 0) of a PUBLISH."""
    qos = first >> 1 & 0x03
    if qos > 1:
        raise ProtocolError(f"PUBLISH at QoS {qos}; this client subscribes at 0 or 1")
    if len(body) < 2:
        raise ProtocolError("PUBLISH without a topic")
    topic_end = at = 2 + (body[0] << 8 | body[1])
    packet_id = 0
    if qos:
        if len(body) < at + 2:
            raise ProtocolError("PUBLISH shorter than its topic and packet id")
        packet_id = body[at] << 8 | body[at + 1]
        if not packet_id:
            raise ProtocolError("QoS 1 PUBLISH with packet id 0")
        at += 2
    elif len(body) < at:
        raise ProtocolError("PUBLISH shorter than its topic")
    if v5:
        at = _skip_properties(body, at)
    try:
        topic = body[2:topic_end].decode()
    except UnicodeDecodeError:
        raise ProtocolError("PUBLISH topic is not UTF-8") from None
    if not topic:  # a topic alias, which we never allow (Topic Alias Maximum 0)
        raise ProtocolError("PUBLISH without a topic name")
    return topic, body[at:], qos, bool(first & 0x01), packet_id


def parse_packet_id(body: bytes, what: str) -> int:
    """The packet id that starts a PUBACK or SUBACK (MQTT 5 may add a reason code)."""
    if len(body) < 2:
        raise ProtocolError(f"{what} shorter than a packet id")
    return body[0] << 8 | body[1]


def parse_connack(body: bytes, v5: bool) -> tuple[bool, int, dict[int, int]]:
    """(session present, return/reason code, the MQTT 5 integer properties)."""
    if len(body) < 2 or (not v5 and len(body) != 2):
        raise ProtocolError(f"CONNACK of {len(body)} bytes")
    if body[0] & 0xFE:
        raise ProtocolError(f"CONNACK flags {body[0]:#04x}")
    properties: dict[int, int] = {}
    if v5 and len(body) > 2:
        _skip_properties(body, 2, properties)
    return bool(body[0] & 0x01), body[1], properties


def parse_suback(body: bytes, v5: bool) -> tuple[int, list[int]]:
    """(packet id, a return/reason code per filter: 0-2 granted QoS, >= 0x80 refused)."""
    packet_id = parse_packet_id(body, "SUBACK")
    at = _skip_properties(body, 2) if v5 else 2
    if at >= len(body):
        raise ProtocolError("SUBACK without return codes")
    return packet_id, list(body[at:])


def parse_disconnect(body: bytes) -> int:
    """The reason code of a broker's MQTT 5 DISCONNECT (0 if it has none)."""
    return body[0] if body else 0


def _skip_properties(body: bytes, at: int, into: dict[int, int] | None = None) -> int:
    """The index after the property block at AT; integer properties go INTO."""
    length, shift = 0, 0
    while True:
        if at >= len(body) or shift > 21:
            raise ProtocolError("bad property length")
        digit = body[at]
        at += 1
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    end = at + length
    if end > len(body):
        raise ProtocolError("properties run past the packet")
    while at < end:
        ident = body[at]
        at += 1
        if (size := _FIXED_SIZE.get(ident)) is not None:
            if into is not None:
                into[ident] = int.from_bytes(body[at:at + size], "big")
            at += size
        elif ident in _LENGTH_PREFIXED:
            at += 2 + int.from_bytes(body[at:at + 2], "big")
        elif ident == _USER_PROPERTY:
            for _ in range(2):
                at += 2 + int.from_bytes(body[at:at + 2], "big")
        elif ident == _SUBSCRIPTION_ID:
            while at < end and body[at] & 0x80:
                at += 1
            at += 1
        else:
            raise ProtocolError(f"unknown property {ident:#04x}")
        if at > end:
            raise ProtocolError(f"property {ident:#04x} runs past its block")
    return end
