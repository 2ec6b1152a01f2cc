"""What the managed Mosquitto is told: its configuration, its logins and its topic ACL.

Pure builders, no I/O. Mosquitto reads three files the hub writes into
`DATA/broker/`: `mosquitto.conf` (`mosquitto_conf`), `acl` (`acl`: the hub's
user line, then `%u` patterns confine each device to its own topics) and
`passwd` (`password_file`: one line per login, PBKDF2-SHA512 hashed, the
format `mosquitto_passwd` writes).

With TLS (the default) the listener is `mqtts://` and a client's identity is
its certificate (`BrokerTls`): Mosquitto takes the common name as the user
name, checks the CA and the CRL, and reads no password file
(hub/broker_certs.py manages the CRL instead of `passwd`).

Logins: the hub as `edgefleet-hub-<hash of the hub's secret>` (`hub_username`)
with the hub's secret (with TLS that name is its certificate's common name); a
device as its device id with its device token; `edgefleet-canary`, whose
password changes with every write of the file, so the hub can tell when
Mosquitto has reloaded it (hub/broker_logins.py).
Mosquitto uses each login's user name as its client id
(`use_username_as_clientid`), so a client cannot present another's client id
at all.

Why the hub's user name is not guessable: Mosquitto 2.0.11 unhooks the client
holding a client id from its index of clients by id when *another* connection
that presented that id fails to log in (context__remove_from_by_id looks the
id up and deletes whatever it finds; fixed in later 2.0.x). The legitimate
client stays connected, but its persistent session is lost, and the next
reload (SIGHUP: every enrollment and deletion) frees the ACL without
re-attaching it to that client, which keeps a dangling pointer to it: from
then on everything it publishes or is sent is denied, or the broker crashes.
Only a login with `user` lines in the ACL (the hub's) has such a pointer;
devices are matched by patterns. A name no attacker can present keeps the
hub's entry in that index.

A device may publish to its own reported, telemetry and status topics and
subscribe to (and receive) its own desired and commands topics. Command
results are not allowed yet: nothing reads them, and their topic has a
level per command id, so a device could keep any number of retained
messages there; without them a device has three retained slots of at most
`MAX_PACKET_BYTES`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from contract import protocol

HUB_USERNAME = "edgefleet-hub"  # what the hub's login starts with (`hub_username`)
CANARY_USERNAME = "edgefleet-canary"

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
_ITERATIONS = 101  # what mosquitto_passwd uses; the secrets are random, not chosen by people
_LINE = re.compile(r"([^:\s]+):(\$7\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+)")


@dataclass(frozen=True)
class BrokerTls:
    """The TLS listener's files: clients must present a certificate of CAFILE not in CRLFILE,
    and its common name is their user name (and so their client id)."""

    cafile: Path
    certfile: Path
    keyfile: Path

    def lines(self, crlfile: Path) -> list[str]:
        return [f"cafile {self.cafile}", f"certfile {self.certfile}", f"keyfile {self.keyfile}",
                f"crlfile {crlfile}", "tls_version tlsv1.2", "require_certificate true",
                "use_identity_as_username true"]


@dataclass(frozen=True)
class BrokerConfig:
    """Where the managed broker listens and keeps its files."""

    host: str
    port: int
    directory: Path
    max_queued_messages: int
    user: str  # Mosquitto started as root switches to this user
    tls: BrokerTls | None = None  # None: plain text, logins by password (--insecure)

    @property
    def password_path(self) -> Path:
        return self.directory / "passwd"

    @property
    def acl_path(self) -> Path:
        return self.directory / "acl"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def mosquitto_conf(config: BrokerConfig) -> str:
    return "\n".join([
        "# Written by `edgefleet hub serve` at every start of the broker: edits are lost.",
        f"listener {config.port} {config.host}",
        "allow_anonymous false",
        *(config.tls.lines(config.crl_path) if config.tls
          else [f"password_file {config.password_path}"]),
        f"acl_file {config.acl_path}",
        "use_username_as_clientid true",
        "persistence true",
        f"persistence_location {config.directory}/",
        "autosave_interval 60",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_inflight_bytes {MAX_INFLIGHT_BYTES}",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        # Small packets (a PUBACK, then a desired state) go out at once, not
        # after the peer's delayed ACK (~40 ms each).
        "set_tcp_nodelay true",
        f"user {config.user}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "log_timestamp false",
        "",
    ])


def _pattern(topic: Callable[[str], str]) -> str:
    """TOPIC of the device whose user name it is, as a Mosquitto ACL pattern."""
    return topic("ID").replace("/ID/", "/%u/", 1)


def hub_username(hub_password: str) -> str:
    """The hub's login on the managed broker: not guessable, see the module docstring."""
    return f"{HUB_USERNAME}-{hashlib.sha256(hub_password.encode()).hexdigest()[:16]}"


def acl(hub: str) -> str:
    """The ACL file, with HUB as the hub's user name."""
    return "\n".join([
        f"user {hub}",
        f"topic readwrite {protocol.ROOT}/#",
        "",
        *(f"pattern write {_pattern(t)}" for t in
          (protocol.reported_topic, protocol.telemetry_topic, protocol.status_topic)),
        *(f"pattern read {_pattern(t)}" for t in (protocol.desired_topic,
                                                   protocol.commands_topic)),
        "",
    ])


def password_line(username: str, password: str, salt: bytes) -> str:
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return (f"{username}:$7${_ITERATIONS}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def parse_password_file(text: str) -> dict[str, str]:
    """User name -> the rest of its line; lines that are no login are left out."""
    return {m[1]: m[2] for line in text.splitlines() if (m := _LINE.fullmatch(line.strip()))}


def password_file(
    logins: dict[str, str], *, hub_password: str, canary: str,
    salt: Callable[[int], bytes] = os.urandom,
) -> str:
    """The file from LOGINS (device id -> hashed line, as `parse_password_file`
    reads them), with the hub's and the canary's logins made afresh."""
    lines = [password_line(hub_username(hub_password), hub_password, salt(12)),
             password_line(CANARY_USERNAME, canary, salt(12))]
    lines += [f"{device}:{hashed}" for device, hashed in sorted(logins.items())
              if not device.startswith((HUB_USERNAME, CANARY_USERNAME))]
    return "\n".join(lines) + "\n"


def device_logins(logins: dict[str, str], devices: Collection[str]) -> dict[str, str]:
    """The logins of LOGINS that belong to one of DEVICES (the rest were deleted)."""
    return {d: hashed for d, hashed in logins.items() if d in devices}
