"""A client for OCI registries (the hub's /v2/): pull and push packages.

The CLI pushes packages it built and exports them again; the agent pulls
what its desired state names. Both go through `Registry`, which speaks the
distribution spec with the hub's tokens (Bearer), streams every blob, checks
it against its digest, and resumes an interrupted download with HTTP Range
from the bytes already on disk.

`RemoteImage` is an `ImageSource` over one repository, so `verify_package`
can check a package in the registry without copying it first.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import ssl
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import httpx

from contract.errors import (
    BlobNotFound,
    DiskFull,
    PackageError,
    RefNotFound,
    VerificationError,
)
from contract.layers import ROLE
from contract.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON_BLOB,
    Descriptor,
    OCILayout,
    check_digest,
    parse_index,
    parse_manifest,
)

CHUNK = 1 << 20
ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))

# Called with (bytes just moved) so callers can drive a progress bar.
Progress = Callable[[int], None]


class RegistryError(PackageError):
    """The registry refused or failed a request; the message carries its error code."""


def _describe(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        return f"{first.get('code')}: {first.get('message')}"
    except (ValueError, AttributeError, IndexError, TypeError):
        return response.text[:200] or response.reason_phrase


class Registry:
    """One registry endpoint (e.g. http://hub:8080) and the token to use there."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 60.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        """VERIFY: how an https:// registry's certificate is checked (a device passes
        a context trusting its hub's CA)."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise RegistryError(f"cannot reach the registry at {self.url}: {exc}") from None

    def _check(self, response: httpx.Response, what: str) -> httpx.Response:
        if response.status_code == 404:
            raise RefNotFound(f"{what} not found at {self.url}: {_describe(response)}")
        if not response.is_success:
            raise RegistryError(
                f"{what}: the registry answered {response.status_code} ({_describe(response)})"
            )
        return response

    # -- pull ---------------------------------------------------------------

    def manifest(self, repo: str, reference: str) -> tuple[Descriptor, bytes]:
        """The manifest or index REFERENCE (tag or digest) names, checked against its digest."""
        what = f"manifest {repo}:{reference}"
        response = self._check(
            self._request("GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT}),
            what,
        )
        body = response.content
        if len(body) > MAX_JSON_BLOB:
            raise VerificationError(f"{what} is larger than {MAX_JSON_BLOB} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = reference if reference.startswith("sha256:") else response.headers.get(
            "docker-content-digest", digest
        )
        if digest != expected:
            raise VerificationError(f"{what} hashes to {digest}, not {expected}")
        media_type = response.headers.get("content-type", "").split(";")[0]
        return Descriptor(media_type, digest, len(body)), body

    def open_blob(self, repo: str, digest: str, *, offset: int = 0) -> Iterator[bytes]:
        """The blob's bytes from OFFSET on, streamed; unchecked (callers hash them)."""
        check_digest(digest)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._http.stream("GET", f"/v2/{repo}/blobs/{digest}", headers=headers) as response:
            if response.status_code == 404:
                response.read()
                raise BlobNotFound(f"blob {digest} not found in {repo} at {self.url}")
            if offset and response.status_code != 206:
                response.read()
                raise RegistryError(f"the registry ignored the Range request for {digest}")
            self._check(response, f"blob {digest} of {repo}")
            yield from response.iter_bytes(CHUNK)

    def download_blob(
        self, repo: str, descriptor: Descriptor, dest: Path, *, progress: Progress | None = None
    ) -> None:
        """Fetch a blob into DEST, resuming DEST.part, and keep it only if its digest matches."""
        if dest.exists():
            return
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256()
        offset = part.stat().st_size if part.exists() else 0
        if offset > descriptor.size:
            part.unlink()
            offset = 0
        if offset:  # resume: hash what is already there
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    sha.update(chunk)
            if progress:
                progress(offset)
        try:
            with open(part, "ab") as out:
                if offset < descriptor.size:
                    for chunk in self.open_blob(repo, descriptor.digest, offset=offset):
                        out.write(chunk)
                        sha.update(chunk)
                        if progress:
                            progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except httpx.TransportError as exc:
            raise RegistryError(
                f"download of {descriptor.digest} cut off ({exc}); run again to resume"
            ) from None
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # Kept, the partial blob could not finish anyway and would hold the
            # space everything else on the disk (state files, logs) needs.
            part.unlink(missing_ok=True)
            free = shutil.disk_usage(part.parent).free
            raise DiskFull(
                f"the disk is full: blob {descriptor.digest} ({descriptor.size:,} bytes) does not"
                f" fit in {part.parent} ({free:,} bytes free); free some space and try again"
            ) from None
        got = "sha256:" + sha.hexdigest()
        if part.stat().st_size != descriptor.size or got != descriptor.digest:
            part.unlink()
            raise VerificationError(
                f"blob {descriptor.digest} of {repo} arrived as {got}; the bytes were dropped"
            )
        os.replace(part, dest)

    # -- push ---------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        response = self._request("HEAD", f"/v2/{repo}/blobs/{digest}")
        if response.status_code == 404:
            return False
        self._check(response, f"blob {digest} of {repo}")
        return True

    def push_blob(
        self, repo: str, descriptor: Descriptor, stream: IO[bytes], *,
        progress: Progress | None = None,
    ) -> None:
        """Monolithic upload of one blob (streamed), unless the registry has it already."""
        if self.has_blob(repo, descriptor.digest):
            if progress:
                progress(descriptor.size)
            return

        def chunks() -> Iterator[bytes]:
            while chunk := stream.read(CHUNK):
                if progress:
                    progress(len(chunk))
                yield chunk

        self._check(
            self._request(
                "POST", f"/v2/{repo}/blobs/uploads/", params={"digest": descriptor.digest},
                content=chunks(),
                headers={"Content-Length": str(descriptor.size),
                         "Content-Type": "application/octet-stream"},
            ),
            f"upload of {descriptor.digest} to {repo}",
        )

    def put_manifest(self, repo: str, reference: str, descriptor: Descriptor, body: bytes) -> None:
        self._check(
            self._request(
                "PUT", f"/v2/{repo}/manifests/{reference}", content=body,
                headers={"Content-Type": descriptor.media_type},
            ),
            f"manifest {repo}:{reference}",
        )


@dataclass
class RemoteImage:
    """One repository of a registry as an ImageSource (for verify_package)."""

    registry: Registry
    repo: str

    def __str__(self) -> str:
        return f"{self.registry.url}/{self.repo}"

    def resolve(self, ref: str) -> Descriptor:
        return self.registry.manifest(self.repo, ref)[0]

    def open(self, digest: str) -> BinaryIO:
        # Verification reads manifests, configs and signatures through here: small blobs.
        try:
            return io.BytesIO(self.registry.manifest(self.repo, digest)[1])
        except RefNotFound:
            pass
        return io.BytesIO(b"".join(self.registry.open_blob(self.repo, digest)))


def _children(layout: OCILayout, descriptor: Descriptor) -> list[Descriptor]:
    body = layout.get(descriptor.digest)
    if descriptor.media_type in INDEX_TYPES:
        return parse_index(body, what=f"index {descriptor.digest}")
    manifest = parse_manifest(body, what=f"manifest {descriptor.digest}")
    return [manifest.config, *manifest.layers]


def push_layout(
    layout: OCILayout, registry: Registry, repo: str, refs: Collection[str], *,
    progress: Progress | None = None,
) -> None:
    """Push the images tagged REFS in LAYOUT (children first, tags last)."""
    pushed: set[str] = set()

    def push(descriptor: Descriptor, reference: str | None) -> None:
        if descriptor.media_type in INDEX_TYPES | MANIFEST_TYPES:
            for child in _children(layout, descriptor):
                push(child, None)
            if descriptor.digest not in pushed or reference:
                registry.put_manifest(repo, reference or descriptor.digest, descriptor,
                                      layout.get(descriptor.digest))
        elif descriptor.digest not in pushed:
            with layout.open(descriptor.digest) as stream:
                registry.push_blob(repo, descriptor, stream, progress=progress)
        pushed.add(descriptor.digest)

    for ref in refs:
        push(layout.resolve(ref), ref)


def pull_to_layout(
    registry: Registry, repo: str, reference: str, layout: OCILayout, *,
    tag: str | None = None, platforms: Collection[str] | None = None,
    roles: Collection[str] | None = None, progress: Progress | None = None,
) -> Descriptor:
    """Copy the package REFERENCE names into LAYOUT, tagged TAG (default: REFERENCE).

    PLATFORMS and ROLES narrow what is fetched (an agent in native mode takes
    only its platform's model and serving layers); manifests and configs are
    always fetched so the package can still be verified.
    """
    index, body = registry.manifest(repo, reference)

    def store_json(descriptor: Descriptor, data: bytes) -> None:
        if not layout.has(descriptor.digest):
            with layout.writer() as out:
                out.write(data)

    def fetch(descriptor: Descriptor) -> None:
        if not layout.has(descriptor.digest):
            registry.download_blob(repo, descriptor, layout.blob_path(descriptor.digest),
                                   progress=progress)

    store_json(index, body)
    for entry in parse_index(body, what=f"index {repo}:{reference}"):
        if platforms is not None and (
            entry.platform is None or str(entry.platform) not in platforms
        ):
            continue
        _, manifest_body = registry.manifest(repo, entry.digest)
        store_json(entry, manifest_body)
        manifest = parse_manifest(manifest_body, what=f"manifest {entry.digest}")
        fetch(manifest.config)
        for layer in manifest.layers:
            if roles is None or layer.annotations.get(ROLE) in roles:
                fetch(layer)
    layout.tag(tag or reference, index)
    return index


def pull_signature(registry: Registry, repo: str, digest: str, layout: OCILayout) -> bool:
    """Copy the cosign signature of DIGEST into LAYOUT; False if the registry has none."""
    from contract.cosign import signature_tag

    tag = signature_tag(digest)
    try:
        descriptor, body = registry.manifest(repo, tag)
    except RefNotFound:
        return False
    with layout.writer() as out:
        out.write(body)
    manifest = parse_manifest(body, what=f"signature {tag}")
    for blob in (manifest.config, *manifest.layers):
        if not layout.has(blob.digest):
            registry.download_blob(repo, blob, layout.blob_path(blob.digest))
    layout.tag(tag, descriptor)
    return True
