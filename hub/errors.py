"""Domain errors of the hub; the REST layer maps each to one HTTP status."""

from __future__ import annotations

from hub.validation import InvalidInput


class HubError(Exception):
    status = 500
    error = "internal error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(HubError):
    status = 404
    error = "not found"


class Conflict(HubError):
    status = 409
    error = "conflict"


class Unauthorized(HubError):
    status = 401
    error = "unauthorized"


class Forbidden(HubError):
    status = 403
    error = "forbidden"


class BadRequest(HubError):
    status = 400
    error = "bad request"


class Unprocessable(HubError):
    status = 422
    error = "invalid input"


__all__ = [
    "HubError", "NotFound", "Conflict", "Unauthorized", "Forbidden", "BadRequest",
    "Unprocessable", "InvalidInput",
]
