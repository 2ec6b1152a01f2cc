"""The one signing scheme of edgefleet: ECDSA P-256 over SHA-256.

Packages (cosign-style signatures) and desired states both use it, the hub to
sign and the agent to verify. Private keys are PEM files written with mode
0600; they never enter the database or a log line.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contract.files import write_secret

ALGORITHM = "ecdsa-p256-sha256"


class SignatureError(Exception):
    """A signature is missing, malformed, or made by another key."""


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_private_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    """Write KEY as unencrypted PKCS#8 PEM, readable by its owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SignatureError(f"{path} is not an ECDSA P-256 private key")
    return key


def public_key_pem(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SignatureError("public key is not ECDSA P-256")
    return key


def key_id(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """A short stable name for a key: sha256 of its DER SubjectPublicKeyInfo."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()[:32]


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    """Base64 of the DER ECDSA signature over sha256(payload), as cosign stores it."""
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def verify(public: ec.EllipticCurvePublicKey, payload: bytes, signature_b64: str) -> None:
    """Raise SignatureError unless SIGNATURE_B64 is PUBLIC's signature of PAYLOAD."""
    try:
        raw = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        raise SignatureError("signature is not valid base64") from None
    try:
        public.verify(raw, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("signature does not match the payload and key") from None


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair as DIRECTORY/cosign.key (mode 0600) and DIRECTORY/cosign.pub.

    The names are cosign's, but the private key is plain unencrypted PKCS#8
    PEM, not cosign's password-encrypted format: the hub signs unattended,
    with no one to type a password, so the file mode is what protects it.
    cosign.pub is a PEM public key, which `cosign verify --key` reads as is.
    """
    private, public = directory / "cosign.key", directory / "cosign.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; use that key, or move it away to make a new one"
            )
    key = generate_private_key()
    write_private_key(key, private)
    public.write_text(public_key_pem(key))
    return private, public
