"""Content-addressed blob storage (sha256), behind a small interface.

The hub stores every file it holds (model files now, package layers later)
once, under its digest. FileBlobStore keeps them in a directory; an object
store can implement the same BlobStore protocol when one disk is not enough.
Writes stream: a blob never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from contract import names

# Bytes written between background flushes: the disk writes an upload while it
# arrives, so that commit's fsync, which made a 500 MB upload wait a few tenths
# of a second at the end, waits only for the last of them.
FLUSH_EVERY = 32 << 20
# Chunks at least this big are hashed in a thread of their own while they are written
# (smaller ones, manifests say, are not worth the hand-off).
HASH_APART = 64 << 10
# An upload's temporary file untouched this long (seconds) was cut off by a crash.
STALE_UPLOAD = 24 * 3600


class BlobError(Exception):
    """A blob is missing, or its bytes do not match the digest promised for it."""


def check_digest(digest: str) -> str:
    if not names.DIGEST.matches(digest):
        raise BlobError(f"not a sha256 digest: {digest[:80]!r} (expected sha256:<64 hex digits>)")
    return digest


class BlobWriter(Protocol):
    def write(self, chunk: bytes) -> None: ...
    def commit(self, expected_digest: str | None = None) -> tuple[str, int]: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    def exists(self, digest: str) -> bool: ...
    def size(self, digest: str) -> int: ...
    def open(self, digest: str) -> BinaryIO: ...
    def local_path(self, digest: str) -> Path: ...
    def writer(self) -> BlobWriter: ...
    def delete(self, digest: str) -> None: ...
    def usage(self) -> tuple[int, int]: ...  # (blobs, bytes) stored


class _FileBlobWriter:
    """Streams into a temporary file while hashing; commit moves it into place."""

    def __init__(self, store: FileBlobStore) -> None:
        self._store = store
        self._tmp = store.root / "tmp" / uuid.uuid4().hex
        self._file: BinaryIO = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self._flushing: Future[None] | None = None
        self._unflushed = 0

    def write(self, chunk: bytes) -> None:
        # A big chunk is hashed in another thread while this one writes it: both release
        # the GIL, so an upload keeps two cores busy instead of one for the sum of both.
        hashing = (self._store.hasher.submit(self._hash.update, chunk)
                   if len(chunk) >= HASH_APART else None)
        try:
            self._file.write(chunk)
        except BaseException:
            if hashing is not None:
                hashing.result()  # nothing of this writer runs on once write returns
            self.abort()  # a full disk, say: a partial file would only hold on to the space
            raise
        if hashing is None:
            self._hash.update(chunk)
        else:
            hashing.result()
        self.size += len(chunk)
        self._unflushed += len(chunk)
        if self._unflushed >= FLUSH_EVERY and (self._flushing is None or self._flushing.done()):
            self._flushing = self._store.flusher.submit(os.fdatasync, self._file.fileno())
            self._unflushed = 0

    def _flushed(self) -> None:
        """Wait for the background flush, if one is under way; raises its error."""
        if self._flushing is not None:
            flushing, self._flushing = self._flushing, None
            flushing.result()

    def commit(self, expected_digest: str | None = None) -> tuple[str, int]:
        digest = "sha256:" + self._hash.hexdigest()
        if expected_digest is not None and expected_digest != digest:
            self.abort()
            raise BlobError(
                f"content does not match its digest: expected {expected_digest}, got {digest} "
                f"({self.size} bytes received)"
            )
        try:
            self._flushed()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._store.local_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Same digest, same bytes: if another upload got there first, keep its copy.
            os.replace(self._tmp, final)
        except BaseException:
            self.abort()
            raise
        return digest, self.size

    def abort(self) -> None:
        try:
            self._flushed()  # its descriptor must stay open until it is done
        except OSError:
            pass  # the file is dropped anyway
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class FileBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Threads start on the first flush; one per upload flushing at the same moment.
        self.flusher = ThreadPoolExecutor(thread_name_prefix="blob-flush")
        self.hasher = ThreadPoolExecutor(thread_name_prefix="blob-hash")
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        self.drop_leftovers(time.time())

    def drop_leftovers(self, now: float) -> None:
        """Delete the uploads cut off by a crash: never referenced, and untouched for
        `STALE_UPLOAD` seconds. Newer ones may be uploads under way in another hub
        replica that shares this directory; a live upload writes all the time."""
        for leftover in os.scandir(self.root / "tmp"):
            try:
                if now - leftover.stat().st_mtime > STALE_UPLOAD:
                    os.unlink(leftover.path)
            except FileNotFoundError:  # committed or aborted while we looked
                continue

    def local_path(self, digest: str) -> Path:
        hexdigest = check_digest(digest).removeprefix("sha256:")
        return self.root / "sha256" / hexdigest[:2] / hexdigest

    def exists(self, digest: str) -> bool:
        return self.local_path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.local_path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobError(f"blob {digest} not found") from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.local_path(digest), "rb")
        except FileNotFoundError:
            raise BlobError(f"blob {digest} not found") from None

    def writer(self) -> _FileBlobWriter:
        return _FileBlobWriter(self)

    def delete(self, digest: str) -> None:
        self.local_path(digest).unlink(missing_ok=True)

    def entries(self) -> Iterator[tuple[str, os.stat_result]]:
        """Each stored blob's path and stat, skipping any deleted while we look."""
        root = self.root / "sha256"
        for prefix in os.scandir(root) if root.is_dir() else ():
            if prefix.is_dir():
                for entry in os.scandir(prefix.path):
                    try:
                        yield entry.path, entry.stat()
                    except FileNotFoundError:
                        continue

    def usage(self) -> tuple[int, int]:
        """How many blobs are stored and their bytes: a walk of the directories."""
        count = total = 0
        for _, stat in self.entries():
            count, total = count + 1, total + stat.st_size
        return count, total
