"""Bounds on what a request may send, checked before any route reads it.

FastAPI reads and parses a JSON body before it runs a route's dependencies,
so without this a 64 MiB body with no token was read and parsed in full
(+770 MiB RSS), and a deeply nested one hit Python's recursion limit. The
gate, outermost but for the audit log:

- authenticates every mutating `/api/v1/` request that needs a token before
  a byte of its body is read (401 otherwise; `/enroll` carries its credential
  in the body, so its body is bounded by a small limit of its own instead);
- refuses a body larger than its limit (413): at once when Content-Length
  says so, else as soon as the stream passes it, never after reading it all;
- refuses JSON nested deeper than `MAX_JSON_DEPTH` (400) before it is parsed.

Uploads (`POST /api/v1/blobs`, the `/v2/` registry) authenticate in their
routes before they read; their bodies are streamed, and counted as they pass.
"""

from __future__ import annotations

from typing import Final

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.jsondepth import nests_deeper
from hub.api.auth import authenticate
from hub.api.errors import error_response
from hub.errors import HubError
from hub.storage.db import Database

MAX_JSON_DEPTH: Final = 32  # lineage and tags nest a few levels; nothing needs more
UNAUTHENTICATED_BYTES: Final = 64 * 1024  # /enroll: a key, a token, a name
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyTooLarge(HTTPException):
    """Raised from the body stream; an HTTPException so that FastAPI's body parsing
    passes it on as it is instead of calling it malformed."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this hub takes ({limit} bytes);"
                         " send less, or raise the hub's limit")
        self.limit = limit


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else None


def counted(receive: Receive, limit: int) -> Receive:
    """RECEIVE that raises BodyTooLarge once more than LIMIT bytes have come."""
    total = 0

    async def receive_counted() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_counted


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read already, then whatever comes next (a disconnect)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def _is_upload(method: str, path: str) -> bool:
    return (method == "POST" and path == "/api/v1/blobs") or path.startswith("/v2/")


def _is_json(scope: Scope) -> bool:
    # FastAPI parses a body without a Content-Type as JSON too.
    kind = Headers(scope=scope).get("content-type", "")
    return not kind or "json" in kind.lower()


def _refusal(scope: Scope, status: int, error: str, detail: str) -> Response:
    return error_response(Request(scope), status, error, detail)


class RequestGate:
    def __init__(self, app: ASGIApp, *, db: Database, max_request_bytes: int,
                 max_upload_bytes: int) -> None:
        self.app = app
        self.db = db
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if _is_upload(method, path):
            # The route authenticates before it reads; only then does the count start, and
            # the route answers a BodyTooLarge in its own shape (the registry's for /v2/).
            blob = path == "/api/v1/blobs" or "/blobs/uploads/" in path
            limit = self.max_upload_bytes if blob else self.max_request_bytes
            await self._streamed(scope, receive, send, limit)
            return
        if method not in BODY_METHODS or not path.startswith("/api/v1/"):
            await self.app(scope, counted(receive, self.max_request_bytes), send)
            return
        limit = self.max_request_bytes
        if path == "/api/v1/enroll":
            limit = UNAUTHENTICATED_BYTES
        else:
            try:
                principal = await authenticate(Request(scope), self.db)
            except HubError as exc:
                await _refusal(scope, exc.status, exc.error, exc.detail)(scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await self._too_large(scope, receive, send, limit)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # gone: nobody to answer
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await self._too_large(scope, receive, send, limit)
                return
        if _is_json(scope) and nests_deeper(body, MAX_JSON_DEPTH):
            await _refusal(scope, 400, "malformed JSON",
                         f"the body nests deeper than {MAX_JSON_DEPTH} levels")(
                scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            # Refused when the route first reads the body, i.e. after it authenticated.
            async def refuse_on_read() -> Message:
                raise BodyTooLarge(limit)
            await self.app(scope, refuse_on_read, send)
            return
        await self.app(scope, counted(receive, limit), send)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        # The server reads what is left of the body and drops it, so the connection
        # stays usable for the client's next request.
        await _refusal(scope, 413, "payload too large", BodyTooLarge(limit).detail)(
            scope, receive, send)
