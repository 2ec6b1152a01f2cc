"""Packages in the hub's registry: which model version has which, signing, listing.

A version may have several packages, its variants (another runtime, an int8
optimisation, another platform set), each named: the default variant of model
NAME version V lives in repository `models/NAME` under tag `V`, variant X under
`V-X` (`contract.names.package_tag`). A package never changes once pushed: the
registry refuses to move its tag (409), and a build with other inputs under a
taken variant name is refused before any work (`check_build`, 409 naming what
uses it). The hub signs packages with its own key (the key every agent pins at
enrollment), writing a cosign signature into the same repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import ec

from contract import cosign, oci
from contract.errors import BlobNotFound, PackageError, RefNotFound
from contract.layers import BUILD, ROLE
from contract.names import DEFAULT_VARIANT, is_number, package_tag, parse_package_tag
from hub import oci_registry as reg
from hub import package_use
from hub.errors import Conflict, NotFound
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


def _number(version: int | str) -> int:
    if isinstance(version, int):
        return version
    if not is_number(version) or len(version) > 18:
        raise NotFound(f"no package of version {version[:40]!r}: give a version number")
    return int(version)


def resolve_package(db: Database, model: str, version: int | str,
                    variant: str = DEFAULT_VARIANT) -> reg.Manifest:
    tag = package_tag(_number(version), variant)
    try:
        return reg.resolve(db, repository(model), tag)
    except RegistryError:
        flag = "" if variant == DEFAULT_VARIANT else f" --variant {variant}"
        others = variants_of(db, model, _number(version))
        also = f" (it has {', '.join(others)})" if others else ""
        raise NotFound(f"{package_use.named(model, version, variant)} has no package yet{also};"
                       f" build one with `edgefleet package build {model}:{version}{flag}`"
                       ) from None


def variants_of(db: Database, model: str, version: int) -> list[str]:
    """The variants VERSION of MODEL has packages for."""
    tags = [r["tag"] for r in db.query("SELECT tag FROM oci_tags WHERE repo = ? ORDER BY tag",
                                       (repository(model),))]
    return [parsed[1] for t in tags
            if (parsed := parse_package_tag(t)) is not None and parsed[0] == version]


def build_record(blobs: BlobStore, digest: str) -> dict[str, Any] | None:
    """The build inputs recorded on the package (index) DIGEST, None for one built before
    they were recorded or pushed by other tools."""
    with blobs.open(digest) as f:
        annotations = json.loads(f.read()).get("annotations") or {}
    text = annotations.get(BUILD)
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_build(db: Database, blobs: BlobStore, model: str, version: int | str, variant: str,
                build: dict[str, Any]) -> dict[str, Any]:
    """Whether a build of MODEL:VERSION's VARIANT with the inputs BUILD may go ahead:
    {"exists": false} when the variant has no package yet; {"exists": true, digest, signed}
    when it has one built from the same inputs (building again would give it back, so there
    is nothing to do); Conflict (409) naming what uses it when it has a different one."""
    number = _number(version)
    try:
        found = resolve_package(db, model, number, variant)
    except NotFound:
        return {"exists": False}
    if build_record(blobs, found.digest) == build:
        return {"exists": True, "digest": found.digest, "signed": is_signed(db, model, found)}
    raise Conflict(package_use.refusal(db, model, number, variant, found.digest))


def is_signed(db: Database, model: str, found: reg.Manifest) -> bool:
    return db.query_one("SELECT 1 FROM oci_tags WHERE repo = ? AND tag = ?",
                        (repository(model), cosign.signature_tag(found.digest))) is not None


def sign(
    db: Database, blobs: BlobStore, key: ec.EllipticCurvePrivateKey, model: str,
    version: int | str, *, reference: str, variant: str = DEFAULT_VARIANT,
) -> str:
    """Sign MODEL:VERSION's package VARIANT with the hub's key; REFERENCE is the
    image name written into the signed payload (registry host and repository)."""
    found = resolve_package(db, model, version, variant)
    store = RepoStore(db, blobs, repository(model))
    signature = cosign.sign_package(store, found.digest, key, reference)
    return signature.digest


def countersign_all(
    db: Database, blobs: BlobStore, old: ec.EllipticCurvePublicKey,
    key: ec.EllipticCurvePrivateKey,
) -> int:
    """Sign with KEY every package OLD signed (a key rotation); returns how many."""
    count = 0
    for row in db.query("SELECT repo, tag FROM oci_tags WHERE tag LIKE 'sha256-%.sig'"):
        digest = "sha256:" + row["tag"].removeprefix("sha256-").removesuffix(".sig")
        count += cosign.countersign(RepoStore(db, blobs, row["repo"]), digest, old, key)
    return count


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
        # An int like every other listing's; a tag someone pushed that is no package tag
        # (e.g. with skopeo) is still listed, under its tag.
        version, variant = parse_package_tag(r["tag"]) or (None, None)
        packages.append({
            "model": r["repo"].removeprefix("models/"),
            "version": version,
            "variant": variant,
            "tag": r["tag"],
            "repository": r["repo"],
            "digest": r["digest"],
            "signed": (r["repo"], cosign.signature_tag(r["digest"])) in signed,
            "platforms": [p["platform"] for p in platforms],
            "updated_at": r["updated_at"],
        })
    return packages


def show_package(db: Database, blobs: BlobStore, model: str, version: int | str,
                 variant: str = DEFAULT_VARIANT) -> dict:
    found = resolve_package(db, model, version, variant)
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
    tag = package_tag(_number(version), variant)
    listed = [p for p in list_packages(db, blobs, model=model) if p["tag"] == tag]
    with blobs.open(found.digest) as f:
        annotations = json.loads(f.read()).get("annotations", {})
    return {**listed[0], "annotations": annotations, "build": build_record(blobs, found.digest),
            "used_by": package_use.users(db, model, _number(version), variant),
            "images": images}
