"""Packages in the hub's registry: which model version has one, signing, listing.

A package of model NAME version V lives in repository `models/NAME` under
tag `V`. The hub signs packages with its own key (the key every agent pins
at enrollment), writing a cosign signature into the same repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import ec

from contract import cosign, oci
from contract.errors import BlobNotFound, PackageError, RefNotFound
from contract.layers import ROLE
from contract.names import is_number
from hub import oci_registry as reg
from hub.errors import NotFound
from hub.oci_registry import RegistryError
from hub.storage.blobs import BlobStore
from hub.storage.db import Database


def repository(model: str) -> str:
    return f"models/{model}"


class RepoStore:
    """One repository of the hub's registry as a packager ImageStore."""

    def __init__(self, db: Database, blobs: BlobStore, repo: str) -> None:
        self.db, self.blobs, self.repo = db, blobs, repo

    def __str__(self) -> str:
        return f"the hub's repository {self.repo}"

    def open(self, digest: str) -> BinaryIO:
        if not reg.has_blob(self.db, self.blobs, self.repo, digest):
            raise BlobNotFound(f"{digest} is not in {self}")
        return self.blobs.open(digest)

    def resolve(self, ref: str) -> oci.Descriptor:
        try:
            found = reg.resolve(self.db, self.repo, ref)
        except RegistryError:
            raise RefNotFound(f"no tag {ref!r} in {self}") from None
        return oci.Descriptor(found.media_type, found.digest, found.size)

    def put(self, data: bytes, media_type: str) -> oci.Descriptor:
        if media_type in oci.MANIFEST_TYPES | oci.INDEX_TYPES:
            digest = reg.put_manifest(self.db, self.blobs, self.repo, oci.sha256_digest(data),
                                      media_type, data)
            return oci.Descriptor(media_type, digest, len(data))
        writer = self.blobs.writer()
        writer.write(data)
        digest, size = writer.commit()
        reg.link_blob(self.db, self.repo, digest)
        return oci.Descriptor(media_type, digest, size)

    def tag(self, ref: str, descriptor: oci.Descriptor) -> None:
        with self.blobs.open(descriptor.digest) as f:
            body = f.read()
        reg.put_manifest(self.db, self.blobs, self.repo, ref, descriptor.media_type, body)


def resolve_package(db: Database, model: str, version: int | str) -> reg.Manifest:
    try:
        return reg.resolve(db, repository(model), str(version))
    except RegistryError:
        raise NotFound(
            f"{model}:{version} has no package yet; build one with "
            f"`edgefleet package build {model}:{version}`"
        ) from None


def sign(
    db: Database, blobs: BlobStore, key: ec.EllipticCurvePrivateKey, model: str,
    version: int | str, *, reference: str,
) -> str:
    """Sign the package of MODEL:VERSION with the hub's key; REFERENCE is the
    image name written into the signed payload (registry host and repository)."""
    found = resolve_package(db, model, version)
    store = RepoStore(db, blobs, repository(model))
    signature = cosign.sign_package(store, found.digest, key, reference)
    return signature.digest


def _platforms(blobs: BlobStore, digest: str) -> list[dict[str, Any]]:
    with blobs.open(digest) as f:
        entries = oci.parse_index(f.read(), what=f"index {digest}")
    return [
        {"platform": str(e.platform) if e.platform else None, "digest": e.digest}
        for e in entries
    ]


def platform_coverage(blobs: BlobStore, digest: str,
                      wanted: Iterable[str]) -> tuple[list[str], set[str]]:
    """The platforms the package (index) DIGEST has images for, and those of WANTED
    (device platforms, os/arch[/variant]) it has none for; arm64 matches arm64/v8."""
    with blobs.open(digest) as f:
        entries = oci.parse_index(f.read(), what=f"index {digest}")
    have = [e.platform for e in entries if e.platform is not None]
    lacking = set()
    for text in wanted:
        try:
            platform = oci.Platform.parse(text)
        except PackageError:  # not a platform: nothing to compare
            continue
        if not any(platform.matches(p) for p in have):
            lacking.add(text)
    return [str(p) for p in have], lacking


def list_packages(db: Database, blobs: BlobStore, *, model: str | None = None) -> list[dict]:
    rows = db.query(
        "SELECT t.repo, t.tag, t.digest, t.updated_at, m.media_type, m.size FROM oci_tags t"
        " JOIN oci_manifests m ON m.repo = t.repo AND m.digest = t.digest"
        " WHERE t.repo LIKE 'models/%' AND t.tag NOT LIKE '%.sig'"
        + (" AND t.repo = ?" if model else "")
        + " ORDER BY t.repo, t.updated_at",
        [repository(model)] if model else [],
    )
    signed = {
        (r["repo"], r["tag"]) for r in db.query(
            "SELECT repo, tag FROM oci_tags WHERE repo LIKE 'models/%' AND tag LIKE '%.sig'"
        )
    }
    packages = []
    for r in rows:
        platforms = _platforms(blobs, r["digest"]) if r["media_type"] in oci.INDEX_TYPES else []
        packages.append({
            "model": r["repo"].removeprefix("models/"),
            # An int like every other listing's; a tag someone pushed that is no version
            # number (e.g. with skopeo) is still listed, under its tag.
            "version": int(r["tag"]) if is_number(r["tag"]) else None,
            "tag": r["tag"],
            "repository": r["repo"],
            "digest": r["digest"],
            "signed": (r["repo"], cosign.signature_tag(r["digest"])) in signed,
            "platforms": [p["platform"] for p in platforms],
            "updated_at": r["updated_at"],
        })
    return packages


def show_package(db: Database, blobs: BlobStore, model: str, version: int | str) -> dict:
    found = resolve_package(db, model, version)
    images = []
    for entry in _platforms(blobs, found.digest):
        with blobs.open(entry["digest"]) as f:
            manifest = oci.parse_manifest(f.read(), what=f"manifest {entry['digest']}")
        images.append({
            **entry,
            "layers": [
                {"role": layer.annotations.get(ROLE, "base"), "digest": layer.digest,
                 "size": layer.size, "media_type": layer.media_type}
                for layer in manifest.layers
            ],
        })
    listed = [p for p in list_packages(db, blobs, model=model) if p["tag"] == str(version)]
    with blobs.open(found.digest) as f:
        annotations = json.loads(f.read()).get("annotations", {})
    return {**listed[0], "annotations": annotations, "images": images}
