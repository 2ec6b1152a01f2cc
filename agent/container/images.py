"""Container mode's package check: the signed package names the image the engine pulls.

Native mode fetches the model and serving layers itself and checks them; in
container mode the engine fetches the layers, so the agent splits the same
checks in two:

1. before anything is pulled, `verify_remote` reads from the hub's registry
   (with the device's token) only the small parts: the signature over the
   index digest (the hub's pinned key), the index,
   this platform's manifest and its config, each against its digest
   (`packager.verify`, with no layer roles);
2. the engine then pulls `repository@<manifest digest>`: a pull by digest
   makes the engine check the manifest and every layer blob against it and
   the layers against the config's diff_ids, and `ContainerEngine.pull`
   checks the image it got has the verified config's digest as its id.

So a tampered blob fails the engine's pull, an unsigned or re-signed package
fails step 1, and nothing runs that the pinned key did not sign.

This is the container package's only module that imports the packager's
contract (issue 10 moves `packager.verify`/`errors` to `contract/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from packager.errors import PackagerError, VerificationError
from packager.oci import parse_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from packager.distribution import Registry


class ImageCheckError(Exception):
    """The package could not be checked; transient when another try may succeed (network)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class VerifiedRef:
    """What the engine must pull and what it must end up with, from a verified package."""

    repository: str  # in the hub's registry, e.g. models/diabetes
    index: str  # the signed package index digest
    manifest: str  # this platform's image manifest digest: what the engine pulls
    config: str  # its config digest: the engine's image id once pulled


def verify_remote(
    registry: Registry,
    repository: str,
    digest: str,
    *,
    platform: str,
    public_key: ec.EllipticCurvePublicKey,
) -> VerifiedRef:
    """Check the signature and this platform's manifest and config of package DIGEST."""
    from packager.distribution import RemoteImage
    from packager.verify import verify_package

    source = RemoteImage(registry, repository)
    try:
        index = source.resolve(digest)
        if index.digest != digest:
            raise VerificationError(f"the registry answers {index.digest} for {digest}")
        # As native mode: the signed payload names the registry's host, which the device
        # may reach under another name, so only the digest and the key are checked.
        verified = verify_package(source, index, public_key=public_key, platforms=[platform],
                                  roles=())
        image = verified.images.get(platform)
        if image is None:
            raise ImageCheckError(f"package {digest} has no image for {platform}")
        # The manifest was checked against its digest above; read again for its config's digest.
        _, body = registry.manifest(repository, image.manifest.digest)
        config = parse_manifest(body, what=f"manifest for {platform}").config.digest
    except VerificationError as exc:
        raise ImageCheckError(f"verification of {repository}@{digest} failed: {exc}") from None
    except PackagerError as exc:
        raise ImageCheckError(f"cannot check {repository}@{digest}: {exc}", transient=True) from None
    return VerifiedRef(repository, digest, image.manifest.digest, config)
