"""What the managed Mosquitto is told: its configuration file and its logins.

Pure builders, no I/O: `mosquitto_conf` writes the broker's settings and
`login_document` the dynamic-security plugin's file (clients, roles, ACLs).
`device_commands` and `removal_commands` are the same logins as requests to
the plugin's `$CONTROL/dynamic-security/v1` topic, for a running broker.

Three identities exist on the managed broker:

- `edgefleet-hub` (client id `edgefleet-hub`): the hub's ingest and
  publisher session; every `edgefleet/v1/#` topic.
- `edgefleet-admin` (client id `edgefleet-hub-admin`): the hub's control
  session; only the plugin's `$CONTROL` topics. Both use the hub's secret
  (`DATA/mqtt-hub-password`).
- a device: user and client id = its device id, password = its device token.
  Its role (`device-ID`) allows publishing to its own reported, telemetry
  and status topics and subscribing to its own desired and commands topics.
  Mosquitto 2.0's plugin expands no `%u` in ACLs, hence one role per device.

Everything not allowed is denied (the plugin's default ACL access is set to
deny). Command results are not allowed yet: nothing reads them, and their
topic has a level per command id, so a device could hold any number of
retained messages there; without them a device has three retained slots of
at most `MAX_PACKET_BYTES`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import protocol

HUB_USERNAME = "edgefleet-hub"
HUB_CLIENT_ID = "edgefleet-hub"
ADMIN_USERNAME = "edgefleet-admin"
ADMIN_CLIENT_ID = "edgefleet-hub-admin"
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
_HUB_ROLE, _ADMIN_ROLE, _DEVICE_ROLE_PREFIX = "edgefleet-hub", "edgefleet-admin", "device-"

# The largest payload of the protocol (a telemetry batch) plus room for the
# topic and the fixed header. Bigger packets are refused and their sender
# disconnected, before the broker keeps or forwards anything.
MAX_PACKET_BYTES = protocol.MAX_TELEMETRY_BYTES + 4096
# Unacknowledged QoS 1 messages out to one client at a time: the hub's ingest
# batches need a wide window (Mosquitto's default of 20 limits them). The
# byte bound caps what a flood of the largest messages can put into the
# hub's memory at once; ordinary messages (a few kB) never reach it.
MAX_INFLIGHT_MESSAGES = 100
MAX_INFLIGHT_BYTES = 16 * 2**20
# A client's queue beyond its in-flight window (the hub during a burst, a
# device while offline). Mosquitto's default of 1000 messages silently drops
# QoS 1 messages for a subscriber that falls behind; the byte bound keeps a
# flood from taking the broker's memory with it.
MAX_QUEUED_BYTES = 512 * 2**20
# A device gone this long loses its persistent session (its retained desired
# state stays, so it converges on return).
PERSISTENT_CLIENT_EXPIRATION = "60d"
_ITERATIONS = 101  # what mosquitto_ctrl uses; the secrets are random, not passwords people chose


@dataclass(frozen=True)
class BrokerConfig:
    """Where the managed broker listens and keeps its files."""

    host: str
    port: int
    directory: Path
    plugin: Path
    max_queued_messages: int
    user: str  # Mosquitto started as root switches to this user

    @property
    def logins_path(self) -> Path:
        return self.directory / "dynamic-security.json"


def mosquitto_conf(config: BrokerConfig) -> str:
    return "\n".join([
        "# Written by `edgefleet hub serve` at every start of the broker: edits are lost.",
        "per_listener_settings false",
        f"listener {config.port} {config.host}",
        "allow_anonymous false",
        f"plugin {config.plugin}",
        f"plugin_opt_config_file {config.logins_path}",
        "persistence true",
        f"persistence_location {config.directory}/",
        "autosave_interval 60",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_inflight_bytes {MAX_INFLIGHT_BYTES}",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"user {config.user}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "log_timestamp false",
        "",
    ])


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def device_role(device_id: str) -> dict[str, Any]:
    """The role confining DEVICE_ID to its own topics."""
    acls = [_acl("publishClientSend", topic(device_id)) for topic in
            (protocol.reported_topic, protocol.telemetry_topic, protocol.status_topic)]
    for topic in protocol.device_subscriptions(device_id):
        acls += [_acl("subscribeLiteral", topic), _acl("unsubscribeLiteral", topic),
                 _acl("publishClientReceive", topic)]
    return {"rolename": _DEVICE_ROLE_PREFIX + device_id, "acls": acls}


def _fixed_roles() -> list[dict[str, Any]]:
    every = f"{protocol.ROOT}/#"
    control = "$CONTROL/dynamic-security/#"
    return [
        {"rolename": _HUB_ROLE, "acls": [
            _acl("publishClientSend", every), _acl("publishClientReceive", every),
            _acl("subscribePattern", every), _acl("unsubscribePattern", every)]},
        {"rolename": _ADMIN_ROLE, "acls": [
            _acl("publishClientSend", control), _acl("publishClientReceive", control),
            _acl("subscribeLiteral", RESPONSE_TOPIC), _acl("unsubscribeLiteral", RESPONSE_TOPIC)]},
    ]


def _hashed(password: str, salt: bytes) -> dict[str, Any]:
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return {"password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": _ITERATIONS}


def login_document(
    existing: Mapping[str, Any] | None, *, hub_password: str, devices: Collection[str],
    salt: Callable[[int], bytes] = os.urandom,
) -> dict[str, Any]:
    """The plugin's file: the hub's two logins (from HUB_PASSWORD), and the
    device logins of EXISTING (the file the broker kept) whose device is
    still one of DEVICES. Device passwords exist only there, hashed: the hub
    keeps its device tokens only as sha256, so a lost file means enrolling
    those devices again."""
    # A kept device's password hash stays; its client id and role are rebuilt
    # from today's rules, whatever the file said.
    kept = list({c["username"]: {**c, "clientid": c["username"], "roles": [
                    {"rolename": device_role(c["username"])["rolename"]}]}
                 for c in (existing or {}).get("clients", [])
                 if isinstance(c, dict) and c.get("username") in devices
                 and c.get("username") not in (HUB_USERNAME, ADMIN_USERNAME)}.values())
    clients = [
        {"username": HUB_USERNAME, "clientid": HUB_CLIENT_ID,
         "roles": [{"rolename": _HUB_ROLE}], **_hashed(hub_password, salt(12))},
        {"username": ADMIN_USERNAME, "clientid": ADMIN_CLIENT_ID,
         "roles": [{"rolename": _ADMIN_ROLE}], **_hashed(hub_password, salt(12))},
        *kept,
    ]
    return {"clients": clients, "roles": _fixed_roles() + [device_role(c["username"])
                                                           for c in kept],
            "groups": [],
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                 "subscribe": False, "unsubscribe": False}}


def device_commands(device_id: str, password: str) -> list[dict[str, Any]]:
    """Plugin commands that let DEVICE_ID in, confined to its own topics."""
    role = device_role(device_id)
    return [
        {"command": "createRole", **role},
        {"command": "createClient", "username": device_id, "password": password,
         "clientid": device_id, "roles": [{"rolename": role["rolename"]}]},
    ]


def removal_commands(device_id: str) -> list[dict[str, Any]]:
    """Plugin commands that remove DEVICE_ID's login; the broker drops its connection."""
    return [{"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": _DEVICE_ROLE_PREFIX + device_id}]


def device_logins(document: Mapping[str, Any]) -> set[str]:
    """The device ids that have a login in the plugin's DOCUMENT."""
    return {c["username"] for c in document.get("clients", []) if isinstance(c, dict)
            and c.get("username") not in (HUB_USERNAME, ADMIN_USERNAME)}
