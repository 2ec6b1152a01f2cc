"""Container mode's package store: the engine holds the images, this checks them first.

The same three steps as native mode's PackageStore (agent/package_store.py),
so the update state machine drives both:

- `download`: check the package's signature (pinned hub key), this
  platform's manifest, config and serving layer against their digests
  (`images.verify_remote`), put the pinned hub CA where the engine reads it
  (`trust`), and only then have the engine pull the image by manifest
  digest with the device's credentials (the engine checks every blob by
  digest);
- `verify`: the same signature check again (it is small; an agent that
  restarts in `verifying` has nothing else to go on) and the engine's image
  id against the signed config digest;
- `stage`: nothing to unpack: the version's paths are the image's own.

Which image each package became is kept in DATA/container-images.json, so
pruning removes the images of packages no longer kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from agent.container.engine import ContainerEngine, EngineError
from agent.container.images import ImageCheckError, VerifiedRef, verify_remote
from agent.container.trust import RegistryTrust, TrustError
from agent.package_store import StagedVersion, StageError
from contract.files import read_json, write_json
from contract.layers import ROOT
from contract.protocol import Package

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from packager.distribution import Registry

IMAGES_FILE = "container-images.json"
T = TypeVar("T")


class ContainerStore:
    def __init__(self, data_dir: Path, engine: ContainerEngine, *, registry: Callable[[], Registry],
                 hub_url: str, username: str, password: str, platform: str,
                 public_key: Callable[[], ec.EllipticCurvePublicKey],
                 trust: RegistryTrust | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.registry_host = urlsplit(hub_url).netloc  # the engine pulls HOST:PORT/REPOSITORY
        self.trust = trust  # None: a hub run with --insecure, nothing to trust
        self.credentials = {"username": username, "password": password}
        self.platform = platform
        self.public_key = public_key
        self.images_file = data_dir / IMAGES_FILE

    def download(self, registry: Registry, package: Package) -> str:
        """Check PACKAGE, then pull its image; the engine's image id."""
        ref = self._check(registry, package)
        if self.trust is not None:
            engine = _engine_step(self.engine.describe)["engine"]
            try:
                self.trust.install(engine)
            except TrustError as exc:
                raise StageError(str(exc)) from None
        image = _engine_step(lambda: self.engine.pull(
            self.registry_host, ref.repository, ref.manifest, ref.config, **self.credentials))
        self._record(package.digest, image)
        return image

    def verify(self, package: Package) -> tuple[VerifiedRef, str]:
        """PACKAGE's check again, and the image the engine holds for it: (ref, image id)."""
        ref = self._check(self.registry(), package)
        image = _engine_step(lambda: self.engine.check_image(
            self.registry_host, ref.repository, ref.manifest, ref.config))
        return ref, image

    def stage(self, deployment: str, version: int, package: Package,
              image: tuple[VerifiedRef, str]) -> StagedVersion:
        ref, image_id = image
        root = Path("/" + ROOT)  # inside the image
        return StagedVersion(root, root / "model", dict(ref.serving), image=image_id)

    def prune(self, deployment: str, keep: set[Path]) -> None:
        """Nothing unpacked on the host: containers are pruned by the serving side."""

    def prune_packages(self, keep: set[str]) -> int:
        """Remove the images of packages not in KEEP (digests); those a container still
        uses stay until it is removed. The bytes freed."""
        images = self._images()
        freed = 0
        for digest, image in sorted(images.items()):
            if digest not in keep:
                size = self._remove(image)
                if size is not None:
                    del images[digest]
                    freed += size
        write_json(self.images_file, images)
        return freed

    def _remove(self, image: str) -> int | None:
        return _engine_step(lambda: self.engine.remove_image(image))

    def _check(self, registry: Registry, package: Package) -> VerifiedRef:
        try:
            return verify_remote(registry, package.repository, package.digest,
                                 platform=self.platform, public_key=self.public_key())
        except ImageCheckError as exc:
            raise StageError(str(exc), transient=exc.transient) from None

    def _images(self) -> dict[str, str]:
        return dict(read_json(self.images_file)) if self.images_file.exists() else {}

    def _record(self, digest: str, image: str) -> None:
        write_json(self.images_file, {**self._images(), digest: image})


def _engine_step(step: Callable[[], T]) -> T:
    """STEP's result; an engine failure as the StageError the update state machine handles."""
    try:
        return step()
    except EngineError as exc:
        raise StageError(f"container engine: {exc}", transient=exc.transient) from None
