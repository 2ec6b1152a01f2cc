"""Kubernetes mode's package check, before anything is written to the cluster.

In Kubernetes mode the cluster's nodes pull the package's image; the agent
never holds the model. So it checks, in the hub's registry and with the
device's token, what decides what the cluster will run: the signature over
the index digest (the pinned hub key), the index, and for every platform
its manifest, its config and its serving layer (serving.json: what the pod
loads and self-tests), each against its digest (`contract.verify`, the code
native mode runs). The Deployment then names the image by that same index
digest, so the container runtime checks every other layer it pulls against
the signed manifests: a tampered layer never runs, and a package that is
unsigned, re-signed or whose index, manifests, configs or serving layer were
changed is never applied at all.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contract.errors import PackageError, VerificationError
from contract.layers import SERVING, SERVING_FILE
from contract.oci import read_blob
from contract.serving import read_serving

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from packager.distribution import Registry


class PackageCheckError(Exception):
    """The package failed its check (never applied); transient when the registry was
    not reached and another try may succeed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class CheckedPackage:
    platforms: tuple[str, ...]     # e.g. ("linux/amd64", "linux/arm64")
    serving: dict[str, Any]        # serving.json, the same in every platform's image


def check_package(registry: Registry, repository: str, digest: str, *,
                  public_key: ec.EllipticCurvePublicKey) -> CheckedPackage:
    """Check package DIGEST of REPOSITORY as the module docstring says."""
    from contract.verify import verify_package
    from packager.distribution import RemoteImage

    source = RemoteImage(registry, repository)
    try:
        index = source.resolve(digest)
        if index.digest != digest:
            raise VerificationError(f"the registry answers {index.digest} for {digest}")
        # As native mode: the signed payload names the registry's host, which the
        # agent may reach under another name, so the digest and the key are checked.
        verified = verify_package(source, index, public_key=public_key, roles={SERVING})
        documents = {}
        for platform, image in verified.images.items():
            layer = image.layer(SERVING)
            documents[platform] = _serving_json(
                read_blob(source, layer, what=f"serving layer of {platform}"), layer.digest)
    except VerificationError as exc:
        raise PackageCheckError(f"verification of {repository}@{digest} failed: {exc}") from None
    except PackageError as exc:
        raise PackageCheckError(f"cannot check {repository}@{digest}: {exc}",
                                transient=True) from None
    if not documents:
        raise PackageCheckError(f"package {repository}@{digest} has no image")
    first = next(iter(documents.values()))
    if any(document != first for document in documents.values()):
        # One Deployment runs every platform's pods with one self-test and one entrypoint.
        raise PackageCheckError(f"package {repository}@{digest}: its platforms' serving.json "
                                "differ")
    return CheckedPackage(tuple(sorted(documents)), first)


def _serving_json(layer: bytes, digest: str) -> dict[str, Any]:
    try:
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
            member = tar.extractfile(SERVING_FILE)
            if member is None:
                raise KeyError(SERVING_FILE)
            return read_serving(member.read())
    except (tarfile.TarError, KeyError, PackageError) as exc:
        raise VerificationError(f"the serving layer {digest} holds no valid {SERVING_FILE}: "
                                f"{exc}") from None
