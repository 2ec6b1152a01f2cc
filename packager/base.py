"""A base image from Debian packages, with no engine and no Docker Hub: Python 3.11 for packages.

`DebianBase` runs `mmdebstrap` (minbase + python3 + ca-certificates) for each
platform and stores the result as an OCI image: one gzip layer, rewritten by
`packager.tarball.rewrite_tar` (sorted, fixed mtimes, numeric owners), and a
config that runs python3. Images are cached in one OCI layout
(`~/.cache/edgefleet/bases`), tagged with the hash of their inputs (suite,
mirrors, packages, platform, epoch), so the 30-120 s debootstrap runs once
per machine; the multi-platform index a build asks for is tagged with the
hash of its images. Given the hub's registry, bases are shared through it
(repository `bases/debian`, same tags): built once per fleet, pulled by
every other build machine. Nothing in the cache changes once written: delete the
directory to move to newer Debian packages.

A base's epoch is fixed (BASE_EPOCH), not the package's SOURCE_DATE_EPOCH:
then every version of every model built on one machine shares the base's
blobs, and devices fetch them once. Reproducible across machines only with
a pinned mirror (e.g. a snapshot.debian.org URL), since the package set is
whatever the mirror serves.

A foreign platform runs Debian's maintainer scripts through qemu: it is
built only where the kernel has a binfmt handler for it, otherwise it is
`PlatformUnavailable` with what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import platform as host
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from contract.errors import PackageError, RefNotFound
from contract.oci import (
    CONFIG,
    INDEX,
    INDEX_TYPES,
    LAYER_TAR_GZIP,
    MANIFEST,
    Descriptor,
    HashingWriter,
    OCILayout,
    Platform,
    canonical_json,
    parse_manifest,
)
from packager.deps import PlatformUnavailable
from packager.layers import GZIP_LEVEL
from packager.tarball import rewrite_tar

if TYPE_CHECKING:
    from packager.distribution import Registry

# What numpy, onnxruntime, openvino and ai-edge-litert manylinux wheels load besides
# CPython 3.11: glibc, libstdc++ and libgcc_s, all in minbase already.
PACKAGES = ("python3", "ca-certificates")
SUITE = "bookworm"  # Debian 12: Python 3.11, the version packages are built for
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_EPOCH = 0
REPOSITORY = "bases/debian"  # in the hub's registry, tagged with each image's cache key
MMDEBSTRAP_TIMEOUT = 30 * 60
ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
DEBIAN_ARCHITECTURES = {"linux/amd64": "amd64", "linux/arm64": "arm64", "linux/arm/v7": "armhf"}
# Debian architecture -> the name of the kernel's binfmt_misc entry that runs it (Debian's qemu).
_QEMU = {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64", "armhf": "qemu-arm"}
_NATIVE = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


class BaseError(PackageError):
    """mmdebstrap failed or is missing."""


@dataclass(frozen=True)
class BaseSpec:
    """The inputs of a Debian base: everything its cache key is made of."""

    suite: str = SUITE
    mirror: str = MIRROR
    security_mirror: str | None = SECURITY_MIRROR
    packages: tuple[str, ...] = PACKAGES
    epoch: int = BASE_EPOCH

    def key(self, platform: Platform) -> str:
        """The cache tag of this spec's image for PLATFORM."""
        inputs = {**asdict(self), "packages": sorted(self.packages), "platform": str(platform),
                  "format": 1}
        return "debian-" + hashlib.sha256(canonical_json(inputs)).hexdigest()[:32]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgefleet" / "bases"


def debian_architecture(platform: Platform) -> str:
    arch = DEBIAN_ARCHITECTURES.get(str(platform))
    if arch is None:
        raise PlatformUnavailable(
            f"no Debian base for {platform}; supported: {', '.join(DEBIAN_ARCHITECTURES)}"
        )
    return arch


def can_run(arch: str) -> bool:
    """Whether this machine runs ARCH's binaries: natively, or through a qemu binfmt handler."""
    if _NATIVE.get(host.machine()) == arch:
        return True
    entry = BINFMT_DIR / _QEMU[arch]
    try:
        return entry.read_text().startswith("enabled")
    except OSError:
        return False


def check_debian_platform(platform: Platform) -> None:
    """PlatformUnavailable, saying what to do, unless this machine can build PLATFORM's base."""
    arch = debian_architecture(platform)
    if not can_run(arch):
        raise PlatformUnavailable(
            f"cannot build a Debian base for {platform} on this {host.machine()} machine: the "
            f"kernel has no {_QEMU[arch]} binfmt handler (apt-get install qemu-user-static "
            "binfmt-support), or give a base image with --base"
        )


@dataclass(frozen=True)
class DebianBase:
    """Debian base images for builds: from the local cache, else the hub's registry, else built.

    With REGISTRY, a base another machine built and pushed to REPOSITORY
    (tag: the spec's key for the platform) is pulled instead of built, so a
    machine without qemu can still build that platform's images; with PUSH,
    a base built here is pushed there for the others.
    """

    spec: BaseSpec = BaseSpec()
    cache_dir: Path | None = None
    registry: Registry | None = None
    repository: str = REPOSITORY
    push: bool = False

    def check(self, platform: Platform) -> None:
        """PlatformUnavailable, saying what to do, unless PLATFORM's base can be had."""
        key = self.spec.key(platform)
        if key in self._layout().refs() or self._remote(key) is not None:
            return
        check_debian_platform(platform)

    def __call__(self, platforms: Sequence[str]) -> tuple[Path, str]:
        """An OCI layout and tag holding a base image index for PLATFORMS."""
        targets = [Platform.parse(p) for p in platforms]
        if not targets:
            raise PackageError("no platforms given for a Debian base")
        for target in targets:
            self.check(target)
        layout = self._layout()
        images = [self._image(layout, target) for target in targets]
        index = canonical_json(
            {"schemaVersion": 2, "mediaType": INDEX, "manifests": [d.to_dict() for d in images]}
        )
        tag = "index-" + hashlib.sha256(index).hexdigest()[:32]
        layout.tag(tag, layout.put(index, INDEX))
        return layout.root, tag

    def _layout(self) -> OCILayout:
        return OCILayout.create(self.cache_dir or default_cache_dir())

    def _image(self, layout: OCILayout, platform: Platform) -> Descriptor:
        key = self.spec.key(platform)
        remote = self._remote(key)
        if key not in layout.refs():
            if remote is not None:
                self._pull(layout, key, remote)
            else:
                _build_image(layout, self.spec, platform, key)
        if self.registry is not None and self.push and remote is None:
            from packager.distribution import push_layout

            push_layout(layout, self.registry, self.repository, [key])
        found = layout.resolve(key)
        return Descriptor(found.media_type, found.digest, found.size, platform=platform)

    def _remote(self, key: str) -> tuple[Descriptor, bytes] | None:
        if self.registry is None:
            return None
        try:
            return self.registry.manifest(self.repository, key)
        except RefNotFound:
            return None

    def _pull(self, layout: OCILayout, key: str, remote: tuple[Descriptor, bytes]) -> None:
        assert self.registry is not None
        store_image(self.registry, self.repository, remote, layout, tag=key)


def pull_base(registry: Registry, reference: str, layout: OCILayout) -> str:
    """Copy the base image REFERENCE (REPOSITORY:TAG or REPOSITORY@DIGEST in REGISTRY) into
    LAYOUT: an image index with every platform, or one image. Its tag in LAYOUT is returned."""
    repository, tag = _split_reference(reference)
    try:
        remote = registry.manifest(repository, tag)
    except RefNotFound:
        raise PackageError(
            f"base image {reference} is not in the hub's registry {registry.url} (and no such "
            "file or directory exists); push it there, or give an OCI layout or archive"
        ) from None
    ref = "base"
    if remote[0].media_type in INDEX_TYPES:
        from packager.distribution import pull_to_layout

        pull_to_layout(registry, repository, tag, layout, tag=ref)
    else:
        store_image(registry, repository, remote, layout, tag=ref)
    return ref


def store_image(registry: Registry, repository: str, remote: tuple[Descriptor, bytes],
                layout: OCILayout, *, tag: str) -> None:
    """One image (its manifest REMOTE, config and layers) from REGISTRY into LAYOUT as TAG."""
    descriptor, body = remote
    manifest = parse_manifest(body, what=f"image {repository}@{descriptor.digest}")
    for blob in (manifest.config, *manifest.layers):
        registry.download_blob(repository, blob, layout.blob_path(blob.digest))
    if not layout.has(descriptor.digest):
        with layout.writer() as out:
            out.write(body)
    layout.tag(tag, descriptor)


def _split_reference(reference: str) -> tuple[str, str]:
    repository, at, digest = reference.partition("@")
    if at:
        return repository, digest
    repository, colon, tag = reference.rpartition(":")
    if not colon or "/" in tag or not repository:
        raise PackageError(
            f"--base {reference!r} is not a file, a directory or REPOSITORY:TAG in the hub's "
            "registry, e.g. bases/python:3.11"
        )
    return repository, tag


def _build_image(layout: OCILayout, spec: BaseSpec, platform: Platform, key: str) -> None:
    arch = debian_architecture(platform)
    with tempfile.TemporaryDirectory(prefix="edgefleet-base-") as work:
        rootfs = Path(work) / "rootfs.tar"
        _mmdebstrap(spec, arch, rootfs)
        with layout.writer() as blob:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=cast(IO[bytes], blob),
                compresslevel=GZIP_LEVEL, mtime=0,
            ) as stream:
                tar = HashingWriter(stream)
                rewrite_tar(rootfs, tar, mtime=spec.epoch)
        layer = blob.descriptor(LAYER_TAR_GZIP, {})
    created = datetime.fromtimestamp(spec.epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        **platform.to_dict(),
        "created": created,
        "config": {"Env": list(ENV), "Cmd": ["python3"]},
        "rootfs": {"type": "layers", "diff_ids": [tar.digest]},
        "history": [{"created": created, "created_by": f"mmdebstrap {spec.suite} "
                     f"minbase {','.join(sorted(spec.packages))} ({arch})"}],
    }
    config_descriptor = layout.put(canonical_json(config), CONFIG)
    manifest = layout.put(
        canonical_json({"schemaVersion": 2, "mediaType": MANIFEST,
                        "config": config_descriptor.to_dict(), "layers": [layer.to_dict()]}),
        MANIFEST,
    )
    layout.tag(key, manifest)


def _mmdebstrap(spec: BaseSpec, arch: str, out: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise BaseError(
            "mmdebstrap is not installed (apt-get install mmdebstrap), or give a base image "
            "with --base"
        )
    mirrors = [f"deb {spec.mirror} {spec.suite} main"]
    if spec.security_mirror:
        mirrors.append(f"deb {spec.security_mirror} {spec.suite}-security main")
    command = [
        "mmdebstrap", "--variant=minbase", f"--architectures={arch}",
        f"--include={','.join(spec.packages)}",
        "--aptopt=APT::Install-Recommends \"false\"",
        # Documentation and translations are half of minbase and nothing in an image reads them.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        # apt's lists and caches would date the image and are useless without apt sources.
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*',
        spec.suite, str(out), *mirrors,
    ]  # fmt: skip
    # mmdebstrap clamps times and fixes machine-id and logs itself from SOURCE_DATE_EPOCH.
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(spec.epoch)}
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=MMDEBSTRAP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BaseError(
            f"mmdebstrap did not finish the {arch} base in {MMDEBSTRAP_TIMEOUT}s; check the "
            f"network to {spec.mirror}"
        ) from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        raise BaseError(f"mmdebstrap failed to build the {arch} base from {spec.mirror}:\n{tail}")
