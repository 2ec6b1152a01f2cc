"""The database errors the hub catches, whichever backend raised them.

SQLite's connections are sqlite3's own (no wrapper on the hot path), so its exceptions
stay sqlite3's; the PostgreSQL connection (hub/storage/postgres.py) raises the two
classes below. Callers catch the tuples.
"""

from __future__ import annotations

import sqlite3


class PostgresConflict(Exception):
    """A unique, primary or foreign key constraint refused a write on PostgreSQL."""


class PostgresUnavailable(Exception):
    """PostgreSQL could not run a statement now (connection lost, server gone, disk full)."""


class PostgresError(Exception):
    """Any other error PostgreSQL answered (a bad statement, a serialization failure)."""


# A constraint refused the write: the caller's request conflicts with what is stored.
CONFLICT: tuple[type[Exception], ...] = (sqlite3.IntegrityError, PostgresConflict)
# The database could not do it now (busy, full, gone): worth trying again later.
UNAVAILABLE: tuple[type[Exception], ...] = (sqlite3.OperationalError, PostgresUnavailable)
# Any error of either database.
ANY: tuple[type[Exception], ...] = (sqlite3.Error, PostgresConflict, PostgresUnavailable,
                                    PostgresError)
