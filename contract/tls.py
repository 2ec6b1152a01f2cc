"""Transport security both sides agree on: the pinned CA, device CSRs, renewal timing.

An enrollment token is `efe_<secret>.<sha256 hex>`: the secret the hub
checks, then the SHA-256 fingerprint of the certificate the hub's TLS
certificate chains to (its CA), as `kubeadm join` pins a CA hash. A device
fetches that CA over a connection it does not trust yet, keeps it only if
its fingerprint is the pinned one, and from then on talks to the hub (REST
and MQTT) verifying against it. A token without a pin is for a hub run with
`--insecure` (plain HTTP).

At enrollment (and renewal) the device sends a certificate signing request
for its own P-256 key; the hub issues a client certificate whose common
name is the device id, which is its MQTT identity. `build_csr` and
`read_csr` are the one builder and reader of that request. A certificate is
renewed once less than a third of its validity remains (`renewal_due`).
"""

from __future__ import annotations

import hashlib
import re
import ssl
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

PIN_SEPARATOR = "."  # never in a token_urlsafe secret
MAX_CSR_BYTES = 4096
MAX_CERTIFICATE_BYTES = 16384
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")


class TlsError(ValueError):
    """A pin, a request or a certificate that cannot be used; the message says why."""


def certificates(pem: str) -> list[str]:
    """The PEM certificates in PEM, in order."""
    return _PEM_CERT.findall(pem)


def fingerprint(pem: str) -> str:
    """SHA-256 (hex) of the DER bytes of the first certificate in PEM."""
    found = certificates(pem)
    if not found:
        raise TlsError("no PEM certificate found")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(found[0])).hexdigest()


def pinned_token(secret: str, ca_fingerprint: str) -> str:
    """The enrollment token a user is given: SECRET with the CA's fingerprint."""
    token = f"{secret}{PIN_SEPARATOR}{ca_fingerprint}"
    if split_token(token) != (secret, ca_fingerprint):
        raise TlsError(f"cannot pin {ca_fingerprint!r} to this secret")
    return token


def split_token(token: str) -> tuple[str, str | None]:
    """(secret, fingerprint or None); TlsError for a pin that is no SHA-256 hex digest."""
    secret, separator, pin = token.strip().partition(PIN_SEPARATOR)
    if not separator:
        return secret, None
    if not _FINGERPRINT.fullmatch(pin):
        raise TlsError("the enrollment token's CA fingerprint (after the '.') is not 64 "
                       "lower-case hex digits; copy the whole token again")
    return secret, pin


def check_pin(hub_url: str, pin: str | None) -> None:
    """TlsError unless PIN fits HUB_URL: an https:// hub is checked against a pinned CA,
    and a pin for a plain http:// hub would be a promise nobody keeps."""
    if hub_url.startswith("https://") and pin is None:
        raise TlsError(f"this enrollment token pins no CA, so the hub at {hub_url} cannot be "
                       "checked: copy the whole token the hub printed (efe_....<64 hex digits>)")
    if hub_url.startswith("http://") and pin is not None:
        raise TlsError(f"the token pins the hub's CA, but {hub_url} is plain HTTP: use https://")


def build_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """A PEM signing request for KEY (the hub chooses the name it certifies)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet-device")]))
           .sign(key, hashes.SHA256()))
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    read_csr(pem)  # a request the hub would refuse is our bug: fail here
    return pem


def read_csr(pem: str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key a well-formed, self-signed request asks to certify."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    if len(pem) > MAX_CSR_BYTES:
        raise TlsError(f"the certificate request is over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise TlsError(f"not a PEM certificate request: {exc}") from None
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise TlsError("the certificate request is not for an ECDSA P-256 key")
    if not csr.is_signature_valid:
        raise TlsError("the certificate request's signature does not match its key")
    return key


def read_certificate(pem: str) -> x509.Certificate:
    from cryptography import x509

    found = certificates(pem[:MAX_CERTIFICATE_BYTES])
    if not found:
        raise TlsError("no PEM certificate found")
    return x509.load_pem_x509_certificate(found[0].encode())


def renewal_due(not_before: datetime, not_after: datetime, now: datetime) -> bool:
    """Renew once less than a third of the validity remains."""
    return not_after - now < (not_after - not_before) / 3


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None,
                   ) -> ssl.SSLContext:
    """Verifies the hub against CA (host names checked); presents CERT and KEY if given."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    return context
