"""The MQTT session against a real Mosquitto on loopback: delivery, wills, reconnects."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.mqtt import BackoffPolicy, Message, MqttError, MqttTimeout, Session
from contract import protocol
from mosquitto import Mosquitto, free_port, mosquitto  # noqa: F401  (mosquitto: the fixture)

FAST = BackoffPolicy(initial=0.05, maximum=0.5)
PROTOCOLS = pytest.mark.parametrize("version", ["3.1.1", "5"])


def session(broker: Mosquitto, client_id: str, **options: Any) -> Session:
    return Session(broker.url, client_id=client_id, backoff=FAST, **options)


def take(s: Session, count: int, timeout: float = 10) -> list[Message]:
    return [s.get(timeout) for _ in range(count)]


def eventually(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- configuration ------------------------------------------------------------


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = BackoffPolicy(initial=1, maximum=10, multiplier=2, jitter=0.5)
    assert [policy.delay(n, rand=lambda: 0) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay(3, rand=lambda: 1) == 4  # at most half of 8 taken off
    assert policy.delay(100_000, rand=lambda: 0) == 10
    for bad in [{"initial": 0}, {"initial": 5, "maximum": 1}, {"jitter": 1}, {"multiplier": 0.5}]:
        with pytest.raises(ValueError, match="backoff needs"):
            BackoffPolicy(**bad)


@pytest.mark.parametrize("url, options, complaint", [
    ("http://127.0.0.1:1883", {}, "is not mqtt://HOST"),
    ("mqtt://user:secret@127.0.0.1", {}, "give credentials as username/password"),
    ("mqtt://127.0.0.1", {"client_id": ""}, "needs a fixed client id"),
    ("mqtt://127.0.0.1", {"protocol": "4"}, "protocol must be"),
    ("mqtt://127.0.0.1", {"inbox_size": 0}, "inbox_size must be"),
])
def test_bad_configuration_fails_when_the_session_is_built(
        url: str, options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        Session(url, **{"client_id": "dev-1", **options})


# --- delivery -----------------------------------------------------------------


@PROTOCOLS
def test_publish_and_receive(mosquitto: Mosquitto, version: str) -> None:
    topic = protocol.reported_topic("dev-1")
    with session(mosquitto, "hub", subscriptions=protocol.HUB_SUBSCRIPTIONS,
                 protocol=version) as hub, \
            session(mosquitto, "dev-1", protocol=version) as device:
        hub.wait_connected(5)
        device.publish(topic, b"report 1")
        device.publish(topic, b"report 2", qos=0)
        assert take(hub, 2) == [Message(topic, b"report 1"), Message(topic, b"report 2", qos=0)]
        assert hub.connected and device.connected
        with pytest.raises(MqttTimeout, match="no message within 0.1 s"):
            hub.get(0.1)


def test_retained_desired_state_is_delivered_on_subscribe(mosquitto: Mosquitto) -> None:
    with session(mosquitto, "hub") as hub:
        hub.publish(protocol.desired_topic("dev-1"), b"signed state", retain=True)
    with session(mosquitto, "dev-1",
                 subscriptions=protocol.device_subscriptions("dev-1")) as device:
        assert device.get(5) == Message(protocol.desired_topic("dev-1"), b"signed state",
                                        retain=True)


def test_subscribe_while_connected_waits_for_the_suback(mosquitto: Mosquitto) -> None:
    with session(mosquitto, "dev-1") as device, session(mosquitto, "hub") as hub:
        device.wait_connected(5)
        device.subscribe("edgefleet/v1/devices/dev-1/commands")
        hub.publish("edgefleet/v1/devices/dev-1/commands", b"restart")  # no sleep needed
        assert device.get(5).payload == b"restart"


def test_a_burst_of_20000_qos1_messages_arrives_complete(mosquitto: Mosquitto) -> None:
    """More than Mosquitto's default max_queued_messages (1000) wait for a consumer
    that only starts reading after the burst."""
    topic = protocol.telemetry_topic("dev-1")
    with session(mosquitto, "hub", subscriptions=[topic]) as hub, \
            session(mosquitto, "dev-1") as device:
        hub.wait_connected(5)

        def send(first: int) -> None:
            for n in range(first, 20_000, 8):
                device.publish(topic, str(n).encode())

        senders = [threading.Thread(target=send, args=(k,)) for k in range(8)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        received = sorted(int(m.payload) for m in take(hub, 20_000))
        assert received == list(range(20_000))
        with pytest.raises(MqttTimeout):
            hub.get(0.2)  # and nothing twice


def test_a_consumer_can_publish_while_its_inbox_is_full(
        mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    topic = protocol.commands_topic("dev-1")
    with session(mosquitto, "dev-1", subscriptions=[topic], inbox_size=5) as device, \
            session(mosquitto, "hub") as hub:
        device.wait_connected(5)
        for n in range(300):
            hub.publish(topic, str(n).encode())
        first = device.get(5)
        # The PUBACK comes behind messages the full inbox has not read yet.
        device.publish(protocol.reported_topic("dev-1"), b"done", timeout=5)
        rest = take(device, 299)
    assert [int(m.payload) for m in [first, *rest]] == list(range(300))
    assert "inbox full (5 messages): reading from the broker paused" in caplog.text


# --- status: birth, will, goodbye -----------------------------------------------

DOOMED = """
import sys, time
from agent.mqtt import Message, Session
url, topic = sys.argv[1], sys.argv[2]
s = Session(url, client_id="doomed", will=Message(topic, b"offline", retain=True),
            birth=Message(topic, b"online", retain=True))
s.start()
s.wait_connected(10)
print("connected", flush=True)
time.sleep(60)
"""


def test_the_last_will_says_offline_when_the_client_dies(mosquitto: Mosquitto) -> None:
    status = protocol.status_topic("doomed")
    with session(mosquitto, "hub", subscriptions=[status]) as hub:
        child = subprocess.Popen([sys.executable, "-c", DOOMED, mosquitto.url, status],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "connected\n"
            assert hub.get(5).payload == protocol.ONLINE
            child.kill()  # SIGKILL: no DISCONNECT, the broker sees the socket die
        finally:
            child.kill()
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
        assert hub.get(5) == Message(status, protocol.OFFLINE)
    with session(mosquitto, "late", subscriptions=[status]) as late:  # and it is retained
        assert late.get(5) == Message(status, protocol.OFFLINE, retain=True)


def test_close_says_offline_itself(mosquitto: Mosquitto) -> None:
    """A clean DISCONNECT makes the broker drop the will, so close() publishes it."""
    status = protocol.status_topic("dev-1")
    device = session(mosquitto, "dev-1", will=Message(status, protocol.OFFLINE, retain=True),
                     birth=Message(status, protocol.ONLINE, retain=True))
    with session(mosquitto, "hub", subscriptions=[status]) as hub:
        with device:
            assert hub.get(5).payload == protocol.ONLINE
        assert hub.get(5).payload == protocol.OFFLINE


# --- broker gone ----------------------------------------------------------------


def test_publish_times_out_while_there_is_no_broker() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with Session(url, client_id="dev-1", backoff=FAST) as device:
        with pytest.raises(MqttTimeout, match="not connected to .* after 0.3 s; last error: "
                                               "cannot connect to .*Connection refused"):
            device.wait_connected(0.3)
        with pytest.raises(MqttTimeout, match="cannot publish to x/y: not connected"):
            device.publish("x/y", b"1", timeout=0.3)


@PROTOCOLS
def test_after_the_broker_lost_everything_birth_and_subscriptions_come_back(
        mosquitto: Mosquitto, version: str) -> None:
    status, desired = protocol.status_topic("dev-1"), protocol.desired_topic("dev-1")
    with session(mosquitto, "dev-1", protocol=version, subscriptions=[desired],
                 birth=Message(status, protocol.ONLINE, retain=True)) as device:
        device.wait_connected(5)
        mosquitto.stop()
        # Not connected, or connected to a broker that is gone and not noticed yet.
        with pytest.raises(MqttTimeout, match="cannot publish|no PUBACK"):
            device.publish(protocol.reported_topic("dev-1"), b"{}", timeout=0.3)
        assert eventually(lambda: not device.connected)
        mosquitto.start(fresh=True)  # no retained messages, no sessions
        device.wait_connected(10)    # reconnected by itself
        with session(mosquitto, "hub", subscriptions=[status]) as hub:
            # Only a new birth message can have put this here.
            assert hub.get(5) == Message(status, protocol.ONLINE, retain=True)
            hub.publish(desired, b"generation 18")
        assert device.get(5).payload == b"generation 18"


@PROTOCOLS
def test_messages_sent_while_a_device_was_offline_arrive_when_it_is_back(
        mosquitto: Mosquitto, version: str) -> None:
    commands = protocol.commands_topic("dev-1")
    device = session(mosquitto, "dev-1", protocol=version, subscriptions=[commands])
    with device:
        device.wait_connected(5)
    with session(mosquitto, "hub", protocol=version) as hub:
        for n in range(100):
            hub.publish(commands, str(n).encode())
    mosquitto.restart()  # the broker's saved state keeps the queue
    with device:         # a Session can be started again
        assert [int(m.payload) for m in take(device, 100)] == list(range(100))


def test_messages_not_taken_before_close_come_again(mosquitto: Mosquitto) -> None:
    """Acknowledged when taken: what sat in the inbox was never acknowledged."""
    commands = protocol.commands_topic("dev-1")
    device = session(mosquitto, "dev-1", subscriptions=[commands])
    with device, session(mosquitto, "hub") as hub:
        device.wait_connected(5)
        for n in range(10):
            hub.publish(commands, str(n).encode())
        assert [int(m.payload) for m in take(device, 3)] == [0, 1, 2]
    with device:
        again = []
        while not again or again[-1] != 9:
            again.append(int(device.get(10).payload))
    # At least once: reconnecting within milliseconds, Mosquitto may take the
    # session over before it has read the old connection's last PUBACKs.
    assert [n for n in again if n > 2] == list(range(3, 10))


# --- lifecycle and asyncio --------------------------------------------------------


def test_a_session_is_not_re_entrant(mosquitto: Mosquitto) -> None:
    device = session(mosquitto, "dev-1")
    with device:
        with pytest.raises(MqttError, match="already running; a Session is not re-entrant"):
            device.__enter__()
    with pytest.raises(MqttError, match="is not running"):
        device.wait_connected(1)
    device.close()  # closing twice is fine


def test_closing_ends_iteration_and_get(mosquitto: Mosquitto) -> None:
    device = session(mosquitto, "dev-1", subscriptions=["a/b"])
    seen: list[Message] = []
    with device:
        reader = threading.Thread(target=lambda: seen.extend(device.messages()))
        reader.start()
        with session(mosquitto, "hub") as hub:
            device.wait_connected(5)
            hub.publish("a/b", b"1")
        assert eventually(lambda: bool(seen))
    reader.join(5)
    assert not reader.is_alive() and [m.payload for m in seen] == [b"1"]
    with pytest.raises(MqttError, match="is closed"):
        device.get(1)


def test_asyncio_consumers_iterate_without_losing_a_message_on_cancel(
        mosquitto: Mosquitto) -> None:
    topic = protocol.telemetry_topic("dev-1")

    async def main(hub: Session, device: Session) -> list[bytes]:
        async def first() -> Message:
            async for message in hub.amessages():
                return message
            raise AssertionError("the iteration ended")

        waiting = asyncio.create_task(first())
        await asyncio.sleep(0.1)
        waiting.cancel()  # while it waits: nothing may be taken out of the inbox
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.to_thread(device.publish, topic, b"1")
        await asyncio.to_thread(device.publish, topic, b"2")
        got = []
        async for message in hub.amessages():
            got.append(message.payload)
            if len(got) == 2:
                break
        return got

    with session(mosquitto, "hub", subscriptions=[topic]) as hub, \
            session(mosquitto, "dev-1") as device:
        hub.wait_connected(5)
        assert asyncio.run(main(hub, device)) == [b"1", b"2"]


def test_the_loggers_say_what_happened(mosquitto: Mosquitto,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgefleet.mqtt")
    with session(mosquitto, "dev-1") as device:
        device.wait_connected(5)
        mosquitto.restart()
        device.wait_connected(10)
    assert "dev-1: connected to mqtt://127.0.0.1" in caplog.text
    assert "dev-1: connection lost" in caplog.text
    assert "dev-1: reconnecting to" in caplog.text


def test_taken_in_batches_and_acknowledged_after_the_write(mosquitto: Mosquitto) -> None:
    """take_many/ack_many (the hub's ingest): in order, at most as many as asked; what
    was taken and not acknowledged before close comes again."""
    commands = protocol.commands_topic("dev-1")
    device = session(mosquitto, "dev-1", subscriptions=[commands])
    with device, session(mosquitto, "hub") as hub:
        device.wait_connected(5)
        hub.publish_many([Message(commands, str(n).encode()) for n in range(10)])
        taken: list[Any] = []
        while len(taken) < 10:
            taken += device.take_many(4, 10)
            assert len(taken) <= 10
        assert [int(d.message.payload) for d in taken] == list(range(10))
        device.ack_many(taken[:5])
        with pytest.raises(MqttTimeout):
            device.take_many(4, 0.1)
    with device:
        again: list[int] = []
        while not again or again[-1] != 9:
            again += [int(d.message.payload) for d in device.take_many(10, 10)]
    # At least once (see above): 5..9 come again, maybe some of 0..4 too.
    assert [n for n in again if n > 4] == list(range(5, 10))


def test_a_broker_that_breaks_the_protocol_is_dropped_and_connected_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """Not Mosquitto (it would not do this): a listener that answers CONNECT with a
    CONNACK and then a PUBLISH at QoS 3. The session says why, drops the connection,
    and connects again."""
    import socket

    caplog.set_level(logging.INFO, logger="edgefleet.mqtt")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connects: list[bytes] = []

    def broker() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                connects.append(conn.recv(4096))
                conn.sendall(b"\x20\x02\x00\x00" + b"\x36\x05\x00\x01t\x00\x01")
                conn.recv(4096)  # until the client closes it

    thread = threading.Thread(target=broker, daemon=True)
    thread.start()
    with Session(f"mqtt://127.0.0.1:{port}", client_id="dev-1", backoff=FAST):
        thread.join(10)
    listener.close()
    assert len(connects) == 2 and all(c.startswith(b"\x10") for c in connects)
    assert "dev-1: connection lost: the broker broke the protocol: PUBLISH at QoS 3" \
        in caplog.text


def test_acknowledgements_just_before_close_reach_the_broker(mosquitto: Mosquitto) -> None:
    """Closing while the broker still sends: the last PUBACKs are not lost with the
    connection (a socket closed with unread bytes is reset, and the broker would drop
    what it had not read yet), so nothing that was acknowledged comes again."""
    topic = protocol.telemetry_topic("dev-1")
    with session(mosquitto, "hub", subscriptions=[topic]) as hub:
        hub.wait_connected(5)
    with session(mosquitto, "dev-1") as device:
        device.publish_many([Message(topic, str(n).encode()) for n in range(3000)], timeout=30)
    taken = 0
    with session(mosquitto, "hub", subscriptions=[topic], inbox_size=100) as hub:
        while taken < 3000:
            batch = hub.take_many(100, 10)
            hub.ack_many(batch)
            taken += len(batch)
    with session(mosquitto, "hub", subscriptions=[topic]) as hub:
        hub.wait_connected(5)
        with pytest.raises(MqttTimeout):
            hub.get(1)
