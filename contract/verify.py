"""Check a package before using it: who signed it, and every blob it is made of.

`verify_package` checks, in order:
1. the signature (`contract.cosign`): made by the given public key, over a
   payload that names the package's index digest;
2. the index, each manifest, each config and each layer against the
   descriptor that points at it: size, then sha256;
3. that the parts fit: each manifest's config is for the platform the index
   lists it under, with one diff_id per layer.

Blobs come from any `BlobSource`, so the agent checks what it fetched from the
hub's registry with the same code that checks an OCI layout. A device checks
its own platform only, and in native mode only the model and serving layers:
`platforms` and `roles` say which. Every error names the blob and where it
sits ("blob sha256:... of layer 3 (model) of linux/arm64 does not match its
descriptor: digest mismatch, ...").

Stdlib + cryptography only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from contract.cosign import verify_signature
from contract.errors import VerificationError
from contract.layers import ROLE
from contract.oci import (
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    BlobSource,
    Descriptor,
    ImageSource,
    Platform,
    copy_blob,
    parse_index,
    parse_json,
    parse_manifest,
    read_blob,
)


@dataclass(frozen=True)
class VerifiedImage:
    platform: Platform
    manifest: Descriptor
    config: Mapping[str, Any]
    # Every layer of the image, bottom-up; those outside `roles` were not fetched or checked.
    layers: tuple[Descriptor, ...]

    def layer(self, role: str) -> Descriptor:
        """The layer with ROLE (model, serving, deps)."""
        for layer in self.layers:
            if layer.annotations.get(ROLE) == role:
                return layer
        raise VerificationError(f"the {self.platform} image of this package has no {role} layer")


@dataclass(frozen=True)
class VerifiedPackage:
    index: Descriptor
    images: Mapping[str, VerifiedImage]


def verify_package(
    source: ImageSource,
    index: Descriptor,
    *,
    public_key: ec.EllipticCurvePublicKey,
    repository: str | None = None,
    platforms: Collection[str] | None = None,
    roles: Collection[str] | None = None,
) -> VerifiedPackage:
    """Check the signature of the package INDEX in SOURCE, then its contents.

    REPOSITORY, if given, must be the one named in the signed payload.
    PLATFORMS (e.g. ["linux/arm64"]) and ROLES (e.g. {"model", "serving"})
    narrow the contents checked; None checks everything.
    """
    verify_signature(source, index.digest, public_key, repository=repository)
    return verify_contents(source, index, platforms=platforms, roles=roles)


def verify_contents(
    source: BlobSource,
    index: Descriptor,
    *,
    platforms: Collection[str] | None = None,
    roles: Collection[str] | None = None,
) -> VerifiedPackage:
    """Every blob reachable from INDEX matches its descriptor, and the parts fit together."""
    if index.media_type not in INDEX_TYPES:
        raise VerificationError(
            f"package {index.digest} is a {index.media_type}, not an image index"
        )
    what = f"index {index.digest}"
    entries = parse_index(read_blob(source, index, what=what), what=what)
    wanted = None if platforms is None else [Platform.parse(p) for p in platforms]
    images: dict[str, VerifiedImage] = {}
    checked: set[str] = set()
    for entry in entries:
        if entry.platform is None:
            raise VerificationError(f"{what} lists manifest {entry.digest} without a platform")
        if wanted is not None and not any(entry.platform.matches(p) for p in wanted):
            continue
        name = str(entry.platform)
        if name in images:
            raise VerificationError(f"{what} lists two images for {name}")
        images[name] = _verify_image(source, entry, name, roles, checked)
    for platform in wanted or ():
        if not any(platform.matches(image.platform) for image in images.values()):
            have = ", ".join(str(e.platform) for e in entries)
            raise VerificationError(
                f"package {index.digest} has no image for {platform} (it has {have})"
            )
    return VerifiedPackage(index, images)


def _verify_image(
    source: BlobSource,
    entry: Descriptor,
    name: str,
    roles: Collection[str] | None,
    checked: set[str],
) -> VerifiedImage:
    assert entry.platform is not None
    what = f"manifest for {name}"
    if entry.media_type not in MANIFEST_TYPES:
        raise VerificationError(
            f"the index entry for {name} is a {entry.media_type}, not an image manifest"
        )
    manifest = parse_manifest(read_blob(source, entry, what=what), what=what)
    config = parse_json(
        read_blob(source, manifest.config, what=f"config of {name}"), what=f"config of {name}"
    )
    found = Platform.from_dict(config, what=f"config of {name}")
    if not found.matches(entry.platform):
        raise VerificationError(
            f"{what} is for a {found} image: the index lists it under the wrong platform"
        )
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise VerificationError(f"config of {name} does not list one diff_id per layer")
    for number, layer in enumerate(manifest.layers, start=1):
        role = layer.annotations.get(ROLE)
        if roles is not None and role not in roles:
            continue
        where = f"layer {number} ({role}) of {name}" if role else f"layer {number} of {name}"
        if layer.media_type not in LAYER_TYPES:
            raise VerificationError(f"{where} has unsupported media type {layer.media_type}")
        # A blob shared by several images (the model layer) is read once.
        if layer.digest not in checked:
            copy_blob(source, layer, None, what=f"blob {layer.digest} of {where}")
            checked.add(layer.digest)
    return VerifiedImage(entry.platform, entry, config, manifest.layers)
