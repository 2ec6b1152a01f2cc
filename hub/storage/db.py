"""The hub's metadata database, one connection per thread: SQLite in WAL mode (a file in
the data dir, the default) or PostgreSQL (`--database-url`; hub/storage/dialect.py says
what differs).

Everything the hub knows except blob bytes lives here. The schema is created, or
migrated step by step, on open. Writers take the write lock up front (BEGIN IMMEDIATE;
an advisory lock on PostgreSQL) so that read-then-write sequences, like picking the
next version number, cannot race.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hub.storage.dialect import Connection, Dialect, dialect_for

SCHEMA_VERSION = 9


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_time(moment: datetime) -> str:
    """Timestamps are UTC ISO 8601 strings of fixed width with a Z: sortable as text."""
    if moment.tzinfo is None:  # naive times are taken to be UTC already
        moment = moment.replace(tzinfo=UTC)
    # isoformat, not strftime: glibc's %Y writes the year 999 as "999", not "0999".
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def now() -> str:
    return format_time(datetime.now(UTC))


# One encoder for all: json.dumps with options builds a new JSONEncoder every call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def dumps(value: Any) -> str:
    return _ENCODER.encode(value)


class _Table:
    """DDL for one table, in the words of sqlite-utils' `create` (which wrote the first
    schemas) and in the database's own types."""

    def __init__(self, schema: _Schema, name: str) -> None:
        self.schema, self.name = schema, name

    def create(self, columns: Mapping[str, type], *, pk: str | tuple[str, ...],
               foreign_keys: Iterable[tuple[str, str, str]] = (),
               not_null: Iterable[str] = ()) -> None:
        dialect = self.schema.dialect
        references = {column: f"{table}({key})" for column, table, key in foreign_keys}
        serial = isinstance(pk, str) and columns[pk] is int  # numbered by the database
        defs = []
        for column, kind in columns.items():
            text = f"{column} {dialect.types[kind]}"
            if serial and column == pk:
                text = f"{column} {dialect.serial_key}"
            elif column == pk:
                text += " PRIMARY KEY"
            if column in not_null:
                text += " NOT NULL"
            if column in references:
                text += f" REFERENCES {references[column]}"
            defs.append(text)
        if isinstance(pk, tuple):
            defs.append(f"PRIMARY KEY ({', '.join(pk)})")
        self.schema.conn.execute(f"CREATE TABLE {self.name} ({', '.join(defs)})")

    def create_index(self, columns: Sequence[str], *, unique: bool = False) -> None:
        name = f"idx_{self.name}_{'_'.join(columns)}"
        self.schema.conn.execute(f"CREATE {'UNIQUE ' if unique else ''}INDEX {name}"
                                 f" ON {self.name} ({', '.join(columns)})")

    def add_column(self, column: str, kind: type) -> None:
        self.schema.conn.execute(
            f"ALTER TABLE {self.name} ADD COLUMN {column} {self.schema.dialect.types[kind]}")


class _Schema:
    """The schema's statements on CONN, in DIALECT's words."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self.conn, self.dialect = conn, dialect

    def __getitem__(self, name: str) -> _Table:
        return _Table(self, name)

    def execute(self, ddl: str) -> None:
        """DDL written for SQLite, run in the dialect's words."""
        self.conn.execute(self.dialect.ddl(ddl))


def _create_schema(db: _Schema) -> None:
    if "models" in db.dialect.tables(db.conn):
        _migrate(db)
        return
    db["models"].create(
        {"name": str, "created_at": str, "next_version": int}, pk="name"
    )
    db["model_versions"].create(
        {
            "id": int, "model": str, "version": int, "created_at": str, "created_by": str,
            "description": str, "tags": str, "metrics": str, "lineage": str,
            "framework": str, "entrypoint": str, "signature": str, "size": int,
        },
        pk="id",
        foreign_keys=[("model", "models", "name")],
        not_null={"model", "version", "created_at"},
    )
    db["model_versions"].create_index(["model", "version"], unique=True)
    db["model_files"].create(
        {"version_id": int, "path": str, "digest": str, "size": int},
        pk=("version_id", "path"),
        foreign_keys=[("version_id", "model_versions", "id")],
    )
    db["model_files"].create_index(["digest"])
    # What each device should run: one row per (device, deployment name). A
    # deployment may carry a candidate version beside its primary one, for a
    # traffic split or shadow mode. Any change bumps devices.desired_generation.
    db["deployments"].create(
        {"device_id": str, "name": str, "model": str, "version": int, "repository": str,
         "digest": str, "size": int, "prefer": str, "traffic": int,
         "candidate_version": int, "candidate_digest": str, "candidate_size": int,
         "candidate_traffic": int, "candidate_shadow": int,
         "variant": str, "candidate_variant": str, "settings": str,
         "rollout_id": str, "priority": int, "active": int, "created_at": str,
         "updated_at": str},
        pk=("device_id", "name"),
    )
    db["deployments"].create_index(["model", "version"])
    db["deployments"].create_index(["rollout_id"])
    db["devices"].create(
        {"id": str, "name": str, "tags": str, "public_key": str, "platform": str,
         "inventory": str, "reported": str, "status": str, "last_seen": str,
         "enrolled_at": str, "enrollment_token_id": str, "token_hash": str,
         "desired_generation": int, "applied_generation": int,
         # The generation whose signed desired state the broker holds (retained)
         # and when that signature expires: the publisher's catch-up after a
         # restart or reconnect is the devices where these fall behind.
         "published_generation": int, "published_expires_at": str},
        pk="id",
    )
    # What each device reports per deployment version (a deployment with a
    # candidate has two rows), replaced with every reported state. Rollouts
    # count these: "how many devices of this wave serve version X".
    db["deployment_status"].create(
        {"device_id": str, "name": str, "model": str, "version": int, "state": str,
         "error": str, "runtime": str, "device": str, "since": str, "updated_at": str},
        pk=("device_id", "name", "version"),
    )
    db["deployment_status"].create_index(["name", "version", "state"])
    db["enrollment_tokens"].create(
        {"id": str, "token_hash": str, "tags": str, "expires_at": str, "max_uses": int,
         "uses": int, "created_at": str, "created_by": str, "revoked_at": str},
        pk="id",
    )
    db["enrollment_tokens"].create_index(["token_hash"], unique=True)
    db["api_tokens"].create(
        {"id": str, "name": str, "role": str, "token_hash": str, "created_at": str,
         "created_by": str, "revoked_at": str},
        pk="id",
    )
    db["api_tokens"].create_index(["token_hash"], unique=True)
    db["audit"].create(
        {"id": int, "at": str, "actor": str, "action": str, "target": str,
         "status": int, "result": str, "detail": str},
        pk="id",
    )
    db["audit"].create_index(["at"])
    # The OCI registry: manifests are blobs too; these tables say which
    # repository holds which manifest and blob, and what each tag points at.
    db["oci_manifests"].create(
        {"repo": str, "digest": str, "media_type": str, "size": int, "created_at": str},
        pk=("repo", "digest"),
    )
    db["oci_tags"].create(
        {"repo": str, "tag": str, "digest": str, "updated_at": str}, pk=("repo", "tag")
    )
    # linked_at: when a push last linked the blob, so garbage collection spares the blobs
    # of a push in progress (linked, not yet referenced by its manifest).
    db["oci_repo_blobs"].create({"repo": str, "digest": str, "linked_at": str},
                                pk=("repo", "digest"))
    db["oci_repo_blobs"].create_index(["digest"])
    # Each point once: the agent numbers its points, a resend hits the primary key.
    db["telemetry"].create(
        {"device_id": str, "seq": int, "at": str, "kind": str, "metrics": str},
        pk=("device_id", "seq"),
    )
    db["telemetry"].create_index(["at"])
    # Rollouts: id "r-<seq>"; rollout_devices is each target device's wave and
    # progress, so a restarted hub resumes every rollout where it was.
    db["rollouts"].create(
        {"seq": int, "id": str, "model": str, "version": int, "deployment": str, "target": str,
         "waves": str, "max_failures": str, "soak": str, "device_timeout": str,
         "auto_rollback": int, "traffic": int, "shadow": int, "priority": int, "prefer": str,
         "max_error_rate": float, "max_latency_ratio": float, "state": str, "reason": str,
         "current_wave": int, "wave_started_at": str, "created_at": str, "created_by": str,
         "updated_at": str, "spec": str},
        pk="seq",
    )
    db["rollouts"].create_index(["id"])
    db["rollouts"].create_index(["state"])
    db["rollout_devices"].create(
        {"rollout_id": str, "device_id": str, "wave": int, "state": str, "previous_version": int,
         "previous_variant": str, "previous_settings": str, "assigned_at": str,
         "serving_at": str, "error": str},
        pk=("rollout_id", "device_id"),
    )
    db["rollout_devices"].create_index(["rollout_id", "wave", "state"])
    _add_telemetry_rollups(db)
    _add_events(db)
    _add_profiles(db)
    _add_drift(db)
    _add_commands(db)
    db["meta"].create({"key": str, "value": str}, pk="key")
    db.conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),))


def _add_telemetry_rollups(db: _Schema) -> None:
    """Schema 3: per-minute and per-hour telemetry aggregates (hub/rollups.py) and, per
    device, the last raw point rolled up (hub/retention.py). Raw points already stored
    are rolled up by the first passes after the upgrade."""
    db["telemetry_rollups"].create(
        {"device_id": str, "period": int, "start": str, "kind": str, "deployment": str,
         "version": str, "points": int, "stats": str},
        pk=("device_id", "period", "start", "kind", "deployment", "version"),
    )
    db["telemetry_rollups"].create_index(["period", "start"])  # retention deletes oldest first
    db["telemetry_rolled"].create({"device_id": str, "seq": int}, pk="device_id")


def _add_events(db: _Schema) -> None:
    """Schema 6: events (hub/events.py) and webhooks (hub/webhooks.py). AUTOINCREMENT:
    an event's seq is never given again, even once retention deleted the newest."""
    db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL,"
               " type TEXT NOT NULL, subject TEXT NOT NULL, actor TEXT NOT NULL,"
               " detail TEXT NOT NULL)")
    db["events"].create_index(["at"])  # retention deletes oldest first
    db["events"].create_index(["type", "seq"])
    # A subscription's cursor is the last event seq it has looked at: events after it
    # are matched against its types and filter and become deliveries.
    db["webhooks"].create(
        {"id": str, "url": str, "types": str, "filter": str, "secret": str, "cursor": int,
         "created_at": str, "created_by": str},
        pk="id",
    )
    db.execute("CREATE TABLE webhook_deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT,"
               " webhook_id TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,"
               " event_seq INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,"
               " next_at TEXT, last_status INTEGER, last_error TEXT, created_at TEXT NOT NULL,"
               " updated_at TEXT NOT NULL, UNIQUE (webhook_id, event_seq))")
    db["webhook_deliveries"].create_index(["webhook_id", "state", "next_at"])
    db["webhook_deliveries"].create_index(["event_seq"])


def _add_profiles(db: _Schema) -> None:
    """Schema 7: model profiles (hub/profiles.py), one row per version, device class,
    runtime, device, variant and batch size; a new measurement of the same key replaces it."""
    db.execute("CREATE TABLE model_profiles (model TEXT NOT NULL, version BIGINT NOT NULL,"
               " device_class TEXT NOT NULL, runtime TEXT NOT NULL, device TEXT NOT NULL,"
               " variant TEXT NOT NULL, batch BIGINT NOT NULL, iterations BIGINT NOT NULL,"
               " p50_ms DOUBLE PRECISION NOT NULL, p99_ms DOUBLE PRECISION NOT NULL,"
               " throughput DOUBLE PRECISION NOT NULL, peak_rss_bytes BIGINT NOT NULL,"
               " host TEXT NOT NULL, profiled_at TEXT NOT NULL, profiled_by TEXT NOT NULL,"
               " PRIMARY KEY (model, version, device_class, runtime, device, variant, batch))")


def _add_drift(db: _Schema) -> None:
    """Schema 8: data drift (hub/drift.py): each version's baseline, the sketch counts
    devices sent per hour, and the last drift computed per version, target and feature."""
    db.execute("CREATE TABLE drift_baselines (model TEXT NOT NULL, version BIGINT NOT NULL,"
               " baseline TEXT NOT NULL, spec TEXT NOT NULL, created_at TEXT NOT NULL,"
               " created_by TEXT NOT NULL, PRIMARY KEY (model, version))")
    # counts: a JSON object, feature -> its counts, so a message costs one row.
    db.execute("CREATE TABLE drift_sketches (model TEXT NOT NULL, version BIGINT NOT NULL,"
               " hour TEXT NOT NULL, device_id TEXT NOT NULL, counts TEXT NOT NULL,"
               " PRIMARY KEY (model, version, hour, device_id))")
    db.execute("CREATE TABLE drift_results (model TEXT NOT NULL, version BIGINT NOT NULL,"
               " target TEXT NOT NULL, feature TEXT NOT NULL, observed BIGINT NOT NULL,"
               " psi DOUBLE PRECISION, js DOUBLE PRECISION, drifted BIGINT NOT NULL,"
               " computed_at TEXT NOT NULL, PRIMARY KEY (model, version, target, feature))")


def _add_commands(db: _Schema) -> None:
    """Schema 9: commands to devices (hub/commands.py) and what became of each; a done
    profile's rows as the device sent them (also stored in model_profiles)."""
    db.execute("CREATE TABLE device_commands (id TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
               " kind TEXT NOT NULL, model TEXT NOT NULL, version BIGINT NOT NULL,"
               " variant TEXT NOT NULL, max_batch BIGINT NOT NULL, iterations BIGINT NOT NULL,"
               " state TEXT NOT NULL, error TEXT, rows TEXT, issued_at TEXT NOT NULL,"
               " expires_at TEXT NOT NULL, updated_at TEXT NOT NULL, created_by TEXT NOT NULL)")
    db["device_commands"].create_index(["device_id", "state"])


def _migrate(db: _Schema) -> None:
    """Bring a database written by an older hub up to SCHEMA_VERSION, one step at a time."""
    version = int(db.conn.execute(
        "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    if version < 2:
        # The rollout's typed spec (hub/rollouts/spec.py); rows from before it get theirs
        # from their text columns on first use.
        db["rollouts"].add_column("spec", str)
    if version < 3:
        # Package variants (hub/packages.py): every package built before them is its
        # version's default variant, and so is every deployment of one.
        db["deployments"].add_column("variant", str)
        db["deployments"].add_column("candidate_variant", str)
        db["rollout_devices"].add_column("previous_variant", str)
        db["oci_repo_blobs"].add_column("linked_at", str)  # NULL: linked long ago
        db.execute("UPDATE deployments SET variant = 'default'")
        db.execute("UPDATE deployments SET candidate_variant = 'default'"
                   " WHERE candidate_version IS NOT NULL")
        db.execute("UPDATE rollout_devices SET previous_variant = 'default'"
                   " WHERE previous_version IS NOT NULL")
    if version < 4:
        _add_telemetry_rollups(db)
    if version < 5:
        # Per-deployment settings (contract/settings.py, canonical JSON): every deployment
        # before them said nothing, which is "{}"; a rollback gives a device's back.
        db["deployments"].add_column("settings", str)
        db["rollout_devices"].add_column("previous_settings", str)
        db.execute("UPDATE deployments SET settings = '{}'")
        db.execute("UPDATE rollout_devices SET previous_settings = '{}'"
                   " WHERE previous_version IS NOT NULL")
    if version < 6:
        _add_events(db)
    if version < 7:
        _add_profiles(db)
    if version < 8:
        _add_drift(db)
    if version < 9:
        _add_commands(db)
    if version < SCHEMA_VERSION:
        db.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                        (str(SCHEMA_VERSION),))


# Indexes added after the first schema, created on every open so existing hubs get them
# too. The dashboard's fleet page counts by status and platform and pages through the
# devices by name (bench/dashboard.py measures what they buy).
LATER_INDEXES = (
    "CREATE INDEX IF NOT EXISTS devices_status ON devices (status)",
    "CREATE INDEX IF NOT EXISTS devices_platform ON devices (platform)",
    "CREATE INDEX IF NOT EXISTS devices_name_id ON devices (name, id)",
)
# Columns added after the first schema, the same way: (table, column, SQL type).
LATER_COLUMNS = (
    ("api_tokens", "expires_at", "TEXT"),  # NULL: the token does not expire
    # sha256 of the desired state the hub last had the broker retain: the retained-state
    # watch (hub/retained.py) knows its own without checking a signature.
    ("devices", "published_digest", "TEXT"),
)


class Database:
    """Thread-safe access to the hub's database: a SQLite file, or a postgresql:// URL.

    Each thread gets its own connection (neither sqlite3's nor psycopg's are to be
    shared across threads); on SQLite, WAL lets readers run beside the one writer.
    """

    def __init__(self, target: Path | str) -> None:
        self.target = target  # to open it again
        self.dialect: Dialect = dialect_for(target)
        # The SQLite file (its size is a metric); None on PostgreSQL.
        self.path: Path | None = getattr(self.dialect, "path", None)
        self._local = threading.local()
        self.dialect.prepare(self.conn)
        # One transaction: the schema is whole or absent, and hubs opening one
        # PostgreSQL database at once create or migrate it once.
        with self.transaction() as conn:
            _create_schema(_Schema(conn, self.dialect))
            for statement in LATER_INDEXES:
                conn.execute(statement)
            for table, column, kind in LATER_COLUMNS:
                if column not in self.dialect.columns(conn, table):
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @property
    def conn(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        # broken: a PostgreSQL connection whose server went away (restarted, or dropped
        # it); the next statement gets a new one.
        if conn is None or getattr(conn, "broken", False):
            conn = self._local.conn = self.dialect.connect()
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their threads' locals go)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    def refresh_statistics(self) -> list[str]:
        """Renew the query planner's statistics of the tables whose size changed much (the
        dialect's `refresh_statistics`); the tables renewed."""
        return self.dialect.refresh_statistics(self.conn)

    def sizes(self) -> dict[str, int]:
        """The database's bytes on disk, by file (the dialect's `sizes`)."""
        return self.dialect.sizes(self.conn)

    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[dict[str, Any]]:
        return [dict(row) for row in self.conn.execute(sql, params)]

    def query_one(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> dict[str, Any] | None:
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def last_given(self, table: str, column: str) -> int:
        """The highest value TABLE's serial COLUMN ever gave (0 for none), deleted rows too."""
        return self.dialect.last_given(self.conn, table, column)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction holding the write lock from its first statement.

        Inside another transaction on the same thread it is a savepoint of
        that one, so a batch (the MQTT ingest) can call domain functions that
        open their own transaction and still commit everything at once.
        """
        conn = self.conn
        if conn.in_transaction:
            conn.execute("SAVEPOINT nested")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO nested")
                conn.execute("RELEASE nested")
                raise
            conn.execute("RELEASE nested")
            return
        try:
            for statement in self.dialect.begin:
                conn.execute(statement)
        except BaseException:  # the write lock not had (busy): nothing to keep open
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
