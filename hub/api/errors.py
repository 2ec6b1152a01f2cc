"""Every error leaves the API as JSON {"error": ..., "detail": ...}.

The handlers also note the detail on the request so the audit log can say
why an action failed.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.errors import HubError
from hub.oci_registry import RegistryError
from hub.storage import errors
from hub.storage.blobs import BlobError
from hub.storage.s3 import S3Error
from hub.validation import InvalidName

log = logging.getLogger("edgefleet.hub")


def error_response(request: Request, status: int, error: str, detail: str) -> JSONResponse:
    request.state.audit_detail = detail
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "request"


def registry_response(exc: RegistryError) -> JSONResponse:
    """EXC in the distribution spec's error shape, which the /v2/ routes answer in."""
    return JSONResponse(
        {"errors": [{"code": exc.code, "message": exc.message, "detail": exc.detail}]},
        status_code=exc.status,
        headers=exc.headers,
    )


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" or tuple(p["loc"]) == ("body",) for p in problems):
        return error_response(
            request,
            400,
            "malformed JSON",
            "the request body must be a JSON object (Content-Type: application/json)",
        )
    detail = "; ".join(f"{_location(p['loc'])}: {p['msg']}" for p in problems[:10])
    if request.url.path.startswith("/v2/"):  # the registry answers in the spec's shape
        return registry_response(RegistryError(422, "UNSUPPORTED", detail))
    return error_response(request, 422, "invalid input", detail)


async def _hub_error(request: Request, exc: HubError) -> JSONResponse:
    return error_response(request, exc.status, exc.error, exc.detail)


async def _invalid(request: Request, exc: InvalidName) -> JSONResponse:
    return error_response(request, 422, "invalid input", str(exc))


async def _blob(request: Request, exc: BlobError) -> JSONResponse:
    return error_response(request, 400, "bad blob", str(exc))


async def _object_store(request: Request, exc: S3Error) -> JSONResponse:
    log.error("object store failed on %s %s: %s", request.method, request.url.path, exc)
    detail = f"{exc}; nothing was stored, try again later"
    if request.url.path.startswith("/v2/"):
        return registry_response(RegistryError(503, "UNAVAILABLE", detail))
    return error_response(request, 503, "storage unavailable", detail)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    text = {404: "not found", 405: "method not allowed", 413: "payload too large"}.get(
        exc.status_code, "error")
    return error_response(request, exc.status_code, text, str(exc.detail))


def _disk_full(exc: Exception) -> bool:
    """A write the hub's disk had no room for: ENOSPC, or the database's own word for it
    (SQLite's; PostgreSQL's "could not extend file ... No space left on device")."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return isinstance(exc, errors.ANY) and ("disk is full" in str(exc)
                                            or "No space left on device" in str(exc))


async def _storage(request: Request, exc: Exception) -> JSONResponse:
    """507 for a full disk, 500 (logged) for anything else."""
    if not _disk_full(exc):
        return await _unexpected(request, exc)
    # Not a bug, and the client can do nothing but wait: say so, log one line.
    log.error("disk full on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        request, 507, "insufficient storage",
        "the hub's disk is full, so nothing was stored; free space in its data directory"
        " and try again",
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, "internal error", "see the hub's log")


async def _out_of_range(request: Request, exc: OverflowError) -> JSONResponse:
    # A number past what the database stores; every route bounds its numbers, so this
    # is the net under one that was missed, not the way a range is checked.
    return error_response(request, 422, "invalid input", f"a number is out of range: {exc}")


class Unexpected:
    """Answers what no handler took (a bug) with one JSON line, logged once in full.

    Starlette's own last-resort handler answers too, but then re-raises, and the
    server closes the connection: a kept-alive client's next request would fail
    as well. This catches it first, so the connection stays."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting)
        except Exception as exc:
            request = Request(scope)
            if started:  # half an answer is out; nothing can be said any more
                log.error("error after answering %s %s", request.method, request.url.path,
                          exc_info=exc)
                return
            await (await _storage(request, exc))(scope, receive, send)


E = TypeVar("E", bound=Exception)


def add_handler(
    app: FastAPI, exc_type: type[E], handler: Callable[[Request, E], Awaitable[Response]]
) -> None:
    """app.add_exception_handler, typed: Starlette declares handlers as taking any
    Exception, though it calls each one only with instances of the type it was added for."""
    app.add_exception_handler(
        exc_type, cast(Callable[[Request, Exception], Awaitable[Response]], handler)
    )


def install(app: FastAPI) -> None:
    add_handler(app, RequestValidationError, _validation)
    add_handler(app, HubError, _hub_error)
    add_handler(app, InvalidName, _invalid)
    add_handler(app, BlobError, _blob)
    add_handler(app, S3Error, _object_store)
    add_handler(app, StarletteHTTPException, _http)
    add_handler(app, OSError, _storage)
    for kind in errors.UNAVAILABLE:
        add_handler(app, kind, _storage)
    add_handler(app, OverflowError, _out_of_range)
