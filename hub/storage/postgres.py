"""PostgreSQL behind the connection API the hub uses on SQLite (sqlite3's).

The hub's statements are written once, in SQL both databases accept; what differs is
translated here, in one place (`translate`): `?` placeholders, the SQLite names of a few
JSON and string functions (the functions themselves are defined in FUNCTIONS, with
SQLite's meaning), and `rowid`. Rows answer by index and by name like sqlite3.Row;
integrity and connection errors become hub.storage.errors' classes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import psycopg
import psycopg.adapt
import psycopg.pq
import psycopg.rows

from hub.storage.errors import PostgresConflict, PostgresError, PostgresUnavailable

# SQLite's functions the hub uses, with SQLite's meaning, on text columns that hold JSON.
# json_each yields (key, value) of an array or object as text; json_extract answers
# text too (a statement that compares it with a number casts it, on both databases).
FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION ef_json_path(path text) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
  SELECT COALESCE(array_agg(COALESCE(m[1], m[2], m[3]) ORDER BY n), '{}')
  FROM regexp_matches(path, '\.(?:"([^"]*)"|([^.\[]+))|\[(\d+)\]', 'g') WITH ORDINALITY AS t(m, n)
$$;
CREATE OR REPLACE FUNCTION json_extract(doc text, path text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT doc::jsonb #>> ef_json_path(path) $$;
CREATE OR REPLACE FUNCTION ef_json_each(doc text) RETURNS TABLE (key text, value text)
LANGUAGE sql IMMUTABLE AS $$
  SELECT (n - 1)::text, v FROM json_array_elements_text(
    CASE WHEN json_typeof(doc::json) = 'array' THEN doc::json ELSE '[]' END)
    WITH ORDINALITY AS a(v, n)
  UNION ALL
  SELECT k, v FROM json_each_text(
    CASE WHEN json_typeof(doc::json) = 'object' THEN doc::json ELSE '{}' END) AS o(k, v)
$$;
CREATE OR REPLACE FUNCTION ef_json_each(doc text, path text) RETURNS TABLE (key text, value text)
LANGUAGE sql IMMUTABLE AS $$
  SELECT * FROM ef_json_each((doc::jsonb #> ef_json_path(path))::text)
$$;
-- RFC 7396 merge patch, as SQLite's json_patch.
CREATE OR REPLACE FUNCTION json_patch(target text, patch text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  merged jsonb := target::jsonb;
  k text;
  v jsonb;
BEGIN
  IF jsonb_typeof(patch::jsonb) IS DISTINCT FROM 'object' THEN RETURN patch; END IF;
  IF jsonb_typeof(merged) IS DISTINCT FROM 'object' THEN merged := '{}'; END IF;
  FOR k, v IN SELECT * FROM jsonb_each(patch::jsonb) LOOP
    IF jsonb_typeof(v) = 'null' THEN
      merged := merged - k;
    ELSE
      merged := jsonb_set(merged, ARRAY[k], json_patch((merged -> k)::text, v::text)::jsonb);
    END IF;
  END LOOP;
  RETURN merged::text;
END $$;
-- SUM over a condition counts where it holds, as SQLite's (a comparison there is 0 or 1).
CREATE OR REPLACE FUNCTION ef_add_flag(total bigint, flag boolean) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT AS $$ SELECT total + flag::integer $$;
CREATE OR REPLACE AGGREGATE sum(boolean) (SFUNC = ef_add_flag, STYPE = bigint, INITCOND = '0');
CREATE OR REPLACE FUNCTION instr(haystack text, needle text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT strpos(haystack, needle) $$;
CREATE OR REPLACE FUNCTION julianday(moment text) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$ SELECT extract(epoch FROM moment::timestamptz) / 86400 + 2440587.5 $$;
"""

# SQLite spellings with another name on PostgreSQL (json_each: PostgreSQL has its own,
# for json objects only). rowid becomes ctid: both name a row of a table without its key.
# "CROSS JOIN ... ON" is SQLite's inner join in the order written (its planner keeps
# it); PostgreSQL refuses ON after CROSS JOIN and plans the order itself.
_RENAMES = {"json_each": "ef_json_each", "group_concat": "string_agg", "rowid": "ctid",
            "CROSS JOIN": "JOIN"}
_TOKENS = re.compile(r"'(?:[^']|'')*'|\?|%|:[A-Za-z_]\w*"
                     r"|\b(?:json_each|group_concat|rowid|CROSS JOIN)\b")


@lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQL as the hub writes it (SQLite's dialect, `?` or `:name` placeholders) for psycopg."""
    def one(match: re.Match[str]) -> str:
        token = match.group()
        if token.startswith("'"):
            return token.replace("%", "%%")
        if token.startswith(":"):
            return f"%({token[1:]})s"
        return {"?": "%s", "%": "%%"}.get(token) or _RENAMES[token]
    return _TOKENS.sub(one, sql)


class Row(Sequence[Any]):
    """A result row by index or by column name, and a mapping for dict(): sqlite3.Row's API."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: Any) -> Any:
        return self._values[self._names[key] if isinstance(key, str) else key]

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)


def _rows(cursor: psycopg.Cursor[Any]) -> psycopg.rows.RowMaker[Row]:
    names: dict[str, int] = {}
    for i, column in enumerate(cursor.description or ()):
        names.setdefault(column.name, i)  # a name twice (a join's *): the first, as sqlite3's
    return lambda values: Row(names, values)


class _Flag(psycopg.adapt.Dumper):
    """A Python bool as SQLite takes it: the hub stores flags in integer columns, and
    also tests them (CASE WHEN ?). An untyped '1' or '0' is either, by its context."""

    def dump(self, obj: bool) -> bytes:
        return b"1" if obj else b"0"


class _Number(psycopg.adapt.Loader):
    """SUM and AVG answer numeric: an int when whole, else a float, as SQLite's would be."""

    def load(self, data: Any) -> int | float:
        text = bytes(data)
        return float(text) if b"." in text or b"e" in text.lower() else int(text)


def _error(exc: psycopg.Error) -> Exception:
    if isinstance(exc, psycopg.IntegrityError):
        return PostgresConflict(str(exc))
    if isinstance(exc, psycopg.OperationalError) and not isinstance(
            exc, psycopg.errors.SerializationFailure):
        return PostgresUnavailable(str(exc))
    return PostgresError(str(exc))


Params = Sequence[Any] | Mapping[str, Any]


class Cursor:
    """What a statement answered: sqlite3.Cursor's fetchone, fetchall, iteration, rowcount."""

    def __init__(self, cursor: psycopg.Cursor[Row]) -> None:
        self._cursor = cursor
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Row | None:
        return self._cursor.fetchone() if self._cursor.description else None

    def fetchall(self) -> list[Row]:
        return self._cursor.fetchall() if self._cursor.description else []

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


class Connection:
    """One PostgreSQL connection in autocommit mode; Database.transaction runs BEGIN itself."""

    def __init__(self, url: str) -> None:
        try:
            # Client-side binding: a parameter is a literal in the statement, typed by
            # its context as SQLite's are (a server-side NULL in `? IS NULL` has no type).
            self._conn = psycopg.connect(url, autocommit=True, row_factory=_rows,
                                         cursor_factory=psycopg.ClientCursor)
        except psycopg.Error as exc:
            raise _error(exc) from exc
        self._pid = os.getpid()
        self._conn.adapters.register_dumper(bool, _Flag)
        self._conn.adapters.register_loader("numeric", _Number)

    @property
    def broken(self) -> bool:
        """Lost (the server went away or ended the session): no use trying it again."""
        return self._conn.broken or self._conn.closed

    @property
    def in_transaction(self) -> bool:
        return self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def execute(self, sql: str, params: Params = ()) -> Cursor:
        try:
            return Cursor(self._conn.execute(translate(sql), params))
        except psycopg.Error as exc:
            raise _error(exc) from exc

    def executemany(self, sql: str, rows: Sequence[Params]) -> Cursor:
        # Server-side binding here: one statement prepared once and its rows pipelined
        # (client-side, each row would be a statement of its own: 3x slower ingest). A
        # batch writes rows into columns, which type its parameters.
        cursor = psycopg.Cursor(self._conn, row_factory=_rows)
        try:
            cursor.executemany(translate(sql), rows)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise _error(exc) from exc
        return Cursor(cursor)

    def close(self) -> None:
        self._conn.close()

    def __del__(self) -> None:
        """A thread's connection goes with the thread (threading.local): closed, not left
        to psycopg, which warns of a connection deleted while open. Not in a child forked
        from this process (subprocess's preexec_fn: its copy of every thread's locals goes
        at fork), whose goodbye on the shared socket would end the parent's session."""
        if os.getpid() == self._pid:
            self._conn.close()


    def run_script(self, sql: str) -> None:
        """Several statements as they are: no placeholders, no translation."""
        try:
            self._conn.execute(sql.encode())
        except psycopg.Error as exc:
            raise _error(exc) from exc
