"""The hub's OCI registry: repositories, manifests, tags and blob uploads.

Every blob (layers, configs, manifests themselves) lives once in the hub's
BlobStore, shared with the model registry. The database records which
repository holds which manifest and blob, and what each tag points at, so
a blob pushed to two repositories is stored once.

Upload sessions live in memory (`Uploads`): a hub restart drops unfinished
uploads and the client starts them again, as the distribution spec allows.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from contract import cosign, names, oci
from contract.names import parse_package_tag
from hub import package_use
from hub.storage.blobs import BlobError, BlobStore, BlobWriter, check_digest
from hub.storage.db import Connection, Database, now


class RegistryError(Exception):
    """An error in the distribution spec's shape: status, code, message."""

    def __init__(
        self, status: int, code: str, message: str, detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


def check_repo(repo: str) -> str:
    if not names.REPOSITORY.matches(repo):
        raise RegistryError(400, "NAME_INVALID", f"invalid repository name {repo[:100]!r}")
    return repo


def is_digest(reference: str) -> bool:
    return reference.startswith("sha256:")


def check_reference(reference: str) -> str:
    if is_digest(reference):
        try:
            return check_digest(reference)
        except BlobError as exc:
            raise RegistryError(400, "DIGEST_INVALID", str(exc)) from None
    if not names.OCI_TAG.matches(reference):
        raise RegistryError(400, "TAG_INVALID", f"invalid tag {reference[:100]!r}")
    return reference


@dataclass
class Manifest:
    digest: str
    media_type: str
    size: int


def resolve(db: Database, repo: str, reference: str) -> Manifest:
    """The manifest REFERENCE (a tag or a digest) names in REPO."""
    check_reference(reference)
    if is_digest(reference):
        row = db.query_one(
            "SELECT digest, media_type, size FROM oci_manifests WHERE repo = ? AND digest = ?",
            (repo, reference),
        )
    else:
        row = db.query_one(
            "SELECT m.digest, m.media_type, m.size FROM oci_tags t JOIN oci_manifests m"
            " ON m.repo = t.repo AND m.digest = t.digest WHERE t.repo = ? AND t.tag = ?",
            (repo, reference),
        )
    if row is None:
        raise RegistryError(404, "MANIFEST_UNKNOWN", f"manifest {reference} not found in {repo}")
    return Manifest(row["digest"], row["media_type"], row["size"])


def has_blob(db: Database, blobs: BlobStore, repo: str, digest: str) -> bool:
    linked = db.query_one(
        "SELECT 1 FROM oci_repo_blobs WHERE repo = ? AND digest = ?", (repo, digest)
    )
    return linked is not None and blobs.exists(digest)


_LINK = ("INSERT INTO oci_repo_blobs (repo, digest, linked_at) VALUES (?, ?, ?)"
         " ON CONFLICT (repo, digest) DO UPDATE SET linked_at = excluded.linked_at")


def link_blob(db: Database, repo: str, digest: str) -> None:
    with db.transaction() as conn:
        conn.execute(_LINK, (repo, digest, now()))


def mount_blob(db: Database, blobs: BlobStore, repo: str, digest: str, source: str) -> bool:
    """Cross-repository mount: link a blob SOURCE holds into REPO without moving bytes."""
    if not has_blob(db, blobs, source, digest):
        return False
    link_blob(db, repo, digest)
    return True


def _referenced(media_type: str, document: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(blob digests, manifest digests) a manifest or index points at."""
    if media_type in oci.INDEX_TYPES:
        return [], [m["digest"] for m in document.get("manifests", [])]
    blobs = [
        document["config"]["digest"],
        *(layer["digest"] for layer in document.get("layers", [])),
    ]
    return blobs, []


def put_manifest(
    db: Database, blobs: BlobStore, repo: str, reference: str, media_type: str, body: bytes
) -> str:
    """Store a pushed manifest or index after checking it and what it references."""
    check_reference(reference)
    if len(body) > oci.MAX_JSON_BLOB:
        raise RegistryError(413, "SIZE_INVALID", f"manifest larger than {oci.MAX_JSON_BLOB} bytes")
    try:
        document = json.loads(body)
        declared = document.get("mediaType") or media_type
        if declared != media_type and media_type:
            raise ValueError(f"body says mediaType {declared!r}, Content-Type says {media_type!r}")
        media_type = declared
        if media_type not in oci.INDEX_TYPES | oci.MANIFEST_TYPES:
            raise ValueError(f"unsupported manifest media type {media_type!r}")
        blob_refs, manifest_refs = _referenced(media_type, document)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(400, "MANIFEST_INVALID", f"manifest is not valid: {exc}") from None
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if is_digest(reference) and reference != digest:
        raise RegistryError(400, "DIGEST_INVALID", f"manifest hashes to {digest}, not {reference}")
    missing = [d for d in blob_refs if not has_blob(db, blobs, repo, d)]
    if missing:
        raise RegistryError(
            400, "MANIFEST_BLOB_UNKNOWN", f"blob {missing[0]} is not in {repo}; push it first",
            {"digest": missing[0]},
        )
    for child in manifest_refs:
        resolve(db, repo, child)
    writer = blobs.writer()
    writer.write(body)
    writer.commit(digest)
    size = len(body)
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO oci_manifests (repo, digest, media_type, size, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (repo, digest, media_type, size, now()),
        )
        conn.execute(_LINK, (repo, digest, now()))
        if not is_digest(reference):
            _refuse_package_change(db, conn, repo, reference, digest)
            conn.execute(
                "INSERT INTO oci_tags (repo, tag, digest, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(repo, tag) DO UPDATE SET digest = excluded.digest,"
                " updated_at = excluded.updated_at",
                (repo, reference, digest, now()),
            )
    return digest


def _refuse_package_change(db: Database, conn: Any, repo: str, tag: str, digest: str) -> None:
    """A model package's tag never moves (devices running it would get other bytes under
    the same name): 409 naming what uses it. Read in the write transaction, so two pushes
    of one new tag cannot both win."""
    parsed = parse_package_tag(tag) if repo.startswith("models/") else None
    if parsed is None:
        return
    row = conn.execute("SELECT digest FROM oci_tags WHERE repo = ? AND tag = ?",
                       (repo, tag)).fetchone()
    if row is None or row[0] == digest:
        return
    version, variant = parsed
    raise RegistryError(409, "DENIED", package_use.refusal(
        db, repo.removeprefix("models/"), version, variant, row[0]))


def untag_packages(conn: Connection, repo: str, version: int) -> list[str]:
    """Remove the tags of VERSION's packages (every variant) in REPO and their cosign
    signature tags, in the caller's transaction; returns the index digests they named."""
    rows = conn.execute("SELECT tag, digest FROM oci_tags WHERE repo = ?", (repo,)).fetchall()
    doomed = {tag: digest for tag, digest in rows
              if (parsed := parse_package_tag(tag)) is not None and parsed[0] == version}
    # A signature goes with the last tag naming its package.
    kept = {digest for tag, digest in rows if tag not in doomed}
    signatures = [cosign.signature_tag(d) for d in set(doomed.values()) - kept]
    conn.execute("DELETE FROM oci_tags WHERE repo = ? AND tag IN (SELECT value FROM"
                 " json_each(?))", (repo, json.dumps([*doomed, *signatures])))
    return sorted(set(doomed.values()))


def collect_garbage(conn: Connection, blobs: BlobStore, repo: str, *,
                    before: str) -> list[str]:
    """Drop what no tag of REPO reaches any more, in the caller's (write) transaction:
    manifests, then blob links, then the blobs no repository and no model version uses.
    Manifests made and blobs linked at or after BEFORE are spared: a push in progress
    links its blobs and puts its child manifests before the tag that reaches them.
    Returns the digests deleted from the blob store."""
    kinds = {r[0]: (r[1], r[2]) for r in conn.execute(
        "SELECT digest, media_type, created_at FROM oci_manifests WHERE repo = ?", (repo,))}
    reached: set[str] = set()
    todo = [r[0] for r in conn.execute("SELECT digest FROM oci_tags WHERE repo = ?", (repo,))]
    while todo:
        digest = todo.pop()
        if digest in reached or digest not in kinds:
            continue
        reached.add(digest)
        with blobs.open(digest) as f:
            blob_refs, manifest_refs = _referenced(kinds[digest][0], json.loads(f.read()))
        reached.update(blob_refs)
        todo.extend(manifest_refs)
    young = {d for d, (_, created) in kinds.items() if created >= before}
    stale = [d for d in kinds if d not in reached and d not in young]
    conn.execute("DELETE FROM oci_manifests WHERE repo = ? AND digest IN (SELECT value FROM"
                 " json_each(?))", (repo, json.dumps(stale)))
    unlinked = [r[0] for r in conn.execute(
        "SELECT digest FROM oci_repo_blobs WHERE repo = ? AND (linked_at IS NULL OR"
        " linked_at < ?)", (repo, before))
        if r[0] not in reached and r[0] not in young]
    conn.execute("DELETE FROM oci_repo_blobs WHERE repo = ? AND digest IN (SELECT value FROM"
                 " json_each(?))", (repo, json.dumps(unlinked)))
    deleted = []
    for digest in unlinked:
        used = conn.execute(
            "SELECT 1 FROM oci_repo_blobs WHERE digest = ?"
            " UNION ALL SELECT 1 FROM model_files WHERE digest = ? LIMIT 1",
            (digest, digest)).fetchone()
        if used is None:
            blobs.delete(digest)
            deleted.append(digest)
    return deleted


def tags(db: Database, repo: str, *, n: int | None = None, last: str | None = None) -> list[str]:
    if db.query_one("SELECT 1 FROM oci_manifests WHERE repo = ? LIMIT 1", (repo,)) is None:
        raise RegistryError(404, "NAME_UNKNOWN", f"repository {repo} not found")
    rows = db.query(
        "SELECT tag FROM oci_tags WHERE repo = ? AND tag > ? ORDER BY tag LIMIT ?",
        (repo, last or "", n if n is not None else -1),
    )
    return [r["tag"] for r in rows]


def repositories(db: Database) -> list[str]:
    return [r["repo"] for r in db.query("SELECT DISTINCT repo FROM oci_manifests ORDER BY repo")]


@dataclass
class Upload:
    repo: str
    writer: BlobWriter
    size: int = 0


class Uploads:
    """Blob upload sessions in progress, by id."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._sessions: dict[str, Upload] = {}
        self._lock = threading.Lock()

    def start(self, repo: str) -> str:
        upload_id = uuid.uuid4().hex
        with self._lock:
            self._sessions[upload_id] = Upload(repo, self._blobs.writer())
        return upload_id

    def get(self, repo: str, upload_id: str) -> Upload:
        with self._lock:
            upload = self._sessions.get(upload_id)
        if upload is None or upload.repo != repo:
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", f"no upload {upload_id[:40]} in {repo}")
        return upload

    def finish(self, upload_id: str) -> None:
        with self._lock:
            self._sessions.pop(upload_id, None)

    def cancel(self, repo: str, upload_id: str) -> None:
        upload = self.get(repo, upload_id)
        upload.writer.abort()
        self.finish(upload_id)
