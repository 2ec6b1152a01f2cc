"""The OCI image format in one place: media types, descriptors, canonical JSON,
image layouts and archives, and the digest checks every blob goes through.

Stdlib only: the agent imports this to check what it downloads.

Canonical JSON (sorted keys, no spaces, UTF-8) is the one encoding for every
JSON blob the packager writes, because those bytes are what gets hashed.

A layout written here keeps each package's image index as a blob; its
`index.json` has one entry per tag (annotation org.opencontainers.image.ref.name)
pointing at a package index or at a signature manifest, so one layout can hold
many packages and share their blobs. An archive is a tar of a layout; it is
read here and written by the packager (packager/archive.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, Self

from contract import names
from contract.canonical import canonical_json
from contract.errors import (
    BlobNotFound,
    FormatError,
    PackageError,
    RefNotFound,
    VerificationError,
)

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

# Base images converted from Docker's format may still carry its media types.
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({MANIFEST, DOCKER_MANIFEST})
# Every layer type an image may have, with its OCI name (Docker's gzip layer is the same bytes).
LAYER_TYPES = {
    LAYER_TAR: LAYER_TAR,
    LAYER_TAR_GZIP: LAYER_TAR_GZIP,
    LAYER_TAR_ZSTD: LAYER_TAR_ZSTD,
    DOCKER_LAYER_GZIP: LAYER_TAR_GZIP,
}

REF_NAME = "org.opencontainers.image.ref.name"
TITLE = "org.opencontainers.image.title"
VERSION = "org.opencontainers.image.version"
CREATED = "org.opencontainers.image.created"

LAYOUT_VERSION = "1.0.0"
# Manifests, configs and indexes are read whole into memory, so their size is bounded.
MAX_JSON_BLOB = 4 * 1024 * 1024
_CHUNK = 1024 * 1024


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """The hex part of DIGEST, which must be sha256 (it becomes a file name: nothing else may)."""
    if not names.DIGEST.matches(digest):
        raise FormatError(
            f"{digest!r} is not a sha256 digest ('sha256:' and 64 lowercase hex digits)"
        )
    return digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PackageError(
                f"platform {text!r} is not os/architecture[/variant], "
                "e.g. linux/arm64 or linux/arm/v7"
            )
        return cls(*parts)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def to_dict(self) -> dict[str, str]:
        fields = {"architecture": self.architecture, "os": self.os}
        return fields | ({"variant": self.variant} if self.variant else {})

    @classmethod
    def from_dict(cls, value: Any, *, what: str) -> Platform:
        if not isinstance(value, Mapping) or not all(
            isinstance(value.get(k), str) for k in ("os", "architecture")
        ):
            raise FormatError(f"{what}: platform needs string os and architecture, got {value!r}")
        variant = value.get("variant")
        return cls(
            value["os"], value["architecture"], variant if isinstance(variant, str) else None
        )

    def matches(self, other: Platform) -> bool:
        """Same platform; arm64 without a variant is v8, as registries and runtimes treat it."""
        return (self.os, self.architecture, self._variant()) == (
            other.os,
            other.architecture,
            other._variant(),
        )

    def _variant(self) -> str | None:
        return self.variant or ("v8" if self.architecture == "arm64" else None)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    def to_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            value["annotations"] = dict(self.annotations)
        if self.platform is not None:
            value["platform"] = self.platform.to_dict()
        return value

    @classmethod
    def from_dict(cls, value: Any, *, what: str) -> Descriptor:
        if not isinstance(value, Mapping):
            raise FormatError(f"{what}: a descriptor must be a JSON object, got {value!r}")
        media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
        if not isinstance(media_type, str):
            raise FormatError(f"{what}: descriptor has no mediaType")
        if not isinstance(digest, str):
            raise FormatError(f"{what}: descriptor has no digest")
        check_digest(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{what}: descriptor size {size!r} is not a byte count")
        annotations = value.get("annotations") or {}
        if not isinstance(annotations, Mapping) or not all(
            isinstance(v, str) for v in annotations.values()
        ):
            raise FormatError(f"{what}: descriptor annotations must map strings to strings")
        platform = value.get("platform")
        return cls(
            media_type,
            digest,
            size,
            dict(annotations),
            None if platform is None else Platform.from_dict(platform, what=what),
        )


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_json(data: bytes, *, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{what} is not a JSON object")
    return value


def parse_index(data: bytes, *, what: str) -> list[Descriptor]:
    """The manifest descriptors of an image index."""
    index = parse_json(data, what=what)
    _check_header(index, INDEX_TYPES, what=what)
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise FormatError(f"{what} has no manifests list")
    return [Descriptor.from_dict(m, what=f"{what}, entry {i + 1}") for i, m in enumerate(manifests)]


def parse_manifest(data: bytes, *, what: str) -> Manifest:
    manifest = parse_json(data, what=what)
    _check_header(manifest, MANIFEST_TYPES, what=what)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{what} has no layers list")
    return Manifest(
        Descriptor.from_dict(manifest.get("config"), what=f"{what}, config"),
        tuple(Descriptor.from_dict(d, what=f"{what}, layer {i + 1}") for i, d in enumerate(layers)),
    )


def _check_header(value: Mapping[str, Any], media_types: frozenset[str], *, what: str) -> None:
    if value.get("schemaVersion") != 2:
        raise FormatError(f"{what} has schemaVersion {value.get('schemaVersion')!r}, not 2")
    # mediaType is optional in an OCI index or manifest, but must be right when present.
    media_type = value.get("mediaType")
    if media_type is not None and media_type not in media_types:
        raise FormatError(
            f"{what} has media type {media_type!r}, expected one of {sorted(media_types)}"
        )


class Sink(Protocol):
    """Anything bytes can be written to: a file, a hashing writer, a gzip stream."""

    def write(self, data: bytes, /) -> int: ...


class HashingWriter:
    """Passes bytes on to SINK (or nowhere), counting and hashing them on the way."""

    def __init__(self, sink: Sink | None = None) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def descriptor(
        self, media_type: str, annotations: Mapping[str, str] | None = None
    ) -> Descriptor:
        return Descriptor(media_type, self.digest, self.size, dict(annotations or {}))


class BlobSource(Protocol):
    """Where blobs come from: a layout, an archive, or the hub's registry for the agent."""

    def open(self, digest: str) -> IO[bytes]:
        """A stream of the blob's bytes, unchecked; raises BlobNotFound if there is none."""
        ...


class ImageSource(BlobSource, Protocol):
    def resolve(self, ref: str) -> Descriptor:
        """The descriptor tagged REF; raises RefNotFound if there is none."""
        ...


class ImageStore(ImageSource, Protocol):
    """An image source that can also take blobs and tags (a layout, the hub's registry)."""

    def put(self, data: bytes, media_type: str) -> Descriptor: ...

    def tag(self, ref: str, descriptor: Descriptor) -> None: ...


def copy_blob(source: BlobSource, descriptor: Descriptor, sink: Sink | None, *, what: str) -> None:
    """Stream a blob to SINK (None: only check it), failing unless it matches DESCRIPTOR.

    WHAT names the blob in errors ("blob sha256:... of layer 3 (model) of
    linux/arm64"). SINK has seen the bytes before a mismatch is found, so on an
    error it must throw them away.
    """
    check_digest(descriptor.digest)
    try:
        stream = source.open(descriptor.digest)
    except BlobNotFound:
        raise VerificationError(f"{what} is missing from {source}") from None
    hashed = HashingWriter(sink)
    with stream:
        while chunk := stream.read(min(_CHUNK, descriptor.size + 1 - hashed.size)):
            hashed.write(chunk)
    if hashed.size > descriptor.size:
        raise VerificationError(
            f"{what} does not match its descriptor: it is longer than the "
            f"{descriptor.size} bytes the descriptor says"
        )
    if hashed.size < descriptor.size:
        raise VerificationError(
            f"{what} does not match its descriptor: size mismatch, the descriptor says "
            f"{descriptor.size} bytes, the blob has {hashed.size}"
        )
    if hashed.digest != descriptor.digest:
        raise VerificationError(
            f"{what} does not match its descriptor: digest mismatch, its content hashes "
            f"to {hashed.digest}"
        )


def read_blob(source: BlobSource, descriptor: Descriptor, *, what: str) -> bytes:
    """A small blob (manifest, config, index, payload), checked against DESCRIPTOR."""
    if descriptor.size > MAX_JSON_BLOB:
        raise VerificationError(
            f"{what} is {descriptor.size} bytes, more than the {MAX_JSON_BLOB} allowed for it"
        )
    buffer = io.BytesIO()
    copy_blob(source, descriptor, buffer, what=what)
    return buffer.getvalue()


def _ref_of(entry: Mapping[str, Any]) -> str:
    return str(entry.get("annotations", {}).get(REF_NAME, ""))


def _refs(index_json: bytes, *, where: str) -> dict[str, Descriptor]:
    entries = parse_index(index_json, what=f"index.json of {where}")
    return {d.annotations[REF_NAME]: d for d in entries if REF_NAME in d.annotations}


def _find_ref(refs: Mapping[str, Descriptor], ref: str, *, where: str) -> Descriptor:
    if ref not in refs:
        have = ", ".join(sorted(refs)) or "none"
        raise RefNotFound(f"no tag {ref!r} in {where} (tags there: {have})")
    return refs[ref]


class OCILayout:
    """An OCI image layout directory: oci-layout, index.json, blobs/sha256/<hex>."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            marker = parse_json((self.root / "oci-layout").read_bytes(), what=f"{root}/oci-layout")
        except FileNotFoundError:
            raise FormatError(
                f"{root} is not an OCI image layout: it has no oci-layout file"
            ) from None
        if marker.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise FormatError(
                f"{root} has OCI layout version {marker.get('imageLayoutVersion')!r}; "
                f"only {LAYOUT_VERSION} is supported"
            )

    @classmethod
    def create(cls, root: Path) -> OCILayout:
        """Open the layout at ROOT, making an empty one if ROOT is missing or empty."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "oci-layout").exists():
            if any(root.iterdir()):
                raise PackageError(
                    f"{root} is neither empty nor an OCI layout; choose an empty or new directory"
                )
            (root / "blobs" / "sha256").mkdir(parents=True)
            (root / "index.json").write_bytes(
                canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": []})
            )
            (root / "oci-layout").write_bytes(
                canonical_json({"imageLayoutVersion": LAYOUT_VERSION})
            )
        return cls(root)

    def __str__(self) -> str:
        return f"OCI layout {self.root}"

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest)

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_files(self) -> Iterator[Path]:
        """The stored blobs: files named by their digest, not partial downloads beside them."""
        return (p for p in (self.root / "blobs" / "sha256").iterdir()
                if names.DIGEST.matches(f"sha256:{p.name}"))

    def open(self, digest: str) -> IO[bytes]:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"{digest} is not in {self}") from None

    def get(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    @contextlib.contextmanager
    def writer(self) -> Iterator[HashingWriter]:
        """A writer for one new blob, stored under its digest when the block ends without error."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "blobs", prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                hashed = HashingWriter(f)
                yield hashed
            os.chmod(tmp, 0o644)
            # Content-addressed: replacing an existing blob puts back the same bytes.
            os.replace(tmp, self.blob_path(hashed.digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put(self, data: bytes, media_type: str) -> Descriptor:
        with self.writer() as hashed:
            hashed.write(data)
        return hashed.descriptor(media_type)

    def copy_from(self, source: BlobSource, descriptor: Descriptor, *, what: str) -> None:
        """Add SOURCE's blob for DESCRIPTOR, checked on the way in."""
        if self.has(descriptor.digest):
            return
        with self.writer() as hashed:
            copy_blob(source, descriptor, hashed, what=what)

    def refs(self) -> dict[str, Descriptor]:
        return _refs((self.root / "index.json").read_bytes(), where=str(self))

    def resolve(self, ref: str) -> Descriptor:
        return _find_ref(self.refs(), ref, where=str(self))

    def tag(self, ref: str, descriptor: Descriptor) -> None:
        """Point tag REF at DESCRIPTOR in index.json, replacing what REF pointed at."""
        entry = descriptor.to_dict()
        entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: ref}
        self._edit_refs(lambda manifests: [*[m for m in manifests if _ref_of(m) != ref], entry])

    def untag(self, refs: Collection[str]) -> None:
        """Remove the tags REFS from index.json; their blobs stay until collect_garbage."""
        drop = set(refs)
        self._edit_refs(lambda manifests: [m for m in manifests if _ref_of(m) not in drop])

    def _edit_refs(self, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        index_path = self.root / "index.json"
        # Builds into one layout may run at once: index.json is read, changed and replaced
        # under a lock.
        with open(self.root / "index.json.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = parse_json(index_path.read_bytes(), what=f"index.json of {self}")
            index["manifests"] = sorted(
                change(index.get("manifests", [])), key=lambda m: (_ref_of(m), m["digest"])
            )
            tmp = index_path.with_name(".index.json.tmp")
            tmp.write_bytes(canonical_json(index))
            os.replace(tmp, index_path)

    def collect_garbage(self) -> int:
        """Delete the blobs no tag reaches through its indexes and manifests; the bytes freed.

        Only files named by a digest are candidates: a download in progress
        (a .part file beside them) is left alone.
        """
        reached: set[str] = set()
        pending = list(self.refs().values())
        while pending:
            descriptor = pending.pop()
            if descriptor.digest in reached:
                continue
            reached.add(descriptor.digest)
            if not self.has(descriptor.digest):
                continue  # never fetched (another platform's image, an unused layer)
            if descriptor.media_type in INDEX_TYPES:
                pending += parse_index(self.get(descriptor.digest), what=descriptor.digest)
            elif descriptor.media_type in MANIFEST_TYPES:
                manifest = parse_manifest(self.get(descriptor.digest), what=descriptor.digest)
                pending += [manifest.config, *manifest.layers]
        freed = 0
        for path in self.blob_files():
            if f"sha256:{path.name}" not in reached:
                freed += path.stat().st_size
                path.unlink()
        return freed


class OCIArchive:
    """An OCI archive (a tar of a layout, as skopeo's oci-archive: writes), read in place."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 (closed by __exit__)
        except (OSError, tarfile.TarError) as exc:
            raise FormatError(
                f"{path} is neither an OCI layout directory nor a tar archive: {exc}"
            ) from None
        self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}
        if "oci-layout" not in self._members or "index.json" not in self._members:
            self._tar.close()
            raise FormatError(
                f"{path} is a tar archive but not of an OCI layout (no oci-layout or index.json)"
            )
        self._index_json = self._read("index.json")

    def __str__(self) -> str:
        return f"OCI archive {self.path}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()

    def _read(self, name: str) -> bytes:
        f = self._tar.extractfile(self._members[name])
        assert f is not None  # members holds regular files only
        with f:
            return f.read()

    def open(self, digest: str) -> IO[bytes]:
        member = self._members.get(f"blobs/sha256/{check_digest(digest)}")
        if member is None:
            raise BlobNotFound(f"{digest} is not in {self}")
        f = self._tar.extractfile(member)
        assert f is not None
        return f

    def refs(self) -> dict[str, Descriptor]:
        return _refs(self._index_json, where=str(self))

    def resolve(self, ref: str) -> Descriptor:
        return _find_ref(self.refs(), ref, where=str(self))


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[OCILayout | OCIArchive]:
    """An OCI layout directory or an OCI archive file, whichever PATH is."""
    if Path(path).is_dir():
        yield OCILayout(path)
    else:
        with OCIArchive(path) as archive:
            yield archive
