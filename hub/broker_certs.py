"""Device identities on the managed broker when it speaks TLS: certificates and their CRL.

A device's broker identity is the client certificate the hub issued for it
(common name = device id), so enrolling one changes nothing on the broker.
Deleting one revokes its certificates: the CRL (`DATA/broker/crl.pem`) is
rewritten and Mosquitto reloads it on SIGHUP (no restart, every session
stays). As with password logins (hub/broker_logins.py), the hub waits until
the reload took effect, told by a canary: every CRL also revokes the
canary's current certificate, so once the canary is refused the broker uses
the new list; a fresh canary certificate is made for the next change.

A reload does not check open TLS connections again, so the revoked device's
connection is then taken over: the hub connects once with a certificate it
makes for the same name (a clean session, so the deleted device's session
goes too), which makes Mosquitto close the old connection, and disconnects.
That certificate lives a few minutes and is revoked in turn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from contract import tls
from contract.files import write_secret
from hub import broker_config, pki
from hub.broker_logins import BrokerUnavailable
from hub.storage.db import Database, format_time, now

log = logging.getLogger("edgefleet.hub.broker")

_TAKEOVER_DAYS = 10 / 1440  # ten minutes


def connack(host: str, port: int, context: ssl.SSLContext, client_id: str,
            timeout: float) -> bool:
    """Does the broker accept this certificate? A clean MQTT 3.1.1 CONNECT, then DISCONNECT."""
    name = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!HH", 30, len(name)) + name
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=host) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        if sock.recv(4) == b"\x20\x02\x00\x00":
            sock.sendall(b"\xe0\x00")
            return True
        return False


class BrokerCertificates:
    def __init__(self, db: Database, authority: pki.Authority,
                 config: broker_config.BrokerConfig, *, hub_name: str,
                 reload: Callable[[], bool], timeout: float = 10) -> None:
        """HUB_NAME: the common name of the hub's own certificate (`hub_username`).
        RELOAD asks the running broker to read its files again (False: it is not running)."""
        self.db = db
        self.hub_name = hub_name
        self.authority = authority
        self.config = config
        self._reload = reload
        self._timeout = timeout
        self._lock = threading.Lock()  # one CRL writer at a time
        self._canary_serial = 0

    @property
    def _canary(self) -> tuple[Path, Path]:
        return self.config.directory / "canary.key", self.config.directory / "canary.pem"

    def issue(self, device_id: str, csr_pem: str) -> str:
        """The device's client certificate (PEM) for the key of CSR_PEM; TlsError if unusable."""
        return pki.issue_device(self.db, self.authority, device_id, csr_pem)

    def write_all(self) -> None:
        """Before the broker starts: its configuration, the ACL and the CRL."""
        with self._lock:
            self._write_crl()
            missing = pki.without_certificate(self.db)
            if missing:
                log.warning("%d device(s) have no valid broker certificate and cannot connect "
                            "(enrolled before TLS, or without a certificate request): enroll "
                            "them again, e.g. %s", len(missing), ", ".join(missing[:5]))
            write_secret(self.config.acl_path, broker_config.acl(self.hub_name))
            write_secret(self.config.directory / "mosquitto.conf",
                         broker_config.mosquitto_conf(self.config))

    def revoke(self, device_id: str) -> None:
        """Refuse DEVICE_ID's certificates from now on and drop its open connection;
        BrokerUnavailable if the broker cannot be told (the certificates stay revoked in
        the database; the caller keeps the device and may try again)."""
        with self._lock:
            pki.revoke_device(self.db, device_id)
            canary = self._canary_context()
            self._write_crl()
            error = self._reloaded(canary)
            if error is None:
                error = self._take_over(device_id)
        if error is not None:
            raise BrokerUnavailable(f"could not revoke the broker identity of {device_id}: "
                                    f"{error}; see the hub's log, then try again")

    def _write_crl(self) -> None:
        """A fresh canary certificate, then the CRL revoking every revoked device
        certificate and the previous canary."""
        previous = self._canary_serial
        key, cert = self._canary
        self.authority.key_and_certificate(key, cert, broker_config.CANARY_USERNAME, days=1)
        self._canary_serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        serials = pki.revoked_serials(self.db) + ([previous] if previous else [])
        write_secret(self.config.crl_path, self.authority.crl_pem(serials))

    def _canary_context(self) -> ssl.SSLContext:
        key, cert = self._canary
        return tls.client_context(self.authority.paths.ca_cert, cert, key)

    def _reloaded(self, canary: ssl.SSLContext) -> str | None:
        """SIGHUP, then wait until CANARY (revoked by the new CRL) is refused."""
        if not self._reload():
            return "the broker is not running (it is being restarted)"
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            try:
                if not connack(self.config.host, self.config.port, canary,
                               broker_config.CANARY_USERNAME, timeout=1):
                    return None
            except (ssl.SSLError, ConnectionError):
                return None  # refused in the handshake: the new CRL is in use
            except OSError:
                pass
            time.sleep(0.01)
        return f"the broker did not reload its revocation list within {self._timeout:g} s"

    def _take_over(self, device_id: str) -> str | None:
        key = self.config.directory / f"takeover-{os.getpid()}.key"
        cert = key.with_suffix(".pem")
        try:
            self.authority.key_and_certificate(key, cert, device_id, days=_TAKEOVER_DAYS)
            context = tls.client_context(self.authority.paths.ca_cert, cert, key)
            made = x509.load_pem_x509_certificate(cert.read_bytes())
            with self.db.transaction() as conn:  # revoked in the next CRL
                conn.execute("INSERT INTO device_certificates VALUES (?, ?, ?, ?)",
                             (str(made.serial_number), device_id,
                              format_time(made.not_valid_after_utc), now()))
            connack(self.config.host, self.config.port, context, device_id, self._timeout)
            return None
        except OSError as exc:
            return f"its connection could not be closed ({exc})"
        finally:
            for path in (key, cert):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
