"""Mosquitto 2.0.11 and a failed login that presents a connected client's id.

The broker then unhooks the connected client from its index of clients by
id (hub/broker_config.py says more): the client stays connected, but its
persistent session is gone, and after the next reload its ACL pointer
dangles. These tests pin that behaviour down with the broker we ship, and
show that the hub's login, which no one can guess, is out of its reach."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.mqtt import MqttTimeout, Session
from bench.harness import free_port
from contract import protocol
from fleetdevice import FAST
from hub.broker import ManagedBroker, find_mosquitto
from hub.broker_config import HUB_USERNAME, BrokerConfig, hub_username
from hub.broker_logins import BrokerLogins

HUB_SECRET = "hub-secret"
DEVICE, TOKEN = "dev-victim", "efd_token"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ManagedBroker]:
    config = BrokerConfig(host="127.0.0.1", port=free_port(), directory=tmp_path / "broker",
                          max_queued_messages=1000, user=getpass.getuser())
    logins: list[BrokerLogins] = []
    managed = ManagedBroker(config, prepare=lambda: logins[0].write_all(),
                            on_restart=lambda: None, mosquitto=find_mosquitto())
    logins.append(BrokerLogins(config, hub_password=HUB_SECRET, devices=lambda: [DEVICE],
                               reload=managed.reload))
    managed.start()
    logins[0].add_device(DEVICE, TOKEN)
    yield managed
    managed.stop()


Login = tuple[str, str]  # user name, password
HUB: Login = (hub_username(HUB_SECRET), HUB_SECRET)
VICTIM_DEVICE: Login = (DEVICE, TOKEN)


def kept_while_offline(broker: ManagedBroker, victim: Login, topic: str, sender: Login,
                       client_id: str) -> bool:
    """Does VICTIM's session keep a message SENDER sends on TOPIC while the victim
    is offline, after a failed login presented CLIENT_ID while it was connected?"""
    session = Session(broker.url, client_id="anything", username=victim[0],
                      password=victim[1], subscriptions=[topic], backoff=FAST)
    with session:
        session.wait_connected(15)
        # Anonymous, so refused before the broker names it by a login.
        with Session(broker.url, client_id=client_id, backoff=FAST) as intruder, \
                pytest.raises(MqttTimeout, match="refused"):
            intruder.wait_connected(1)
    with Session(broker.url, client_id="sender", username=sender[0], password=sender[1],
                 backoff=FAST) as other:
        other.publish(topic, b"while away")  # not retained: only a kept session holds it
    with session:
        try:
            return session.get(5).payload == b"while away"
        except MqttTimeout:
            return False


def test_a_failed_login_with_a_connected_clients_id_loses_that_clients_session(
        broker: ManagedBroker) -> None:
    # The Mosquitto bug itself, on a login whose name (hence client id) is known.
    assert not kept_while_offline(broker, VICTIM_DEVICE, protocol.desired_topic(DEVICE), HUB,
                                  client_id=DEVICE)


def test_the_hubs_session_survives_a_failed_login_with_the_hubs_well_known_id(
        broker: ManagedBroker) -> None:
    assert kept_while_offline(broker, HUB, protocol.status_topic(DEVICE), VICTIM_DEVICE,
                              client_id=HUB_USERNAME)
