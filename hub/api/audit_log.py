"""ASGI middleware that writes one audit entry per mutating request.

Handlers name their action with `request.state.audit = (action, target)`;
requests that never got that far (bad token, malformed body) are logged
with their method and path. A handler that is one step of a larger change
(a blob upload of a registry push) sets `request.state.audit_quiet`: the
step is logged only if it fails.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub import audit
from hub.storage.db import Database

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


class AuditLog:
    def __init__(self, app: ASGIApp, *, db: Database) -> None:
        self.app = app
        self.db = db

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
        action, target = state.get("audit", (f"{scope['method']} {scope['path']}", ""))
        await run_in_threadpool(
            audit.record,
            self.db,
            actor=actor,
            action=action,
            target=target,
            status=status,
            detail=state.get("audit_detail", ""),
        )
