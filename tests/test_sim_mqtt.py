"""The simulator's asyncio MQTT 3.1.1 client against a real Mosquitto (its packets are
agent/mqtt_wire.py's: tests/test_mqtt_wire.py)."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import bench.harness as mosquitto_fixture  # the module whose CONFIG starts the broker
from agent.mqtt import Message, MqttError, MqttTimeout
from agent.sim.mqtt_lite import (
    Client,
    ConnectionLost,
    ConnectionRefused,
    ConnectOptions,
    parse_url,
)
from mosquitto import Mosquitto, free_port, mosquitto, start_mosquitto  # noqa: F401  (fixture)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def client(broker: Mosquitto, client_id: str, inbox: list[Message] | None = None,
           **options: Any) -> Client:
    host, port = parse_url(broker.url)
    return Client(host, port, ConnectOptions(client_id, **options),
                  on_message=inbox.append if inbox is not None else lambda m: None)


def test_subscribe_and_qos_1_and_0_both_ways(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        got_a: list[Message] = []
        got_b: list[Message] = []
        async with client(mosquitto, "a", got_a) as a, client(mosquitto, "b", got_b) as b:
            assert await a.subscribe([("to-a/#", 1)]) == [1]
            assert await b.subscribe([("to-b", 1), ("to-b/zero", 0)]) == [1, 0]
            await b.publish(Message("to-a/1", b"one", qos=1))
            await b.publish(Message("to-a/2", b"two", qos=0))
            await a.publish(Message("to-b", b"\x00" * 70_000, qos=1))  # a 3-byte length
            await a.publish(Message("to-b/zero", b"z", qos=1))
            await until(lambda: len(got_a) == 2 and len(got_b) == 2)
            assert sorted(got_a, key=lambda m: m.topic) == [
                Message("to-a/1", b"one", 1), Message("to-a/2", b"two", 0)]
            assert got_b == [Message("to-b", b"\x00" * 70_000, 1), Message("to-b/zero", b"z", 0)]
        assert not a.connected and await a.wait_closed() is None
    run(body)


def test_retained_messages_arrive_on_subscribe_flagged(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        async with client(mosquitto, "pub") as pub:
            await pub.publish(Message("state/x", b"kept", retain=True))
        got: list[Message] = []
        async with client(mosquitto, "sub", got) as sub:
            await sub.subscribe([("state/#", 1)])
            await until(lambda: len(got) == 1)
            async with client(mosquitto, "pub2") as pub:
                await pub.publish(Message("state/x", b"live", retain=True))
            await until(lambda: len(got) == 2)
        # Retained on arrival because of the subscribe; live ones come without the flag.
        assert got == [Message("state/x", b"kept", 1, True), Message("state/x", b"live", 1, False)]
    run(body)


@pytest.fixture
def locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mosquitto]:
    """A Mosquitto that only lets in device-1 with password "secret"."""
    directory = tmp_path / "locked"
    directory.mkdir()
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(directory / "passwd"), "device-1",
                    "secret"], check=True, capture_output=True)
    monkeypatch.setattr(mosquitto_fixture, "CONFIG", mosquitto_fixture.CONFIG.replace(
        "allow_anonymous true", f"allow_anonymous false\npassword_file {directory}/passwd"))
    broker = start_mosquitto(directory)
    yield broker
    broker.stop()


def test_a_wrong_password_is_refused_with_the_brokers_code(locked: Mosquitto) -> None:
    async def body() -> None:
        for options in ({"username": "device-1", "password": "wrong"}, {}):
            refused = client(locked, "device-1", **options)
            with pytest.raises(ConnectionRefused, match="not authorized") as caught:
                await refused.connect()
            assert caught.value.code == 5 and not refused.connected
            assert isinstance(await refused.wait_closed(), ConnectionRefused)
        async with client(locked, "device-1", username="device-1", password="secret") as ok:
            assert ok.connected
    run(body)


def test_the_will_is_published_on_an_abrupt_close_only(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        seen: list[Message] = []
        will = Message("dev/status", b"offline", retain=True)
        async with client(mosquitto, "watcher", seen) as watcher:
            await watcher.subscribe([("dev/status", 1)])
            polite = client(mosquitto, "polite", will=will)
            await polite.connect()
            await polite.disconnect()
            crashing = client(mosquitto, "crashing", will=Message("dev/status", b"gone"))
            await crashing.connect()
            crashing.abort()
            assert isinstance(await crashing.wait_closed(), ConnectionLost)
            await until(lambda: len(seen) == 1)
            await asyncio.sleep(0.2)
        assert seen == [Message("dev/status", b"gone", 1, False)]
    run(body)


def test_a_persistent_session_keeps_subscriptions_and_messages(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        got: list[Message] = []
        first = client(mosquitto, "device", got, clean_session=False)
        assert await first.connect() is False  # nothing kept yet
        await first.subscribe([("for/device", 1)])
        await first.disconnect()
        async with client(mosquitto, "hub") as hub:
            await hub.publish(Message("for/device", b"while away"))
        again = client(mosquitto, "device", got, clean_session=False)
        assert await again.connect() is True  # the broker kept the session...
        await until(lambda: len(got) == 1)  # ...and the message, without a new subscribe
        assert got == [Message("for/device", b"while away", 1)]
        await again.disconnect()
    run(body)


def test_keepalive_pings_when_idle_and_notices_a_dead_broker(mosquitto: Mosquitto) -> None:
    assert mosquitto.process is not None
    pid = mosquitto.process.pid

    async def body() -> None:
        idle = client(mosquitto, "idle", keepalive=1)
        await idle.connect()
        await asyncio.sleep(3)  # Mosquitto drops a silent client after 1.5 keepalives
        assert idle.connected
        await idle.publish(Message("still/here", b"1"))
        paused = time.monotonic()
        os.kill(pid, signal.SIGSTOP)  # alive, but answering nothing
        try:
            reason = await asyncio.wait_for(idle.wait_closed(), 5)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert isinstance(reason, MqttTimeout) and "PINGRESP" in str(reason)
        assert time.monotonic() - paused < 2.5  # at most a keepalive and a half
    run(body)


def test_a_client_is_one_connection_and_says_why_it_failed(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        used = client(mosquitto, "once")
        await used.connect()
        with pytest.raises(MqttError, match="make a new one"):
            await used.connect()
        await used.disconnect()
        with pytest.raises(ConnectionLost, match="not connected"):
            await used.publish(Message("t", b"x"))
        nobody = Client("127.0.0.1", free_port(), ConnectOptions("lonely"))
        with pytest.raises(ConnectionLost, match="cannot connect"):
            await nobody.connect()
        with pytest.raises(ValueError, match="needs a client id"):
            ConnectOptions("", clean_session=False)
        with pytest.raises(ValueError, match="is not mqtt://"):
            parse_url("tcp://127.0.0.1:1883")
    run(body)


def test_a_thousand_qos_1_messages_each_way_on_one_connection(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        got: list[Message] = []
        async with client(mosquitto, "echo", got) as echo, client(mosquitto, "load") as load:
            await echo.subscribe([("load/#", 1)])
            payloads = [random.randbytes(random.randrange(1, 300)) for _ in range(1000)]
            await asyncio.gather(*(load.publish(Message(f"load/{i}", p))
                                   for i, p in enumerate(payloads)))
            await until(lambda: len(got) == 1000)
        assert sorted((int(m.topic[5:]), m.payload) for m in got) == list(enumerate(payloads))
    run(body)


def test_the_broker_going_away_closes_the_client(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        closed: list[BaseException | None] = []
        host, port = parse_url(mosquitto.url)
        c = Client(host, port, ConnectOptions("c"), on_close=closed.append)
        await c.connect()
        assert mosquitto.process is not None
        mosquitto.process.send_signal(signal.SIGKILL)
        reason = await asyncio.wait_for(c.wait_closed(), 5)
        assert isinstance(reason, ConnectionLost) and closed == [reason]
        mosquitto.process.wait()
        mosquitto.process = None
    run(body)


def test_connecting_during_a_broker_outage_leaves_no_unretrieved_future() -> None:
    """A simulated fleet retries its connections through an outage: each failed attempt
    must end quietly, not in 'Future exception was never retrieved' on the loop."""
    async def body() -> None:
        reported: list[str] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: reported.append(context["message"]))
        port = free_port()  # nothing listens: the broker is down
        for attempt in range(20):
            down = Client("127.0.0.1", port, ConnectOptions(f"outage-{attempt}"))
            with pytest.raises(ConnectionLost, match="cannot connect"):
                await down.connect()
            del down
        gc.collect()
        await asyncio.sleep(0)
        assert reported == []
    run(body)
