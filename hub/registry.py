"""The model registry: named models, numbered versions, their files and metadata.

A version's files are blobs in the BlobStore; the database holds which blob
sits under which file name. Version numbers start at 1 and are never reused,
even after a delete, so `name:version` always means one set of bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from hub import oci_registry, package_use, profiles, validation
from hub.errors import Conflict, NotFound, Unprocessable
from hub.storage.blobs import BlobError, BlobStore, check_digest
from hub.storage.db import Database, dumps, format_time, now
from hub.validation import InvalidInput

MAX_DESCRIPTION = 10_000
# Blobs linked and manifests put this recently may belong to a push still in progress
# (its tag, which would reach them, comes last): garbage collection leaves them.
PUSH_GRACE = timedelta(hours=1)
LINEAGE_KEYS = ("git_commit", "git_dirty", "dataset_digest", "run_id", "source")


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    for key, value in metrics.items():
        validation.tag(key, "")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise InvalidInput(f"metric {key!r} must be a finite number, got {value!r}")
    return metrics


def _check_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    unknown = set(lineage) - set(LINEAGE_KEYS)
    if unknown:
        raise InvalidInput(
            f"unknown lineage field(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(LINEAGE_KEYS)}"
        )
    for key, value in lineage.items():
        if key == "git_dirty":
            if not isinstance(value, bool):
                raise InvalidInput("lineage git_dirty must be true or false")
        elif not isinstance(value, str) or len(value) > 512:
            raise InvalidInput(f"lineage {key} must be a string of at most 512 characters")
    return lineage


def _tag_filter_sql(selectors: Sequence[tuple[str, str]], column: str) -> tuple[str, list[str]]:
    clauses, params = [], []
    for key, value in selectors:
        clauses.append(f"EXISTS (SELECT 1 FROM json_each({column}) WHERE key = ? AND value = ?)")
        params += [key, value]
    return " AND ".join(clauses), params


def _version_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["model"],
        "version": row["version"],
        "created_at": row["created_at"],
        "created_by": row["created_by"],
        "description": row["description"] or "",
        "tags": json.loads(row["tags"]),
        "metrics": json.loads(row["metrics"]),
        "lineage": json.loads(row["lineage"]),
        "framework": row["framework"],
        "entrypoint": row["entrypoint"],
        "signature": json.loads(row["signature"]) if row["signature"] else None,
        "size": row["size"],
    }


def register_version(
    db: Database,
    blobs: BlobStore,
    *,
    name: str,
    files: Sequence[tuple[str, str]],
    created_by: str,
    description: str = "",
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    lineage: dict[str, Any] | None = None,
    require_model: bool = False,
) -> dict[str, Any]:
    """Record a new version of NAME made of FILES, given as (relative path, digest).

    With REQUIRE_MODEL, files among which the packager finds no model are refused.
    """
    from packager.modelfile import ModelFileError, inspect_model

    validation.model_name(name)
    tags = validation.tags(tags or {})
    metrics = _check_metrics(metrics or {})
    lineage = _check_lineage(lineage or {})
    if len(description) > MAX_DESCRIPTION:
        raise InvalidInput(f"description is longer than {MAX_DESCRIPTION} characters")
    if not 1 <= len(files) <= validation.MAX_FILES:
        raise InvalidInput(f"a version needs 1-{validation.MAX_FILES} files, got {len(files)}")
    checked: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for path, digest in files:
        path = validation.file_path(path)
        if path in checked:
            raise InvalidInput(f"file {path!r} is listed twice")
        checked[path] = check_digest(digest)
        try:
            sizes[digest] = blobs.size(digest)
        except BlobError:
            raise Unprocessable(f"file {path!r}: blob {digest} was never uploaded") from None
    validation.file_tree(checked)
    try:
        info = inspect_model({path: blobs.local_path(d) for path, d in checked.items()})
    except ModelFileError as exc:
        raise Unprocessable(str(exc)) from None
    if require_model and info.framework is None:
        raise Unprocessable(
            f"none of the files ({', '.join(sorted(checked))[:200]}) is a model edgefleet can "
            "package (.onnx, .tflite, an OpenVINO .xml with its .bin); to register them "
            "anyway, leave out require_model (CLI: --allow-non-model)")

    created_at = now()
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO models (name, created_at, next_version) VALUES (?, ?, 1)"
            " ON CONFLICT(name) DO NOTHING",
            (name, created_at),
        )
        version = conn.execute(
            "UPDATE models SET next_version = next_version + 1 WHERE name = ?"
            " RETURNING next_version - 1",
            (name,),
        ).fetchone()[0]
        version_id = conn.execute(
            "INSERT INTO model_versions (model, version, created_at, created_by, description,"
            " tags, metrics, lineage, framework, entrypoint, signature, size)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                name, version, created_at, created_by, description, dumps(tags),
                dumps(metrics), dumps(lineage), info.framework, info.entrypoint,
                dumps(info.signature.to_dict()) if info.signature else None,
                sum(sizes[d] for d in checked.values()),
            ),
        ).fetchone()[0]
        for path, digest in checked.items():
            # A concurrent delete may have collected the blob since we looked.
            if not blobs.exists(digest):
                raise Unprocessable(f"file {path!r}: blob {digest} disappeared; upload it again")
            conn.execute(
                "INSERT INTO model_files (version_id, path, digest, size) VALUES (?, ?, ?, ?)",
                (version_id, path, digest, sizes[digest]),
            )
    return get_version(db, name, version)


def list_models(db: Database, *, tags: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    where, params = _tag_filter_sql(tags, "v.tags")
    return db.query(
        "SELECT m.name, COUNT(v.id) AS versions, MAX(v.version) AS latest_version,"
        " m.created_at, MAX(v.created_at) AS updated_at"
        " FROM models m JOIN model_versions v ON v.model = m.name"
        + (f" WHERE {where}" if where else "")
        + " GROUP BY m.name ORDER BY m.name",
        params,
    )


def list_versions(
    db: Database,
    name: str,
    *,
    tags: Sequence[tuple[str, str]] = (),
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    _require_model(db, name)
    where, params = _tag_filter_sql(tags, "tags")
    rows = db.query(
        "SELECT * FROM model_versions WHERE model = ?"
        + (f" AND {where}" if where else "")
        + " ORDER BY version DESC LIMIT ? OFFSET ?",
        [name, *params, limit, offset],
    )
    return [_version_record(r) for r in rows]


def _require_model(db: Database, name: str) -> None:
    if db.query_one("SELECT 1 FROM models WHERE name = ?", (name,)) is None:
        raise NotFound(f"no model named {name!r}; see `edgefleet model list`")


def _version_row(db: Database, name: str, version: int | str) -> dict[str, Any]:
    version = validation.version(version)
    if version == "latest":
        row = db.query_one(
            "SELECT * FROM model_versions WHERE model = ? ORDER BY version DESC LIMIT 1", (name,)
        )
    else:
        row = db.query_one(
            "SELECT * FROM model_versions WHERE model = ? AND version = ?", (name, version)
        )
    if row is None:
        _require_model(db, name)
        raise NotFound(
            f"model {name!r} has no version {version}; see `edgefleet model list {name}`"
        )
    return row


def get_version(db: Database, name: str, version: int | str) -> dict[str, Any]:
    row = _version_row(db, name, version)
    record = _version_record(row)
    record["files"] = db.query(
        "SELECT path, digest, size FROM model_files WHERE version_id = ? ORDER BY path",
        (row["id"],),
    )
    record["deployments"] = db.query(
        "SELECT device_id, name FROM deployments WHERE model = ? AND active = 1"
        " AND (version = ? OR candidate_version = ?)",
        (name, row["version"], row["version"]),
    )
    record["profiles"] = profiles.read(db, name, row["version"])
    return record


def version_file(db: Database, name: str, version: int | str, path: str) -> dict[str, Any]:
    row = _version_row(db, name, version)
    found = db.query_one(
        "SELECT path, digest, size FROM model_files WHERE version_id = ? AND path = ?",
        (row["id"], path),
    )
    if found is None:
        raise NotFound(f"{name}:{row['version']} has no file {path!r}")
    return found


def delete_version(db: Database, blobs: BlobStore, name: str, version: int) -> None:
    """Forget a version; refused (409, naming them) while a deployment, a rollout under way
    or such a rollout's rollback needs it."""
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT id FROM model_versions WHERE model = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            _require_model(db, name)
            raise NotFound(f"model {name!r} has no version {version}")
        # Deployments that run it, rollouts under way that ship it, and their devices
        # whose rollback would give it back: each would fail without its package.
        users = package_use.users(db, name, version)
        if users:
            raise Conflict(
                f"{name}:{version} is still needed: {package_use.describe(users)}; deploy "
                "another version there, or let those rollouts end (`edgefleet rollout abort "
                "ID`, or roll them back) first"
            )
        digests = [
            r[0] for r in conn.execute(
                "SELECT digest FROM model_files WHERE version_id = ?", (row[0],)
            )
        ]
        conn.execute("DELETE FROM model_files WHERE version_id = ?", (row[0],))
        profiles.delete(conn, name, version)
        conn.execute("DELETE FROM model_versions WHERE id = ?", (row[0],))
        for table in ("drift_baselines", "drift_sketches", "drift_results"):
            conn.execute(f"DELETE FROM {table} WHERE model = ? AND version = ?", (name, version))
        # Its packages (every variant, with their signatures) go with it, and what only
        # they used: collected in this transaction, sparing a push in progress.
        repo = f"models/{name}"
        oci_registry.untag_packages(conn, repo, version)
        before = format_time(datetime.now(UTC) - PUSH_GRACE)
        oci_registry.collect_garbage(conn, blobs, repo, before=before)
        # Identical files are stored once: drop a blob only when nothing else uses it.
        for digest in digests:
            still_used = conn.execute(
                "SELECT 1 FROM model_files WHERE digest = ?"
                " UNION ALL SELECT 1 FROM oci_repo_blobs WHERE digest = ? LIMIT 1",
                (digest, digest),
            ).fetchone()
            if still_used is None:
                blobs.delete(digest)
