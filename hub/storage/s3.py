"""Blobs in an S3-compatible object store, for hub replicas without a shared disk.

`S3BlobStore` keeps the truth in a bucket (one object per blob, under
PREFIX/sha256/<hex>) and a local copy of what this hub has written or served
in a cache directory: an upload is hashed into the cache as on disk, checked
against its digest, and only then put into the bucket, so no object ever holds
bytes that do not match its name; a download is served from the cache (by
sendfile, ranges and all), fetched from the bucket and checked the first time.
The cache is bounded (`cache_bytes`): least recently used copies go first,
and every copy is in the bucket already, so an evicted one is fetched again.

The client is `S3Client`: path-style requests (every S3-compatible server takes
them) signed with AWS Signature Version 4. An upload's x-amz-content-sha256 is
the blob's own digest, so the server checks the bytes it receives too.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

from hub.storage.blobs import BlobError, FileBlobStore, check_digest

# The largest object one PUT may hold (S3's own limit); bigger blobs are refused.
MAX_OBJECT = 5 << 30
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
PIECE = 1 << 20


@dataclass(frozen=True)
class S3Location:
    """Where blobs go: an endpoint, a bucket and a key prefix, from the hub's settings."""

    endpoint: str  # http(s)://host[:port]
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"

    @classmethod
    def parse(cls, url: str, endpoint: str, region: str) -> S3Location:
        """URL is s3://BUCKET[/PREFIX]; ENDPOINT the server's http(s)://HOST[:PORT]."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"--blob-url must look like s3://BUCKET[/PREFIX], got {url!r}")
        site = urlsplit(endpoint)
        if site.scheme not in ("http", "https") or not site.hostname or site.path not in ("", "/"):
            raise ValueError(f"--s3-endpoint must look like https://HOST[:PORT] (no path), "
                             f"got {endpoint!r}")
        return cls(endpoint.rstrip("/"), parts.hostname, parts.path.strip("/"), region)

    def key(self, digest: str) -> str:
        hexdigest = check_digest(digest).removeprefix("sha256:")
        return f"{self.prefix}/sha256/{hexdigest}" if self.prefix else f"sha256/{hexdigest}"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Credentials:
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise ValueError("an S3 blob store needs AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY in the hub's environment")
        return cls(access, secret)


def _uri_encode(text: str, *, keep_slash: bool) -> str:
    return quote(text, safe="/-_.~" if keep_slash else "-_.~")


def _canonical_query(query: Mapping[str, str]) -> str:
    """Sorted, URI-encoded key=value pairs: what is signed and what is sent."""
    return "&".join(f"{_uri_encode(k, keep_slash=False)}={_uri_encode(v, keep_slash=False)}"
                    for k, v in sorted(query.items()))


def sign(method: str, host: str, path: str, query: Mapping[str, str], payload_sha256: str,
         credentials: Credentials, region: str, when: datetime) -> dict[str, str]:
    """The headers that make a request authentic under AWS Signature Version 4."""
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    headers = {"host": host, "x-amz-content-sha256": payload_sha256, "x-amz-date": stamp}
    names = sorted(headers)
    canonical = "\n".join([
        method,
        _uri_encode(path, keep_slash=True),
        _canonical_query(query),
        "".join(f"{name}:{headers[name].strip()}\n" for name in names),
        ";".join(names),
        payload_sha256,
    ])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{credentials.secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}")
    del headers["host"]  # http.client sends it
    return headers


class S3Error(Exception):
    """The object store refused a request or could not be reached: the hub's storage
    is unavailable, not the client's blob wrong."""


class S3Client:
    """The handful of S3 calls a blob store needs, one connection per call."""

    def __init__(self, location: S3Location, credentials: Credentials, *,
                 timeout: float = 60.0) -> None:
        self.location = location
        self._credentials = credentials
        self._timeout = timeout
        site = urlsplit(location.endpoint)
        self._https = site.scheme == "https"
        self._host = site.netloc

    def _connect(self) -> http.client.HTTPConnection:
        factory = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return factory(self._host, timeout=self._timeout)

    def request(self, method: str, key: str | None, *, query: Mapping[str, str] | None = None,
                body: BinaryIO | None = None, size: int = 0, payload_sha256: str = EMPTY_SHA256,
                ok: tuple[int, ...] = (200,)) -> tuple[http.client.HTTPConnection,
                                                       http.client.HTTPResponse]:
        """Send one signed request; the caller reads the response, then closes the
        connection. Statuses not in OK raise S3Error with the server's own message."""
        path = f"/{self.location.bucket}" + (f"/{key}" if key is not None else "")
        query = dict(query or {})
        headers = sign(method, self._host, path, query, payload_sha256, self._credentials,
                       self.location.region, datetime.now(UTC))
        if body is not None or method == "PUT":
            headers["content-length"] = str(size)
        target = _uri_encode(path, keep_slash=True) + (
            "?" + _canonical_query(query) if query else "")
        connection = self._connect()
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
            if body is not None:
                while piece := body.read(PIECE):
                    connection.send(piece)
            response = connection.getresponse()
        except OSError as exc:
            connection.close()
            raise S3Error(f"object store {self.location.endpoint} unreachable: {exc}") from None
        if response.status not in ok:
            detail = _error_message(response.read(64 << 10))
            connection.close()
            raise S3Error(f"object store refused {method} {path}: {response.status} "
                          f"{response.reason}{': ' + detail if detail else ''}")
        return connection, response

    def head(self, key: str) -> int | None:
        """The object's size, or None if there is none."""
        connection, response = self.request("HEAD", key, ok=(200, 404))
        try:
            response.read()
            return int(response.headers["Content-Length"]) if response.status == 200 else None
        finally:
            connection.close()

    def put_file(self, key: str, path: Path, size: int, sha256_hex: str) -> None:
        with open(path, "rb") as f:
            connection, response = self.request("PUT", key, body=f, size=size,
                                                payload_sha256=sha256_hex)
        response.read()
        connection.close()

    def get_into(self, key: str, write: Callable[[bytes], object]) -> None:
        """Pass the object's bytes to WRITE, a piece at a time."""
        connection, response = self.request("GET", key, payload_sha256=EMPTY_SHA256,
                                            ok=(200, 404))
        try:
            if response.status == 404:
                response.read()
                raise BlobError(f"object {key} not found in bucket {self.location.bucket}")
            while piece := response.read(PIECE):
                write(piece)
        finally:
            connection.close()

    def delete(self, key: str) -> None:
        connection, response = self.request("DELETE", key, ok=(200, 204, 404))
        response.read()
        connection.close()

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under PREFIX, a page of ListObjectsV2 at a time."""
        query = {"list-type": "2", "prefix": prefix}
        while True:
            connection, response = self.request("GET", None, query=query)
            try:
                page = ElementTree.fromstring(response.read())
            finally:
                connection.close()
            for item in page.iter(f"{_S3_NS}Contents"):
                yield item.findtext(f"{_S3_NS}Key", ""), int(item.findtext(f"{_S3_NS}Size", "0"))
            token = page.findtext(f"{_S3_NS}NextContinuationToken")
            if page.findtext(f"{_S3_NS}IsTruncated") != "true" or not token:
                return
            query["continuation-token"] = token


def _error_message(body: bytes) -> str:
    """The <Message> of an S3 error document, if the body is one."""
    try:
        return (ElementTree.fromstring(body).findtext("Message") or "").strip()[:200]
    except ElementTree.ParseError:
        return ""


class _S3BlobWriter:
    """Hashes into the cache as a file store's writer does; a commit then puts
    the checked bytes into the bucket before the blob counts as stored."""

    def __init__(self, store: S3BlobStore) -> None:
        self._store = store
        self._cached = store.cache.writer()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._cached.write(chunk)
        self.size += len(chunk)

    def commit(self, expected_digest: str | None = None) -> tuple[str, int]:
        if self.size > MAX_OBJECT:
            self.abort()
            raise BlobError(f"a blob of {self.size} bytes is over the object store's "
                            f"{MAX_OBJECT >> 30} GiB limit for one object")
        digest, size = self._cached.commit(expected_digest)
        store = self._store
        path = store.cache.local_path(digest)
        key = store.location.key(digest)
        try:
            if store.client.head(key) != size:
                store.client.put_file(key, path, size, digest.removeprefix("sha256:"))
        except BaseException:
            store.cache.delete(digest)  # not in the bucket: not stored
            raise
        store.evict(keep=path)
        return digest, size

    def abort(self) -> None:
        self._cached.abort()


class S3BlobStore:
    def __init__(self, client: S3Client, cache_dir: Path, cache_bytes: int) -> None:
        self.client = client
        self.location = client.location
        self.cache = FileBlobStore(cache_dir)
        self.cache_bytes = cache_bytes
        # A wrong endpoint, bucket or key fails the hub's start, not its first upload.
        next(iter(self.client.list(self._key_prefix())), None)

    def _key_prefix(self) -> str:
        return f"{self.location.prefix}/sha256/" if self.location.prefix else "sha256/"

    def exists(self, digest: str) -> bool:
        return self.cache.exists(digest) or self.client.head(self.location.key(digest)) is not None

    def size(self, digest: str) -> int:
        if self.cache.exists(digest):
            return self.cache.size(digest)
        size = self.client.head(self.location.key(digest))
        if size is None:
            raise BlobError(f"blob {digest} not found")
        return size

    def local_path(self, digest: str) -> Path:
        """The cached copy, fetched from the bucket (and checked) if there is none.
        Blocking: async callers run it in a thread."""
        path = self.cache.local_path(digest)
        if path.is_file():
            os.utime(path)  # recently used: evicted last
            return path
        writer = self.cache.writer()
        try:
            self.client.get_into(self.location.key(digest), writer.write)
            writer.commit(digest)  # refuses bytes that do not match their name
        except BaseException:
            writer.abort()
            raise
        self.evict(keep=path)
        return path

    def open(self, digest: str) -> BinaryIO:
        return open(self.local_path(digest), "rb")

    def writer(self) -> _S3BlobWriter:
        return _S3BlobWriter(self)

    def delete(self, digest: str) -> None:
        self.client.delete(self.location.key(digest))
        self.cache.delete(digest)

    def usage(self) -> tuple[int, int]:
        count = total = 0
        for _, size in self.client.list(self._key_prefix()):
            count, total = count + 1, total + size
        return count, total

    def evict(self, keep: Path) -> None:
        """Drop the least recently used cached copies beyond `cache_bytes`, but not
        KEEP, the one about to be served (it may be larger than the whole cache)."""
        entries = [(stat.st_mtime, stat.st_size, path) for path, stat in self.cache.entries()]
        held = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if held <= self.cache_bytes:
                break
            if path == str(keep):
                continue
            Path(path).unlink(missing_ok=True)
            held -= size
