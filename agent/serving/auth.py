"""The scoring API's key: `Authorization: Bearer KEY` or `X-API-Key: KEY`.

One key per server, given by the agent at start. Health endpoints stay open
so liveness and readiness probes (the agent, a kubelet, a load balancer)
need no secret; they reveal nothing about the models.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from agent.serving.errors import Unauthorized


def key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that lets a request through only with API_KEY (None: no check)."""
    expected = None if api_key is None else api_key.encode()

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        if not given:
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        if not hmac.compare_digest(given.encode(), expected):
            raise Unauthorized("invalid API key")

    return check
