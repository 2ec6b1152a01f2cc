"""The managed broker's files, as built (the broker reading them is tests/test_fleet_*.py)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from agent import protocol
from hub import broker_config
from hub.broker_config import BrokerConfig


def test_the_logins_file_keeps_existing_devices_only_and_rebuilds_their_rules() -> None:
    first = broker_config.login_document(None, hub_password="s3cret", devices={"dev-a"})
    assert broker_config.device_logins(first) == set()  # no password for dev-a: none made up
    kept = {"username": "dev-a", "password": "aGFzaA==", "salt": "c2FsdA==", "iterations": 101,
            "clientid": "dev-b", "roles": [{"rolename": "edgefleet-hub"}]}
    existing = {**first, "clients": [*first["clients"], kept,
                                     {**kept, "username": "dev-deleted"}]}
    again = broker_config.login_document(existing, hub_password="s3cret",
                                         devices={"dev-a", "dev-c"})
    assert broker_config.device_logins(again) == {"dev-a"}
    (device,) = [c for c in again["clients"] if c["username"] == "dev-a"]
    assert device["password"] == "aGFzaA==" and device["clientid"] == "dev-a"
    assert device["roles"] == [{"rolename": "device-dev-a"}]
    roles = {r["rolename"]: r for r in again["roles"]}
    assert set(roles) == {"edgefleet-hub", "edgefleet-admin", "device-dev-a"}
    assert all(value is False for value in again["defaultACLAccess"].values())


def test_the_hubs_password_is_hashed_as_mosquitto_checks_it() -> None:
    document = broker_config.login_document(None, hub_password="s3cret", devices=(),
                                            salt=lambda n: b"\x01" * n)
    for client in document["clients"]:
        salt = base64.b64decode(client["salt"])
        assert len(salt) == 12
        expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, client["iterations"])
        assert base64.b64decode(client["password"]) == expected
        assert "s3cret" not in str(client)


def test_a_device_role_names_only_its_own_topics() -> None:
    role = broker_config.device_role("dev-1")
    allowed = {(a["acltype"], a["topic"]) for a in role["acls"]}
    assert ("publishClientSend", protocol.reported_topic("dev-1")) in allowed
    assert ("subscribeLiteral", protocol.desired_topic("dev-1")) in allowed
    assert all("/dev-1/" in topic for _, topic in allowed)
    assert not any("commands/" in topic for _, topic in allowed)  # no command results yet
    assert not any(kind == "publishClientSend" and topic.endswith("/desired")
                   for kind, topic in allowed)


def test_the_config_sets_every_limit() -> None:
    text = broker_config.mosquitto_conf(BrokerConfig(
        host="127.0.0.1", port=1883, directory=Path("/data/broker"),
        plugin=Path("/usr/lib/x/mosquitto_dynamic_security.so"), max_queued_messages=5000,
        user="edgefleet"))
    for line in ("allow_anonymous false", "listener 1883 127.0.0.1", "max_queued_messages 5000",
                 f"max_packet_size {broker_config.MAX_PACKET_BYTES}", "persistence true",
                 "plugin_opt_config_file /data/broker/dynamic-security.json"):
        assert line in text.splitlines()
