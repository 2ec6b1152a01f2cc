"""The ways a request can fail, each with its HTTP status.

Every error leaves the server (both the scoring and the control API) as
the Open Inference Protocol error body {"error": "..."}; the message says
exactly what was wrong.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("edgefleet.serving")


class ServingError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ServingError):
    """The client sent something the model cannot take; nothing was run."""

    status = 400


class Unauthorized(ServingError):
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ServingError):
    status = 404


class MethodNotAllowed(ServingError):
    status = 405

    def __init__(self, method: str, path: str, allowed: str) -> None:
        super().__init__(f"Method Not Allowed: {method} {path}")
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class PayloadTooLarge(ServingError):
    """The body is larger than the server reads; refused before it is read, or where it
    passed the limit."""

    status = 413


class Unprocessable(ServingError):
    """A well-formed control request that failed: a model did not load or its self-test failed."""

    status = 422


class ModelFailed(ServingError):
    """The input was valid but the runtime failed on it; the server's side of the contract."""

    status = 500


class Overloaded(ServingError):
    """All inference slots are busy and the wait queue is full."""

    status = 503

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def error_response(exc: ServingError) -> JSONResponse:
    """EXC as the Open Inference Protocol's error body, {"error": "..."}."""
    return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers())


def internal_error_response(method: str, path: str) -> JSONResponse:
    """The answer to a bug: logged here in full, the client only told where to look."""
    log.exception("unexpected error on %s %s", method, path)
    return JSONResponse({"error": "internal error; see the server's log"}, 500)


def install_handlers(app: FastAPI) -> None:
    """Answer every error as {"error": "..."}, the Open Inference Protocol's error body."""

    async def serving(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServingError)
        return error_response(exc)

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()[:10]
        ]
        return JSONResponse({"error": "; ".join(problems)}, 400)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request.method, request.url.path)

    app.add_exception_handler(ServingError, serving)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, unexpected)
