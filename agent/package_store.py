"""The device's package store: download, verify and stage packages.

Blobs land in one local OCI layout (`DATA/store`), so a model layer shared
by two versions is fetched and kept once, and an interrupted download
resumes from the bytes already on disk (`packager.distribution`). In native
mode only this platform's model and serving layers are fetched; manifests,
configs and the signature always are, so the package can be verified.

A staged version is a directory `DATA/versions/<deployment>/<version>-<digest>`
holding `model/` (the registered files) and `serving.json`; the serving
process loads it from there.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.errors import DiskFull, PackageError, VerificationError
from contract.layers import MODEL_DIR, SERVING_FILE
from contract.oci import Descriptor, OCILayout
from contract.protocol import Package
from contract.serving import read_serving

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from contract.verify import VerifiedImage
    from packager.distribution import Registry

NATIVE_ROLES = frozenset({"model", "serving"})


class StageError(Exception):
    """A package could not be fetched, verified or unpacked; the message says which and why."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient  # worth another try: the network failed, not the package or disk


@dataclass(frozen=True)
class StagedVersion:
    """A version unpacked and ready to load: what the serving process needs."""

    directory: Path
    model_dir: Path
    serving: dict[str, Any]  # serving.json: runtime, framework, entrypoint, prefer, sample_request
    image: str | None = None  # container mode: the engine's image id (paths are the image's)

    @property
    def entrypoint(self) -> str:
        return str(self.serving["entrypoint"])

    @property
    def framework(self) -> str:
        return str(self.serving["framework"])

    @property
    def sample_request(self) -> dict[str, Any] | None:
        return self.serving.get("sample_request")


class PackageStore:
    def __init__(
        self, data_dir: Path, *, platform: str, public_key: Callable[[], ec.EllipticCurvePublicKey],
    ) -> None:
        """PUBLIC_KEY gives the pinned key when the first package is verified."""
        self.layout = OCILayout.create(data_dir / "store")
        self.versions_dir = data_dir / "versions"
        self.platform = platform
        self.public_key = public_key

    def download(self, registry: Registry, package: Package) -> Descriptor:
        """Fetch what this device needs of PACKAGE (resumable), with its signature."""
        from packager.distribution import pull_signature, pull_to_layout

        try:
            index = pull_to_layout(
                registry, package.repository, package.digest, self.layout,
                tag=_tag(package.digest), platforms=[self.platform], roles=NATIVE_ROLES,
            )
            if not pull_signature(registry, package.repository, index.digest, self.layout):
                raise StageError(f"package {package.digest} has no signature in the registry")
        except VerificationError as exc:
            raise StageError(
                f"download of {package.digest} failed its digest check: {exc}"
            ) from None
        except DiskFull as exc:
            raise StageError(f"download of {package.digest} failed: {exc}") from None
        except PackageError as exc:
            raise StageError(f"download of {package.repository}@{package.digest} failed: {exc}",
                             transient=True) from None
        except OSError as exc:  # the store's disk: nothing another try would change
            raise StageError(f"download of {package.digest} failed: {exc}") from None
        return index

    def verify(self, package: Package) -> VerifiedImage:
        """Check the signature (the pinned hub key) and every fetched blob's digest."""
        from contract.verify import verify_package  # with cryptography: see __init__

        try:
            index = self.layout.resolve(_tag(package.digest))
            if index.digest != package.digest:
                raise StageError(
                    f"the store holds {index.digest} under the tag of {package.digest}"
                )
            verified = verify_package(
                self.layout, index, public_key=self.public_key(),
                platforms=[self.platform], roles=NATIVE_ROLES,
            )
        except PackageError as exc:
            raise StageError(f"verification of {package.digest} failed: {exc}") from None
        if self.platform not in verified.images:
            raise StageError(f"package {package.digest} has no image for {self.platform}")
        return verified.images[self.platform]

    def stage(
        self, deployment: str, version: int, package: Package, image: VerifiedImage
    ) -> StagedVersion:
        """Unpack the model and serving layers into this version's own directory."""
        directory = self.versions_dir / deployment / f"{version}-{package.digest[7:19]}"
        if (directory / "serving.json").exists():
            return self.staged(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        try:
            _extract(self.layout, image.layer("model"), f"{MODEL_DIR}/", tmp / "model")
            _extract(self.layout, image.layer("serving"), SERVING_FILE, tmp / "serving.json")
            read_serving((tmp / "serving.json").read_bytes())
        except (OSError, tarfile.TarError, ValueError, PackageError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StageError(f"unpacking {package.digest} failed: {exc}") from None
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        return self.staged(directory)

    def staged(self, directory: Path) -> StagedVersion:
        return StagedVersion(directory, directory / "model",
                             read_serving((directory / "serving.json").read_bytes()))

    def prune_packages(self, keep: set[str]) -> int:
        """Forget every package but those KEEP names (digests) and delete the blobs
        only they needed; the bytes freed. Unpacked versions are pruned apart (prune)."""
        from contract.cosign import signature_tag

        wanted = {_tag(d) for d in keep} | {signature_tag(d) for d in keep}
        self.layout.untag([ref for ref in self.layout.refs() if ref not in wanted])
        return self.layout.collect_garbage()

    def prune(self, deployment: str, keep: set[Path]) -> None:
        """Remove staged versions of DEPLOYMENT that are not in KEEP."""
        parent = self.versions_dir / deployment
        if not parent.is_dir():
            return
        for child in parent.iterdir():
            if child not in keep:
                shutil.rmtree(child, ignore_errors=True)


def _tag(digest: str) -> str:
    return "pkg-" + digest.removeprefix("sha256:")


def _extract(layout: OCILayout, layer: Descriptor, member_prefix: str, dest: Path) -> None:
    """Write the layer's files under MEMBER_PREFIX to DEST (a directory, or one file)."""
    # Streamed ("r|*": plain or gzip): a model layer can be larger than the device's memory.
    with layout.open(layer.digest) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(member_prefix.rstrip("/")):
                continue
            relative = member.name[len(member_prefix):] if member_prefix.endswith("/") else ""
            target = dest / relative if relative else dest
            if relative and (relative.startswith("/") or ".." in Path(relative).parts):
                raise StageError(f"refusing unsafe path {member.name!r} in layer {layer.digest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has content
            with open(target, "wb") as out:
                shutil.copyfileobj(source, out)
