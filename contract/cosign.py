"""Package signatures in cosign's format, so `cosign verify --key` can check them too.

The signature of a package whose index digest is sha256:HEX is an OCI image
manifest tagged `sha256-HEX.sig` next to the package. Each of its layers is
one signature: a "simple signing" payload

    {"critical":{"identity":{"docker-reference":REPOSITORY},
                 "image":{"docker-manifest-digest":DIGEST},
                 "type":"cosign container image signature"},"optional":null}

(canonical JSON gives the very bytes cosign writes) with media type
application/vnd.dev.cosign.simplesigning.v1+json and the base64 DER ECDSA
P-256 signature over it in the annotation dev.cosignproject.cosign/signature.
The config is the near-empty one cosign writes. The keys and the signature
scheme are `contract.signing`'s. These signatures are not in a transparency
log, so cosign needs `--insecure-ignore-tlog` to check them.

Stdlib + cryptography only: the agent verifies with this module.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from contract.canonical import canonical_json
from contract.errors import BlobNotFound, PackageError, RefNotFound, VerificationError
from contract.oci import (
    CONFIG,
    MANIFEST,
    Descriptor,
    ImageSource,
    ImageStore,
    check_digest,
    parse_manifest,
    read_blob,
)
from contract.signing import SignatureError, key_id, sign, verify

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
# cosign's signature images carry the zero time of Go, not a real one.
_ZERO_TIME = "0001-01-01T00:00:00Z"


def signature_tag(digest: str) -> str:
    return f"sha256-{check_digest(digest)}.sig"


def simple_signing_payload(digest: str, repository: str) -> bytes:
    check_digest(digest)
    return canonical_json(
        {
            "critical": {
                "identity": {"docker-reference": repository},
                "image": {"docker-manifest-digest": digest},
                "type": SIGNATURE_TYPE,
            },
            "optional": None,
        }
    )


def sign_package(
    store: ImageStore, digest: str, key: ec.EllipticCurvePrivateKey, repository: str
) -> Descriptor:
    """Sign the package DIGEST in STORE as REPOSITORY with KEY; returns the signature manifest.

    Other signers' signatures already there are kept, as cosign does. Signing
    again with the same key and repository changes nothing.
    """
    payload = simple_signing_payload(digest, repository)
    try:
        store.open(digest).close()
    except BlobNotFound:
        raise PackageError(
            f"{store} has no package {digest} to sign; build or push it first"
        ) from None
    tag = signature_tag(digest)
    descriptor, layers = _existing(store, tag) or (None, ())
    if descriptor is not None and any(
        _verifies(store, layer, key.public_key(), tag) == payload for layer in layers
    ):
        return descriptor
    stored = store.put(payload, SIMPLE_SIGNING)
    signature = Descriptor(
        SIMPLE_SIGNING, stored.digest, stored.size, {SIGNATURE_ANNOTATION: sign(key, payload)}
    )
    all_layers = [*layers, signature]
    config = store.put(
        canonical_json(
            {
                "architecture": "",
                "config": {},
                "created": _ZERO_TIME,
                "history": [{"created": _ZERO_TIME} for _ in all_layers],
                "os": "",
                "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in all_layers]},
            }
        ),
        CONFIG,
    )
    manifest = store.put(
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": config.to_dict(),
                "layers": [layer.to_dict() for layer in all_layers],
            }
        ),
        MANIFEST,
    )
    store.tag(tag, manifest)
    return manifest


def countersign(
    store: ImageStore, digest: str, old: ec.EllipticCurvePublicKey,
    key: ec.EllipticCurvePrivateKey,
) -> bool:
    """Sign with KEY what OLD signed for the package DIGEST (a key rotation: the
    package stays usable by devices that trust only KEY); False if OLD signed nothing."""
    tag = signature_tag(digest)
    _, layers = _existing(store, tag) or (None, ())
    signed = [p for layer in layers if (p := _verifies(store, layer, old, tag)) is not None]
    for payload in signed:
        try:
            repository = json.loads(payload)["critical"]["identity"]["docker-reference"]
        except (ValueError, KeyError, TypeError):
            continue  # not a payload this hub wrote: nothing to vouch for
        sign_package(store, digest, key, repository)
    return bool(signed)


def verify_signature(
    source: ImageSource,
    digest: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    repository: str | None = None,
) -> None:
    """Fail unless PUBLIC_KEY signed a payload naming DIGEST (and REPOSITORY, if given)."""
    tag = signature_tag(digest)
    descriptor, layers = _existing(source, tag) or (None, ())
    if descriptor is None:
        raise VerificationError(
            f"package {digest} is not signed: {source} has no tag {tag}; sign it with sign_package"
        )
    payloads = [
        p for layer in layers if (p := _verifies(source, layer, public_key, tag)) is not None
    ]
    if not payloads:
        raise VerificationError(
            f"signature made by another key: none of the {len(layers)} signature(s) under {tag} "
            f"verifies with public key {key_id(public_key)}"
        )
    problems = [_payload_problem(p, digest, repository) for p in payloads]
    if None not in problems:
        raise VerificationError(f"the payload signed under {tag} {problems[0]}")


def _existing(source: ImageSource, tag: str) -> tuple[Descriptor, tuple[Descriptor, ...]] | None:
    """The signature manifest under TAG and its signature layers, or None if there is none."""
    try:
        descriptor = source.resolve(tag)
    except RefNotFound:
        return None
    what = f"signature manifest {tag}"
    manifest = parse_manifest(read_blob(source, descriptor, what=what), what=what)
    return descriptor, tuple(
        layer for layer in manifest.layers if layer.media_type == SIMPLE_SIGNING
    )


def _verifies(
    source: ImageSource, layer: Descriptor, public_key: ec.EllipticCurvePublicKey, tag: str
) -> bytes | None:
    """LAYER's payload if its signature is PUBLIC_KEY's, else None."""
    payload = read_blob(source, layer, what=f"signature payload {layer.digest} under {tag}")
    try:
        verify(public_key, payload, layer.annotations.get(SIGNATURE_ANNOTATION, ""))
    except SignatureError:
        return None
    return payload


def _payload_problem(payload: bytes, digest: str, repository: str | None) -> str | None:
    try:
        critical: Any = json.loads(payload)["critical"]
        signed_type = critical["type"]
        signed_digest = critical["image"]["docker-manifest-digest"]
        signed_repository = critical["identity"]["docker-reference"]
    except (ValueError, KeyError, TypeError):
        return "is not a cosign simple-signing payload"
    if signed_type != SIGNATURE_TYPE:
        return f"has type {signed_type!r}, not {SIGNATURE_TYPE!r}"
    if signed_digest != digest:
        return f"names {signed_digest}, not the package {digest}"
    if repository is not None and signed_repository != repository:
        return f"is for repository {signed_repository!r}, not {repository!r}"
    return None
