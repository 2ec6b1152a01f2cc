"""Blobs in a real S3-compatible object store (SeaweedFS, tests/objectstore.py):
hub/storage/s3.py's store on its own, and hubs started with --blob-url, two of
them replicas on one PostgreSQL database with no blobs/ directory in common."""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from hub.storage.blobs import BlobError
from hub.storage.s3 import EMPTY_SHA256, Credentials, S3BlobStore, S3Error, S3Location, sign
from hubproc import HubProcess, start_hub
from objectstore import CREDENTIALS, ObjectStore, object_store  # noqa: F401 - fixture
from postgres import postgres_server, postgres_url  # noqa: F401 - fixtures


def test_signature_is_aws_documented_example() -> None:
    """AWS's own Signature Version 4 example (GET Bucket, max-keys=2&prefix=J)."""
    headers = sign("GET", "examplebucket.s3.amazonaws.com", "/", {"max-keys": "2", "prefix": "J"},
                   EMPTY_SHA256,
                   Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
                   "us-east-1", datetime(2013, 5, 24, tzinfo=UTC))
    assert headers["authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")


def test_locations_are_checked() -> None:
    assert S3Location.parse("s3://models/hub-a/", "http://s3.lan:9000", "eu-west-1") == \
        S3Location("http://s3.lan:9000", "models", "hub-a", "eu-west-1")
    for url in ("http://models", "s3://", "s3://models?x=1"):
        with pytest.raises(ValueError, match="s3://BUCKET"):
            S3Location.parse(url, "http://s3.lan:9000", "us-east-1")
    with pytest.raises(ValueError, match="--s3-endpoint"):
        S3Location.parse("s3://models", "s3.lan:9000", "us-east-1")


def store_in(object_store: ObjectStore, cache: Path, *,
             cache_bytes: int = 1 << 30) -> S3BlobStore:
    client = object_store.client(object_store.bucket, object_store.new_prefix())
    return S3BlobStore(client, cache, cache_bytes)


def put(store: S3BlobStore, data: bytes, digest: str | None = None) -> str:
    writer = store.writer()
    for start in range(0, len(data), 1 << 20):
        writer.write(data[start:start + (1 << 20)])
    return writer.commit(digest)[0]


def test_blob_round_trip_through_the_bucket(object_store: ObjectStore, tmp_path: Path) -> None:
    store = store_in(object_store, tmp_path / "a")
    data = os.urandom(3 << 20)
    digest = put(store, data)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.exists(digest) and store.size(digest) == len(data)
    assert store.usage() == (1, len(data))
    assert [key for key, _ in store.client.list(store.location.prefix)] == [
        store.location.key(digest)]

    # Another hub's store on the same bucket has no copy: it fetches and checks one.
    other = S3BlobStore(store.client, tmp_path / "b", 1 << 30)
    assert not other.cache.exists(digest) and other.exists(digest)
    assert other.local_path(digest).read_bytes() == data
    with other.open(digest) as f:
        assert f.read() == data

    store.delete(digest)
    assert not store.exists(digest) and store.usage() == (0, 0)
    shutil.rmtree(tmp_path / "b")
    other = S3BlobStore(store.client, tmp_path / "b", 1 << 30)
    with pytest.raises(BlobError, match="not found"):
        other.local_path(digest)
    assert list((tmp_path / "b" / "tmp").iterdir()) == []  # nothing half-fetched kept


def test_wrong_digest_stores_nothing(object_store: ObjectStore, tmp_path: Path) -> None:
    store = store_in(object_store, tmp_path / "cache")
    with pytest.raises(BlobError, match="does not match"):
        put(store, b"some bytes", "sha256:" + "0" * 64)
    assert store.usage() == (0, 0)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_a_tampered_object_is_not_served(object_store: ObjectStore, tmp_path: Path) -> None:
    """Bytes changed in the bucket behind the hub's back: the fetch refuses them."""
    store = store_in(object_store, tmp_path / "a")
    digest = put(store, b"the real bytes")
    forged = b"forged bytes!!"
    connection, response = store.client.request(
        "PUT", store.location.key(digest), body=_Bytes(forged), size=len(forged),
        payload_sha256=hashlib.sha256(forged).hexdigest())
    response.read()
    connection.close()
    other = S3BlobStore(store.client, tmp_path / "b", 1 << 30)
    with pytest.raises(BlobError, match="does not match"):
        other.local_path(digest)
    assert not other.cache.exists(digest)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, size: int) -> bytes:
        piece, self._data = self._data[:size], self._data[size:]
        return piece


def test_cache_keeps_the_recently_used(object_store: ObjectStore, tmp_path: Path) -> None:
    store = store_in(object_store, tmp_path / "cache", cache_bytes=3 << 20)
    first, second = put(store, os.urandom(2 << 20)), put(store, os.urandom(2 << 20))
    assert not store.cache.exists(first) and store.cache.exists(second)
    assert store.local_path(first).stat().st_size == 2 << 20  # fetched again
    assert store.cache.exists(first) and not store.cache.exists(second)
    # One blob larger than the whole cache is still served; it goes when the next comes.
    big = put(store, os.urandom(4 << 20))
    assert store.cache.exists(big) and not store.cache.exists(first)


def test_wrong_credentials_or_bucket_fail_at_start(object_store: ObjectStore,
                                                   tmp_path: Path) -> None:
    bucket = object_store.bucket
    wrong = Credentials(CREDENTIALS.access_key, "not-the-secret")
    with pytest.raises(S3Error, match="refused GET.*403"):
        S3BlobStore(object_store.client(bucket, credentials=wrong), tmp_path / "a", 1 << 30)
    with pytest.raises(S3Error, match="refused GET /no-such-bucket.*404"):
        S3BlobStore(object_store.client("no-such-bucket"), tmp_path / "b", 1 << 30)
    closed = S3Location("http://127.0.0.1:9", bucket)
    with pytest.raises(S3Error, match="unreachable"):
        S3BlobStore(type(object_store.client(bucket))(closed, CREDENTIALS, timeout=5),
                    tmp_path / "c", 1 << 30)


def s3_hub(base: Path, object_store: ObjectStore, prefix: str, *extra: str) -> HubProcess:
    return start_hub(base, extra_args=(
        "--blob-url", f"s3://{object_store.bucket}/{prefix}", "--s3-endpoint",
        object_store.endpoint, *extra))


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS.secret_key)


def client_of(hub: HubProcess) -> httpx.Client:
    return httpx.Client(base_url=hub.url, timeout=60, verify=hub.verify,
                        headers={"Authorization": f"Bearer {hub.admin_token}"})


def test_replicas_share_blobs_through_the_bucket(
        object_store: ObjectStore, postgres_url: str, tmp_path: Path,  # noqa: F811
        s3_env: None) -> None:
    """Two hubs on one database, each with its own data dir and only the signing key in
    a shared dir: a file uploaded to one downloads from the other, by REST and OCI."""
    prefix = object_store.new_prefix()
    common = ("--database-url", postgres_url, "--shared-dir", str(tmp_path / "keys"))
    first = s3_hub(tmp_path / "a", object_store, prefix, *common)
    second = s3_hub(tmp_path / "b", object_store, prefix, *common)
    try:
        data = os.urandom(5 << 20)
        with client_of(first) as api:
            stored = api.post("/api/v1/blobs", content=data).raise_for_status().json()
            api.post("/api/v1/models/tiny/versions", json={
                "files": [{"path": "model.bin", "digest": stored["digest"]}],
                "require_model": False}).raise_for_status()
        assert not (tmp_path / "keys" / "blobs").exists()
        with client_of(second) as api:
            got = api.get("/api/v1/models/tiny/versions/1/files/model.bin")
            assert got.status_code == 200 and got.content == data
            ranged = api.get("/api/v1/models/tiny/versions/1/files/model.bin",
                             headers={"Range": "bytes=10-19"})
            assert ranged.status_code == 206 and ranged.content == data[10:20]
        assert (tmp_path / "b" / "blob-cache" / "sha256").is_dir()
        with client_of(second) as api:
            metrics = api.get("/metrics").text
        assert f"edgefleet_blob_store_bytes {len(data)}" in metrics  # the bucket's, not the cache's
    finally:
        first.stop()
        second.stop()


def test_hub_says_when_the_object_store_is_down(tmp_path: Path, s3_env: None) -> None:
    """A store of its own, killed under a running hub: an upload is answered 503 with
    the reason, and nothing is left behind."""
    own = ObjectStore()
    hub = s3_hub(tmp_path / "hub", own, own.new_prefix())
    try:
        with client_of(hub) as api:
            assert api.post("/api/v1/blobs", content=b"x" * 1000).status_code == 201
            own.stop()
            answer = api.post("/api/v1/blobs", content=b"y" * 1000)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "storage unavailable"
        assert "unreachable" in answer.json()["detail"]
        assert "nothing was stored" in answer.json()["detail"]
        assert "object store failed on POST /api/v1/blobs" in hub.log()
        cache = tmp_path / "hub" / "blob-cache"
        assert list((cache / "tmp").iterdir()) == []
        assert [p.name for p in (cache / "sha256").rglob("*") if p.is_file()] == [
            hashlib.sha256(b"x" * 1000).hexdigest()]
    finally:
        hub.stop()
        own.stop()
