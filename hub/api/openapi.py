"""The OpenAPI document, made to say what the hub answers.

FastAPI declares one error per operation, a 422 whose `detail` is a list of
pydantic problems; the hub answers every error as `{"error", "detail"}`
with `detail` one line (hub/api/errors.py), and with more statuses. This
declares, per operation, the statuses it can answer from what the route is:

- 400 and 422: malformed input (a JSON body, a digest) and input that
  breaks a rule, on every operation that takes input;
- 401 and 403: every operation behind a token (the role check);
- 404: every operation with a path parameter or a filter naming something,
  and every change (its body names what it acts on);
- 409, 413 and 507: every change (conflicts, the body limit, a full disk);
- 503: the changes that need the broker's answer (enrollment and device deletion on the
  managed broker, a command to a device).

A test runs schemathesis against a real hub with this document
(tests/test_openapi_conformance.py), so a status a route answers and this
does not declare fails it.
"""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from hub.api import auth

ERROR: Final = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "the kind of error, e.g. 'not found'"},
        "detail": {"type": "string", "description": "one line: what was wrong and what to do"},
    },
    "additionalProperties": False,
}
DESCRIPTIONS: Final = {
    400: "Malformed request (JSON, upload, nesting deeper than 32 levels)",
    401: "Missing, unknown, expired or revoked token",
    403: "The token's role is too low",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body larger than the hub takes",
    422: "Input that breaks a rule; the detail names the field and the rule",
    503: "The broker did not take the change; nothing was changed",
    507: "The hub's disk is full; nothing was stored",
}
NEEDS_BROKER: Final = {("POST", "/api/v1/enroll"), ("DELETE", "/api/v1/devices/{device_id}"),
                       ("POST", "/api/v1/devices/{device_id}/commands")}
# Answers that are not JSON: files, and HEAD (no body at all).
BINARY: Final = {("GET", "/api/v1/models/{name}/versions/{version}/files/{path}")}


def _authenticated(dependant: Dependant) -> bool:
    return any(d.call is auth.current_principal or _authenticated(d)
               for d in dependant.dependencies)


def _statuses(route: RouteContext, method: str) -> set[int]:
    dependant = route.dependant
    takes_input = bool(dependant.path_params or dependant.query_params or dependant.body_params)
    statuses = {400, 422} if takes_input or method != "GET" else set()
    if _authenticated(dependant):
        statuses |= {401, 403}
    if route.path_format == "/api/v1/enroll":
        statuses.add(401)  # the enrollment token in the body
    if dependant.path_params or dependant.query_params:
        statuses.add(404)
    if method in {"POST", "PUT", "PATCH", "DELETE"}:
        statuses |= {400, 404, 409, 413, 507}  # 404: a body names what it acts on too
    if (method, route.path_format) in NEEDS_BROKER:
        statuses.add(503)
    return statuses


def _declare(operation: dict[str, Any], method: str, path: str, statuses: set[int]) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's pydantic list, which the hub never sends
    for status in sorted(statuses):
        if method == "HEAD":
            responses[str(status)] = {"description": DESCRIPTIONS[status]}
            continue
        responses[str(status)] = {
            "description": DESCRIPTIONS[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    for status, answer in responses.items():
        if not status.startswith("2"):
            continue
        if method == "HEAD" or status == "204":
            answer.pop("content", None)
        elif (method, path) in BINARY:
            answer["content"] = {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}


def install(app: FastAPI) -> None:
    """Make APP's /openapi.json the document above (built once, on first request)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas["Error"] = ERROR
            # FastAPI keeps included routers as such; this walks their routes as its own
            # document builder does.
            for route in iter_route_contexts(app.routes):
                path = route.path_format
                if not isinstance(route.original_route, APIRoute) or not route.include_in_schema \
                        or path is None:
                    continue
                for method in route.methods or ():
                    operation = schema["paths"][path][method.lower()]
                    _declare(operation, method, path, _statuses(route, method))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
