"""Bearer-token authentication and role checks as FastAPI dependencies."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from hub import tokens
from hub.api.state import HubState, hub_state
from hub.errors import Unauthorized
from hub.storage.db import Database
from hub.tokens import Principal


async def authenticate(request: Request, db: Database) -> Principal:
    """The principal of REQUEST's bearer token; Unauthorized without a valid one."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "missing API token: send 'Authorization: Bearer <token>' "
            "(the CLI reads --token, EDGEFLEET_TOKEN or `edgefleet login`)"
        )
    return await run_in_threadpool(tokens.authenticate, db, secret.strip())


async def current_principal(request: Request, state: HubState = Depends(hub_state)) -> Principal:
    # The request gate (hub/api/limits.py) authenticated requests with a body already.
    principal = getattr(request.state, "principal", None)
    if principal is None:
        principal = await authenticate(request, state.db)
        request.state.principal = principal
    return principal


def require(role: str) -> Callable[..., object]:
    async def check(principal: Principal = Depends(current_principal)) -> Principal:
        principal.require(role)
        return principal

    return check


viewer = Depends(require("viewer"))
device = Depends(require(tokens.DEVICE_ROLE))
operator = Depends(require("operator"))
admin = Depends(require("admin"))
