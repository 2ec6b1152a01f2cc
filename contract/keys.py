"""Hub signing-key rotation: the statements that hand trust from one key to the next.

A device trusts one hub key at a time (`Trust`). When the hub rotates, it
signs a rotation statement with the key being retired (or with the offline
root key): "key N+1 is PEM; it replaces the key with id PREVIOUS". The hub
keeps every statement it made, its chain, and sends the chain with every
desired state (outside the state's own signature), so a device offline
across any number of rotations walks the chain from the key it trusts to
the newest one (`follow`) before it checks the state. The keys walked past
are retired: what they sign is refused with a reason that says so.

Root key: a statement signed by the root key (whose public half devices got
at enrollment) is accepted whatever PREVIOUS says, so a new key replaces a
compromised one without its help.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from contract.canonical import canonical_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

ROTATION_SCHEMA: Final = "edgefleet.key-rotation/v1"
# Statements sent with a desired state; a device further behind enrolls again. Each
# is ~540 bytes in every device's retained state (bench/keys.py): 16 is ~9 KB.
MAX_CHAIN: Final = 16
MAX_RETIRED: Final = 256  # key ids a device remembers, for the refusal's reason


# The inventory fact a device reports its trusted key id in: the hub counts them.
HUB_KEY_FACT: Final = "hub_key"


def pem_key_id(pem: str) -> str:
    """`signing.key_id` of a PEM public key, without cryptography (an idle agent reports it
    and stays small): the PEM's base64 body is the DER SubjectPublicKeyInfo."""
    import hashlib  # OpenSSL's libcrypto, 3.5 MB: an agent that knows the id never loads it

    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:
        raise RotationError("a hub key is not a PEM public key") from None
    return "sha256:" + hashlib.sha256(der).hexdigest()[:32]


class RotationError(Exception):
    """A rotation statement or chain this device cannot follow."""


@dataclass(frozen=True)
class Trust:
    """What a device trusts: the hub key (PEM), how many rotations made it, the key ids
    it has retired and the offline root key (PEM) that may sign a rotation, if any."""

    key: str
    sequence: int = 0
    retired: tuple[str, ...] = ()
    root: str | None = None

    @property
    def key_id(self) -> str:
        return pem_key_id(self.key)

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "sequence": self.sequence, "retired": list(self.retired),
                "root": self.root}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Trust:
        return cls(key=str(value["key"]), sequence=int(value["sequence"]),
                   retired=tuple(str(k) for k in value.get("retired", ())),
                   root=value.get("root"))


def sign_rotation(
    *, sequence: int, previous: str, key_pem: str, issued_at: datetime,
    signer: ec.EllipticCurvePrivateKey,
) -> dict[str, Any]:
    """The statement that KEY_PEM is rotation SEQUENCE, replacing the key with id PREVIOUS,
    signed by SIGNER (the key it replaces, or the root key)."""
    from contract import signing
    from contract.protocol import format_time

    body = {"schema": ROTATION_SCHEMA, "sequence": sequence, "previous": previous,
            "key": key_pem, "issued_at": format_time(issued_at)}
    signature = {"keyid": signing.key_id(signer), "alg": signing.ALGORITHM,
                 "value": signing.sign(signer, canonical_json(body))}
    return {**body, "signature": signature}


def follow(trust: Trust, chain: object) -> Trust:
    """TRUST after the statements of CHAIN it has not seen; RotationError if one of
    those does not follow from the key trusted before it. Older statements are skipped:
    the chain comes again with every desired state."""
    from contract import signing

    if not isinstance(chain, list):
        raise RotationError("the key rotation chain is not a list")
    if len(chain) > MAX_CHAIN:
        raise RotationError(f"{len(chain)} key rotation statements; the limit is {MAX_CHAIN}")
    try:
        return _follow(trust, chain)
    except signing.SignatureError as exc:  # the device's own trust file is unreadable
        raise RotationError(f"{exc}: enroll this device again") from None


def _follow(trust: Trust, chain: list[object]) -> Trust:
    from contract import signing

    root_id = pem_key_id(trust.root) if trust.root else None
    for statement in chain:
        sequence, previous, key_pem, signature = _fields(statement)
        if sequence <= trust.sequence:
            continue
        current = trust.key_id
        signer = signature["keyid"]
        by_root = root_id is not None and signer == root_id
        if not by_root:
            if sequence != trust.sequence + 1:
                raise RotationError(f"rotation {sequence} does not follow rotation "
                                    f"{trust.sequence}, the one this device trusts")
            if previous != current or signer != current:
                raise RotationError(f"rotation {sequence} replaces key {previous} and is "
                                    f"signed by {signer}, but this device trusts {current}")
        assert isinstance(statement, dict)  # _fields checked it
        body = {k: v for k, v in statement.items() if k != "signature"}
        public = signing.load_public_key(trust.root if by_root and trust.root else trust.key)
        try:
            if signature["alg"] != signing.ALGORITHM:
                raise signing.SignatureError(f"algorithm {signature['alg']!r}")
            signing.verify(public, canonical_json(body), signature["value"])
            new_id = signing.key_id(signing.load_public_key(key_pem))
        except (signing.SignatureError, ValueError) as exc:
            raise RotationError(f"rotation {sequence}: {exc}") from None
        if new_id == current or new_id in trust.retired:
            raise RotationError(f"rotation {sequence} brings back key {new_id}")
        trust = replace(trust, key=key_pem, sequence=sequence,
                        retired=(*trust.retired, current)[-MAX_RETIRED:])
    return trust


def _fields(statement: object) -> tuple[int, str, str, dict[str, str]]:
    if not isinstance(statement, dict) or statement.get("schema") != ROTATION_SCHEMA:
        raise RotationError(f"not a {ROTATION_SCHEMA} statement")
    sequence, previous, key_pem = (statement.get(k) for k in ("sequence", "previous", "key"))
    signature = statement.get("signature")
    if not (isinstance(sequence, int) and not isinstance(sequence, bool) and sequence > 0
            and isinstance(previous, str) and isinstance(key_pem, str)
            and len(key_pem) < 1024 and isinstance(signature, dict)
            and all(isinstance(signature.get(k), str) for k in ("keyid", "alg", "value"))):
        raise RotationError("a key rotation statement lacks sequence, previous, key or "
                            "signature")
    if set(statement) != {"schema", "sequence", "previous", "key", "issued_at", "signature"}:
        raise RotationError("a key rotation statement has unknown fields")
    return sequence, previous, key_pem, signature


def chain_tail(chain: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The statements sent with a desired state: the newest MAX_CHAIN."""
    return list(chain[-MAX_CHAIN:])
