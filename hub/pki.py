"""The hub's certificate authority and the certificates it issues.

`DATA/tls/` holds the CA (`ca.key` 0600 from the first byte, `ca.pem`),
made on the first start: EC P-256, ten years. It signs the server
certificate of the REST API and the managed broker (`server.pem`, SANs
localhost, 127.0.0.1, the listen address and the host names devices are
told, `hub.server.advertised`; made again when those names change or a
third of its validity is left), the hub's and the canary's broker
certificates, and each device's client certificate
(common name = device id: its MQTT identity). With `--tls-cert/--tls-key`
the user's certificate is served instead; the last certificate of that
file is what clients pin and trust.

Every device certificate issued is a row of `device_certificates` (serial,
device, expiry), so deleting a device revokes all of its certificates: the
CRL (`crl_pem`) lists the revoked serials that have not expired yet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contract import signing, tls
from contract.files import write_atomic, write_secret
from hub.storage.db import Database, format_time, now

CA_DAYS = 3650
SERVER_DAYS = 397
CLIENT_DAYS = 90  # devices renew when a third is left: every 60 days
_TABLE = ("CREATE TABLE IF NOT EXISTS device_certificates (serial TEXT PRIMARY KEY,"
          " device_id TEXT NOT NULL, not_after TEXT NOT NULL, revoked_at TEXT)")
_BACKDATE = timedelta(minutes=5)  # clocks of devices run a little behind


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Paths:
    directory: Path

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def hub_key(self) -> Path:
        return self.directory / "hub-client.key"

    @property
    def hub_cert(self) -> Path:
        return self.directory / "hub-client.pem"


class Authority:
    """The CA in DIRECTORY, made on first use."""

    def __init__(self, directory: Path) -> None:
        self.paths = Paths(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.paths.ca_key.exists():
            key = signing.generate_private_key()
            at = datetime.now(UTC)
            cert = (x509.CertificateBuilder()
                    .subject_name(_name("edgefleet hub CA")).issuer_name(_name("edgefleet hub CA"))
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(at - _BACKDATE).not_valid_after(at + timedelta(days=CA_DAYS))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                 False, False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                   critical=False)
                    .sign(key, hashes.SHA256()))
            signing.write_private_key(key, self.paths.ca_key)
            write_atomic(self.paths.ca_cert, _pem(cert).encode())
        self.key = signing.load_private_key(self.paths.ca_key)
        self.cert = x509.load_pem_x509_certificate(self.paths.ca_cert.read_bytes())
        self.pem = _pem(self.cert)

    def issue(self, public_key: ec.EllipticCurvePublicKey, common_name: str, *,
              days: float, hosts: Iterable[str] = ()) -> x509.Certificate:
        """A certificate for PUBLIC_KEY: a server's if HOSTS are named, else a client's."""
        at = datetime.now(UTC)
        hosts = list(dict.fromkeys(hosts))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(common_name)).issuer_name(self.cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(at - _BACKDATE).not_valid_after(at + timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def crl_pem(self, serials: Iterable[int]) -> str:
        at = datetime.now(UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(at - _BACKDATE).next_update(at + timedelta(days=CA_DAYS)))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(at - _BACKDATE).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM).decode()

    # --- the hub's own certificates -------------------------------------------------

    def server_certificate(self, hosts: list[str]) -> None:
        """server.pem for HOSTS, made again when the names differ or a third is left."""
        if self.paths.server_cert.exists() and self.paths.server_key.exists():
            cert = x509.load_pem_x509_certificate(self.paths.server_cert.read_bytes())
            names = {str(n.value) for n in cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value}
            if names == set(hosts) and cert.issuer == self.cert.subject and not tls.renewal_due(
                    cert.not_valid_before_utc, cert.not_valid_after_utc, datetime.now(UTC)):
                return
        self.key_and_certificate(self.paths.server_key, self.paths.server_cert,
                                 hosts[0], days=SERVER_DAYS, hosts=hosts)

    def key_and_certificate(self, key_path: Path, cert_path: Path, common_name: str, *,
                            days: float, hosts: Iterable[str] = ()) -> None:
        key = signing.generate_private_key()
        signing.write_private_key(key, key_path)
        write_secret(cert_path, _pem(self.issue(key.public_key(), common_name, days=days,
                                                hosts=hosts)))


def server_hosts(listen: str, *public: str | None) -> list[str]:
    """The names the server certificate is valid for: loopback, the listening
    address and the names devices are told (hub.server.advertised)."""
    hosts = ["localhost", "127.0.0.1"]
    for extra in (listen, *public):
        if extra and extra not in ("0.0.0.0", "::"):
            hosts.append(extra)
    return list(dict.fromkeys(hosts))


def trust_anchor(certfile: Path) -> str:
    """The certificate clients pin for a user's --tls-cert: the last one in the file."""
    found = tls.certificates(certfile.read_text())
    if not found:
        raise tls.TlsError(f"{certfile} holds no PEM certificate")
    return found[-1] + "\n"


# --- device certificates ------------------------------------------------------------

def ensure_table(db: Database) -> None:
    with db.transaction() as conn:
        conn.execute(_TABLE)


def issue_device(db: Database, authority: Authority, device_id: str, csr_pem: str,
                 days: float = CLIENT_DAYS) -> str:
    """A client certificate for the key of CSR_PEM, named DEVICE_ID, recorded for revocation."""
    cert = authority.issue(tls.read_csr(csr_pem), device_id, days=days)
    with db.transaction() as conn:
        conn.execute("INSERT INTO device_certificates VALUES (?, ?, ?, NULL)",
                     (str(cert.serial_number), device_id,
                      format_time(cert.not_valid_after_utc)))
    return _pem(cert)


def revoke_device(db: Database, device_id: str) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE device_certificates SET revoked_at = ? WHERE device_id = ?"
                     " AND revoked_at IS NULL", (now(), device_id))


def revoked_serials(db: Database) -> list[int]:
    """Serials revoked and not expired yet (an expired one is refused anyway)."""
    rows = db.query("SELECT serial FROM device_certificates WHERE revoked_at IS NOT NULL"
                    " AND not_after > ?", (now(),))
    return [int(r["serial"]) for r in rows]


def without_certificate(db: Database) -> list[str]:
    """Devices with no certificate that is neither revoked nor expired."""
    rows = db.query("SELECT id FROM devices WHERE id NOT IN (SELECT device_id FROM"
                    " device_certificates WHERE revoked_at IS NULL AND not_after > ?)"
                    " ORDER BY id", (now(),))
    return [r["id"] for r in rows]
