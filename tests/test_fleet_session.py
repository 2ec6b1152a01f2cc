"""What the hub's fleet link needs from agent.mqtt.Session beyond get/publish, on Mosquitto:
acknowledging only once a message is safe, and publishing a batch in one go."""

from __future__ import annotations

import pytest

from agent.mqtt import BackoffPolicy, Message, MqttTimeout, Session
from contract import protocol
from mosquitto import Mosquitto, mosquitto  # noqa: F401  (mosquitto: the fixture)

FAST = BackoffPolicy(initial=0.05, maximum=0.5)
TOPIC = protocol.telemetry_topic("dev-1")


def test_a_message_taken_but_not_acknowledged_comes_again(mosquitto: Mosquitto) -> None:
    with Session(mosquitto.url, client_id="dev-1", backoff=FAST) as device:
        hub = Session(mosquitto.url, client_id="hub", subscriptions=[TOPIC], backoff=FAST)
        hub.start()
        hub.wait_connected(5)
        device.publish(TOPIC, b"1")
        device.publish(TOPIC, b"2")
        first, second = hub.take(5), hub.take(5)
        hub.ack(first)
        hub.close()  # "crashed" before the second was committed
        hub.start()
        again = hub.take(5)
        assert again.message.payload == b"2"
        hub.ack(again)
        with pytest.raises(MqttTimeout):
            hub.take(0.5)
        hub.close()
        assert second.message.payload == b"2"


def test_publish_many_puts_a_batch_in_flight_and_waits_for_every_puback(
        mosquitto: Mosquitto) -> None:
    batch = [Message(protocol.desired_topic(f"dev-{n}"), str(n).encode(), retain=True)
             for n in range(500)]
    with Session(mosquitto.url, client_id="hub", backoff=FAST) as hub:
        hub.publish_many(batch, timeout=30)
        hub.publish_many([])
    with Session(mosquitto.url, client_id="dev-7", backoff=FAST,
                 subscriptions=[protocol.desired_topic("dev-7")]) as device:
        assert device.get(5) == Message(protocol.desired_topic("dev-7"), b"7", retain=True)
    mosquitto.stop()
    with Session(mosquitto.url, client_id="hub", backoff=FAST) as hub, \
            pytest.raises(MqttTimeout, match="cannot publish to .* and 499 more: not connected"):
        hub.publish_many(batch, timeout=0.5)
