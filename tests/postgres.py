"""A private PostgreSQL server for the tests: initdb into a temp dir, `postgres` on a free
port of 127.0.0.1 (as the postgres user when the tests run as root, which PostgreSQL
refuses), and one fresh database per test. Some 0.3-1 s a test on this machine: CREATE
DATABASE, then the hub's schema."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from hub.storage.db import Database

# Debian's postgresql package (.ci/install): its newest major version's programs.
BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name),
          default=Path("/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.port = _free_port()
        self._names = itertools.count()
        as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            # setpriv execs: the server is our child, and our signals reach it.
            as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                       "--init-groups", "--"]
        data = self.dir / "data"
        subprocess.run([*as_user, BIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        # fsync off: a test database need not survive a crash of the machine.
        with open(self.dir / "log", "wb") as log:
            self.process = subprocess.Popen(
                [*as_user, BIN / "postgres", "-D", data, "-k", self.dir, "-p", str(self.port),
                 "-h", "127.0.0.1", "-c", "fsync=off", "-c", "max_connections=300"],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url("postgres")).close()
                break
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.dir / "log").read_text()) from None
                time.sleep(0.1)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # fast shutdown: open sessions are ended
        self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


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
