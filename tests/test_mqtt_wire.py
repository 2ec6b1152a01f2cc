"""The MQTT packet codec on its own: what it builds, what it reads, what it refuses.

The bytes expected here are worked out from the specs (MQTT 3.1.1 and 5.0),
not from the code; the session tests (test_mqtt.py) show it against Mosquitto,
and test_fleet_acl.py against paho-mqtt as an independent client."""

from __future__ import annotations

import pytest

from agent import mqtt_wire as wire


def test_remaining_length_uses_seven_bits_a_byte() -> None:
    # MQTT 3.1.1 section 2.2.3's table of boundaries.
    for n, encoded in [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
                       (16_384, b"\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f")]:
        assert wire.encode_length(n) == encoded
    with pytest.raises(ValueError):
        wire.encode_length(268_435_456)


def test_connect_for_3_1_1_says_what_the_spec_says() -> None:
    packet = wire.connect("dev-1", v5=False, keepalive=30, clean=False, username="u",
                          password="p", will=("devices/dev-1/status", b"offline", 1, True))
    body = (b"\x00\x04MQTT\x04" + bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x04]) + b"\x00\x1e"
            + b"\x00\x05dev-1" + b"\x00\x14devices/dev-1/status\x00\x07offline"
            + b"\x00\x01u\x00\x01p")
    assert packet == b"\x10" + bytes([len(body)]) + body


def test_connect_for_5_carries_session_expiry_and_receive_maximum() -> None:
    packet = wire.connect("d", v5=True, keepalive=0, clean=False, session_expiry=3600,
                          receive_maximum=1000, maximum_packet_size=2**21)
    props = b"\x11\x00\x00\x0e\x10" + b"\x21\x03\xe8" + b"\x27\x00\x20\x00\x00"
    body = b"\x00\x04MQTT\x05\x00\x00\x00" + bytes([len(props)]) + props + b"\x00\x01d"
    assert packet == b"\x10" + bytes([len(body)]) + body


def test_builders_refuse_what_mqtt_does_not_allow() -> None:
    with pytest.raises(ValueError, match="topic name"):
        wire.publish("a/+/b", b"", 1, False, 1, v5=False)
    with pytest.raises(ValueError, match="QoS 2"):
        wire.publish("a", b"", 2, False, 1, v5=False)
    with pytest.raises(ValueError, match="packet id"):
        wire.publish("a", b"", 1, False, 0, v5=False)
    with pytest.raises(ValueError, match="packet id"):
        wire.puback(65536)
    with pytest.raises(ValueError, match="cannot subscribe"):
        wire.subscribe(1, [("a/#", 2)], v5=False)
    with pytest.raises(ValueError, match="65535"):
        wire.publish("t" * 70_000, b"", 0, False, 0, v5=False)
    with pytest.raises(ValueError, match="password only with a user name"):
        wire.connect("d", v5=False, keepalive=30, clean=False, password="p")


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("qos, retain", [(0, False), (1, True)])
def test_a_publish_reads_back_as_it_was_built(v5: bool, qos: int, retain: bool) -> None:
    payload = bytes(range(256)) * 3  # long enough for a two-byte remaining length
    packet = wire.publish("devices/dév-1/report", payload, qos, retain, 513, v5=v5)
    [(first, body)] = wire.Reader().feed(packet)
    assert wire.parse_publish(first, body, v5) == (
        "devices/dév-1/report", payload, qos, retain, 513 if qos else 0)


def test_a_resend_carries_dup_and_reads_the_same() -> None:
    packet = wire.publish("t", b"x", 1, False, 7, v5=False, dup=True)
    assert packet[0] == 0x3A
    [(first, body)] = wire.Reader().feed(packet)
    assert wire.parse_publish(first, body, False) == ("t", b"x", 1, False, 7)


def test_the_reader_reassembles_packets_however_the_stream_is_cut() -> None:
    stream = b"".join([
        b"\x20\x02\x01\x00",                                   # CONNACK, session present
        wire.publish("a", b"1" * 300, 1, False, 1, v5=False),  # as the broker would send it
        b"\x40\x02\x00\x05",                                   # PUBACK 5
        b"\x90\x03\x00\x02\x01",                               # SUBACK 2: QoS 1 granted
        b"\xd0\x00",                                           # PINGRESP
    ])
    whole = wire.Reader().feed(stream)
    assert [first >> 4 for first, _ in whole] == [wire.CONNACK, wire.PUBLISH, wire.PUBACK,
                                                  wire.SUBACK, wire.PINGRESP]
    reader = wire.Reader()
    in_bytes = [p for i in range(len(stream)) for p in reader.feed(stream[i:i + 1])]
    assert in_bytes == whole and reader.pending == 0
    assert wire.parse_connack(whole[0][1], False) == (True, 0, {})
    assert wire.parse_packet_id(whole[2][1], "PUBACK") == 5
    assert wire.parse_suback(whole[3][1], False) == (2, [1])


def test_a_truncated_packet_waits_and_shows_as_pending() -> None:
    reader = wire.Reader()
    assert reader.feed(b"\x30\x80") == []       # the length is not all here yet
    assert reader.feed(b"\x01\x00\x01t") == []  # 128 bytes announced, 3 here
    assert reader.pending == 6


@pytest.mark.parametrize("stream, complaint", [
    (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
    (b"\x30\xff\xff\xff\x7f", "over the"),                      # 256 MiB announced
    (b"\x10\x00", "type 1 is not one a client receives"),     # a CONNECT
    (b"\x00\x00", "type 0"),
    (b"\xf0\x00", "type 15"),                                 # AUTH: we never ask for it
    (b"\x50\x02\x00\x01", "type 5"),                          # PUBREC: QoS 2
    (b"\x42\x02\x00\x01", "flags"),                           # PUBACK with flags 0010
    (b"\x92\x03\x00\x01\x00", "flags"),
])
def test_the_reader_refuses_malformed_streams(stream: bytes, complaint: str) -> None:
    with pytest.raises(wire.ProtocolError, match=complaint):
        wire.Reader().feed(stream)


def test_the_reader_refuses_an_oversized_packet_before_it_arrives() -> None:
    with pytest.raises(wire.ProtocolError, match="1025-byte packet is over the 1024-byte"):
        wire.Reader(limit=1024).feed(b"\x30\x81\x08")


@pytest.mark.parametrize("first, body, complaint", [
    (0x36, b"\x00\x01t\x00\x01", "QoS 3"),
    (0x34, b"\x00\x01t\x00\x01", "QoS 2"),
    (0x30, b"\x00", "without a topic"),
    (0x30, b"\x00\x09abc", "shorter than its topic"),
    (0x32, b"\x00\x01t\x00", "shorter than its topic and packet id"),
    (0x32, b"\x00\x01t\x00\x00", "packet id 0"),
    (0x30, b"\x00\x02\xff\xfe", "not UTF-8"),
    (0x30, b"\x00\x00payload", "without a topic name"),
])
def test_a_malformed_publish_is_refused(first: int, body: bytes, complaint: str) -> None:
    with pytest.raises(wire.ProtocolError, match=complaint):
        wire.parse_publish(first, body, False)


def test_mqtt5_properties_are_read_or_skipped_and_checked() -> None:
    # CONNACK: session present, success, Receive Maximum 10, Server Keep Alive 60,
    # an assigned client id and a user property, which we skip.
    props = (b"\x21\x00\x0a" + b"\x13\x00\x3c" + b"\x12\x00\x02id"
             + b"\x26\x00\x01k\x00\x01v")
    body = b"\x01\x00" + bytes([len(props)]) + props
    assert wire.parse_connack(body, True) == (True, 0, {0x21: 10, 0x13: 60})
    # A PUBLISH with a content type property before its payload.
    publish = b"\x00\x01t\x00\x09" + b"\x05\x03\x00\x02js" + b"{}"
    assert wire.parse_publish(0x32, publish, True) == ("t", b"{}", 1, False, 9)
    with pytest.raises(wire.ProtocolError, match="unknown property 0x7f"):
        wire.parse_connack(b"\x00\x00\x01\x7f", True)
    with pytest.raises(wire.ProtocolError, match="run past"):
        wire.parse_connack(b"\x00\x00\x05\x21\x00", True)
    with pytest.raises(wire.ProtocolError, match="runs past its block"):
        wire.parse_connack(b"\x00\x00\x02\x11\x00\x00\x00\x00", True)
    # SUBACK: packet id, no properties, "not authorized".
    assert wire.parse_suback(b"\x00\x03\x00\x87", True) == (3, [0x87])


def test_connack_and_suback_must_have_their_shape() -> None:
    with pytest.raises(wire.ProtocolError, match="CONNACK of 3 bytes"):
        wire.parse_connack(b"\x00\x00\x00", False)
    with pytest.raises(wire.ProtocolError, match="CONNACK flags"):
        wire.parse_connack(b"\x02\x00", False)
    with pytest.raises(wire.ProtocolError, match="without return codes"):
        wire.parse_suback(b"\x00\x01", False)
    with pytest.raises(wire.ProtocolError, match="shorter than a packet id"):
        wire.parse_packet_id(b"\x00", "PUBACK")
    assert wire.reason_text(5, False) == "not authorized (0x05)"
    assert wire.reason_text(0x8E, True) == "session taken over (0x8e)"
