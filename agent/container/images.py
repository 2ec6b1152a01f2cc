"""Container mode's package check: the signed package names the image the engine pulls.

Native mode fetches the model and serving layers itself and checks them; in
container mode the engine fetches the layers, so the agent splits the same
checks in two:

1. before anything is pulled, `verify_remote` reads from the hub's registry
   (with the device's token) only the small parts: the signature over the
   index digest (the hub's pinned key), the index, this platform's manifest,
   its config and its serving layer (serving.json: what to load and the
   self-test), each against its digest (`packager.verify`);
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

import io
import json
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contract.errors import PackageError, VerificationError
from contract.layers import MODEL_DIR, SERVING, SERVING_FILE
from contract.oci import BlobSource, Descriptor, parse_manifest, read_blob

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
    serving: Mapping[str, Any]  # the package's serving.json

    def load_request(self, version: int | str) -> dict[str, Any]:
        """The control API's PUT body that loads this version inside its container."""
        return {
            "version": str(version),
            "model_dir": f"/{MODEL_DIR}",
            "entrypoint": self.serving["entrypoint"],
            "framework": self.serving["framework"],
            "runtime": {"prefer": list(self.serving.get("prefer") or [])},
            "self_test": self.serving.get("sample_request"),
        }


def verify_remote(
    registry: Registry,
    repository: str,
    digest: str,
    *,
    platform: str,
    public_key: ec.EllipticCurvePublicKey,
) -> VerifiedRef:
    """Check the signature and this platform's manifest and config of package DIGEST."""
    from contract.verify import verify_package
    from packager.distribution import RemoteImage

    source = RemoteImage(registry, repository)
    try:
        index = source.resolve(digest)
        if index.digest != digest:
            raise VerificationError(f"the registry answers {index.digest} for {digest}")
        # As native mode: the signed payload names the registry's host, which the device
        # may reach under another name, so only the digest and the key are checked.
        verified = verify_package(source, index, public_key=public_key, platforms=[platform],
                                  roles={SERVING})
        image = verified.images.get(platform)
        if image is None:
            raise ImageCheckError(f"package {digest} has no image for {platform}")
        # The manifest was checked against its digest above; read again for its config's digest.
        _, body = registry.manifest(repository, image.manifest.digest)
        config = parse_manifest(body, what=f"manifest for {platform}").config.digest
        serving = _serving_json(source, image.layer(SERVING))
    except VerificationError as exc:
        raise ImageCheckError(f"verification of {repository}@{digest} failed: {exc}") from None
    except PackageError as exc:
        raise ImageCheckError(
            f"cannot check {repository}@{digest}: {exc}", transient=True
        ) from None
    return VerifiedRef(repository, digest, image.manifest.digest, config, serving)


def _serving_json(source: BlobSource, layer: Descriptor) -> dict[str, Any]:
    """serving.json from the serving layer, read again through its digest check."""
    data = read_blob(source, layer, what=f"serving layer {layer.digest}")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            member = tar.extractfile(SERVING_FILE)
            document = json.loads(member.read()) if member is not None else None
    except (tarfile.TarError, KeyError, ValueError) as exc:
        raise VerificationError(f"the serving layer {layer.digest} holds no readable "
                                f"{SERVING_FILE}: {exc}") from None
    if not isinstance(document, dict) or not {"entrypoint", "framework"} <= document.keys():
        raise VerificationError(f"{SERVING_FILE} in {layer.digest} lacks entrypoint or framework")
    return document
