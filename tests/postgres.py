"""A private PostgreSQL server for the tests (bench/harness.py's `PostgresServer`, which
the benchmarks use too) and one fresh database per test. Some 0.3-1 s a test on this
machine: CREATE DATABASE, then the hub's schema."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.harness import PostgresServer
from hub.storage.db import Database

__all__ = ["PostgresServer", "any_db", "as_older_hub_left_it", "db_target", "postgres_server",
           "postgres_url", "write_lock_held"]

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's hub database is: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "hub.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def any_db(db_target: Path | str) -> Iterator[Database]:
    """A fresh hub database on each backend in turn."""
    db = Database(db_target)
    yield db
    db.close()


@contextmanager
def write_lock_held(db: Database) -> Iterator[None]:
    """Another connection holds DB's write lock meanwhile, and DB's writers on this
    thread give up waiting for it after 50 ms (a busy database)."""
    locker = db.dialect.connect()
    for statement in db.dialect.begin:
        locker.execute(statement)
    wait, waited = (("PRAGMA busy_timeout = 50", "PRAGMA busy_timeout = 10000")
                    if db.dialect.name == "sqlite"
                    else ("SET lock_timeout = 50", "SET lock_timeout = '10s'"))
    db.conn.execute(wait)
    try:
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        db.conn.execute(waited)


def as_older_hub_left_it(db: Database, version: int, *, columns: tuple[tuple[str, str], ...] = (),
                         tables: tuple[str, ...] = ()) -> None:
    """DB as a hub of schema VERSION left it: COLUMNS ((table, column)) and TABLES added
    since dropped, on either database."""
    with db.transaction() as conn:
        for table, column in columns:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        for table in tables:
            conn.execute(f"DROP TABLE {table}")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
