"""ASGI middleware that writes one audit entry per mutating request.

Handlers name their action with `request.state.audit = (action, target)`;
requests that never got that far (bad token, malformed body) are logged
with their method and path. A handler that is one step of a larger change
(a blob upload of a registry push) sets `request.state.audit_quiet`: the
step is logged only if it fails.

An entry that cannot be written (the disk is full) costs the request
nothing: it has been answered already. The failure is logged once, with the
count of entries lost when writing works again, not a traceback per request.
"""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub import audit
from hub.storage.db import Database

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
log = logging.getLogger("edgefleet.hub")


class AuditLog:
    def __init__(self, app: ASGIApp, *, db: Database) -> None:
        self.app = app
        self.db = db
        self.lost = 0  # entries not written since writing last failed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            state = scope.get("state", {})
            if not (state.get("audit_quiet") and status < 400):
                await self._record(state, scope, status)

    async def _record(self, state: dict, scope: Scope, status: int) -> None:
        principal = state.get("principal")
        actor = principal.name if principal else state.get("audit_actor", "anonymous")
        # The path is anyone's text: kept printable and short.
        path = scope["path"][:200].encode("unicode_escape").decode("ascii")
        action, target = state.get("audit", (f"{scope['method']} {path}", ""))
        try:
            await run_in_threadpool(
                audit.record,
                self.db,
                actor=actor,
                action=action,
                target=target,
                status=status,
                detail=state.get("audit_detail", ""),
            )
        except Exception as exc:  # noqa: BLE001 - the answer is out; say it once
            if not self.lost:
                log.error("audit entries cannot be written (%s: %s); requests are still "
                          "answered, and the count lost is logged once writing works",
                          type(exc).__name__, exc)
            self.lost += 1
        else:
            if self.lost:
                log.warning("audit entries are written again; %d were lost", self.lost)
                self.lost = 0
