"""The audit log: who did what, when, and how it ended."""

from __future__ import annotations

from typing import Any

from hub import events
from hub.storage.db import Database, now


def record(
    db: Database, *, actor: str, action: str, target: str, status: int, detail: str = ""
) -> None:
    result = "ok" if status < 400 else "denied" if status in (401, 403) else "failed"
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO audit (at, actor, action, target, status, result, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now(), actor, action, target, status, result, detail[:1000]),
        )
        events.from_audit(conn, action=action, target=target, actor=actor, status=status,
                          detail=detail)


def entries(
    db: Database, *, limit: int = 100, actor: str | None = None, action: str | None = None
) -> list[dict[str, Any]]:
    clauses, params = [], []
    if actor:
        clauses.append("actor = ?")
        params.append(actor)
    if action:
        clauses.append("action LIKE ?")
        params.append(action + "%")
    return db.query(
        "SELECT * FROM audit"
        + (" WHERE " + " AND ".join(clauses) if clauses else "")
        + " ORDER BY id DESC LIMIT ?",
        [*params, limit],
    )
