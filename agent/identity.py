"""Who this device is: made once at enrollment, reused on every later start.

First start: the device makes its own ECDSA key pair, enrolls with the
hub's one-time token, and stores what the hub answers: its device id, its
own credential (for the registry and MQTT), the MQTT broker and the hub's
public signing key, which it pins: every desired state must be signed by
that key, or by one it rotated to (agent/trust.py). Everything is written
with mode 0600. Later starts read it back and need no token.

Over TLS the enrollment token pins the hub's CA (contract/tls.py): the
device fetches the CA, keeps it only if its SHA-256 is the pinned one
(`hub-ca.pem`), and verifies the hub with it from then on. It sends a
certificate request for its key and keeps the certificate the hub issues
(`device.pem`): its identity on the hub's broker.
"""

from __future__ import annotations

import ipaddress
import platform as host_platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from contract.files import SECRET_MODE, read_json, write_atomic, write_json, write_secret

if TYPE_CHECKING:
    import ssl

IDENTITY_FILE = "identity.json"
KEY_FILE = "device.key"
CA_FILE = "hub-ca.pem"  # the hub's pinned CA: REST and the broker are verified with it
CERT_FILE = "device.pem"  # the device's broker certificate


class EnrollmentError(Exception):
    """Enrollment failed; the message says why and what to do."""


class HubUnreachable(EnrollmentError):
    """The hub could not be reached: worth trying again later."""


@dataclass(frozen=True)
class Identity:
    device_id: str
    name: str
    hub_url: str
    device_token: str
    mqtt_url: str
    mqtt_username: str
    mqtt_password: str
    hub_public_key: str
    tls: bool = False  # the hub's CA is pinned (CA_FILE); False: a hub run with --insecure
    mqtt_certificate: bool = False  # the broker knows this device by CERT_FILE, not a password


def load(data_dir: Path) -> Identity | None:
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        return None
    return Identity(**read_json(path))


def reachable_broker(broker_url: str, hub_url: str) -> str:
    """BROKER_URL as this device can reach it: a hub that binds its broker to a loopback or
    wildcard address announces that address, which means this device itself; the broker is
    then on the host the device reached the hub at (a VM's 10.0.2.2, a NAT's address)."""
    broker = urlsplit(broker_url)
    hub_host = urlsplit(hub_url).hostname
    if broker.hostname is None or hub_host is None:
        return broker_url
    try:
        address = ipaddress.ip_address(broker.hostname)
    except ValueError:
        return broker_url
    if not (address.is_loopback or address.is_unspecified) or _is_loopback(hub_host):
        return broker_url
    host = f"[{hub_host}]" if ":" in hub_host else hub_host
    return broker._replace(netloc=f"{host}:{broker.port}" if broker.port else host).geturl()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def enroll(
    data_dir: Path, *, hub_url: str, token: str, name: str | None, platform: str,
    mqtt_url: str | None = None,
) -> Identity:
    """Enroll with TOKEN and store the identity; fails with EnrollmentError."""
    from contract import signing, tls

    try:
        secret, pin = tls.split_token(token)
        tls.check_pin(hub_url, pin)
    except tls.TlsError as exc:
        raise EnrollmentError(str(exc)) from None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = data_dir / KEY_FILE
    if not key_path.exists():
        signing.write_private_key(signing.generate_private_key(), key_path)
    key = signing.load_private_key(key_path)
    public_pem = signing.public_key_pem(key)
    name = name or host_platform.node() or "device"
    import httpx  # only enrollment needs it: the daemon stays small without it

    body = {"token": secret, "public_key": public_pem, "name": name, "platform": platform}
    verify: ssl.SSLContext | bool = True
    if pin is not None:
        write_atomic(data_dir / CA_FILE, pinned_ca(hub_url, pin).encode())
        verify = tls.client_context(data_dir / CA_FILE)
        body["csr"] = tls.build_csr(key)
    try:
        response = httpx.post(f"{hub_url.rstrip('/')}/api/v1/enroll", json=body, timeout=30,
                              verify=verify)
    except httpx.TransportError as exc:
        raise HubUnreachable(f"cannot reach the hub at {hub_url}: {exc}") from None
    if response.status_code >= 500:
        raise HubUnreachable(f"the hub at {hub_url} cannot enroll now ({response.status_code})")
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise EnrollmentError(f"the hub refused the enrollment: {detail}")
    answer = response.json()
    mqtt = answer.get("mqtt") or {}
    if mqtt.get("certificate"):
        write_secret(data_dir / CERT_FILE, mqtt["certificate"])
    identity = Identity(
        device_id=answer["device"]["id"],
        name=name,
        hub_url=hub_url.rstrip("/"),
        device_token=answer["device_token"],
        mqtt_url=mqtt_url or reachable_broker(mqtt.get("url") or answer.get("mqtt_url", ""),
                                              hub_url),
        mqtt_username=mqtt.get("username") or answer["device"]["id"],
        mqtt_password="" if mqtt.get("certificate") else
        mqtt.get("password") or answer["device_token"],
        hub_public_key=answer["hub_public_key"],
        tls=pin is not None,
        mqtt_certificate=bool(mqtt.get("certificate")),
    )
    if isinstance(answer.get("hub_key_trust"), dict):  # a hub that rotated: where to start
        from agent import trust
        from contract.keys import Trust

        trust.save(data_dir, Trust.from_json(
            {**answer["hub_key_trust"], "key": answer["hub_public_key"]}))
    write_json(data_dir / IDENTITY_FILE, asdict(identity), mode=SECRET_MODE)
    return identity


def pinned_ca(hub_url: str, pin: str) -> str:
    """The hub's CA, fetched without trusting anyone yet and kept only if its SHA-256 is PIN."""
    import httpx

    from contract import tls

    try:  # unverified on purpose: the pin decides, and nothing secret is sent
        response = httpx.get(f"{hub_url.rstrip('/')}/api/v1/tls/ca", timeout=30, verify=False)
        response.raise_for_status()
        pem = str(response.json()["certificate"])
        found = tls.fingerprint(pem)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise EnrollmentError(f"cannot get the CA of the hub at {hub_url}: {exc}") from None
    if found != pin:
        raise EnrollmentError(
            f"the hub at {hub_url} presents a CA with SHA-256 {found}, but the enrollment token "
            f"pins {pin}: this is not the hub that made the token (or something is in "
            "between); nothing was sent. Check --hub, or get a new token")
    return tls.certificates(pem)[0] + "\n"


def mqtt_tls(data_dir: Path, identity: Identity) -> ssl.SSLContext:
    """Verifies the broker with the pinned CA and presents the device certificate."""
    from contract import tls

    return tls.client_context(data_dir / CA_FILE,
                              data_dir / CERT_FILE if identity.mqtt_certificate else None,
                              data_dir / KEY_FILE if identity.mqtt_certificate else None)


def hub_tls(data_dir: Path, identity: Identity) -> ssl.SSLContext | bool:
    """How the hub's REST API is verified: with the pinned CA, or (http://) not at all."""
    if not identity.tls:
        return True
    from contract import tls

    return tls.client_context(data_dir / CA_FILE)
