"""The scoring API's key: `Authorization: Bearer KEY` or `X-API-Key: KEY`.

One key per server, given by the agent at start. Health endpoints stay open
so liveness and readiness probes (the agent, a kubelet, a load balancer)
need no secret; they reveal nothing about the models.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping

from agent.serving.errors import Unauthorized


def key_check(api_key: str | None) -> Callable[[Mapping[str, str]], None]:
    """A check of a request's headers (lower-case names) that raises Unauthorized
    unless they carry API_KEY; None: no key needed, everything passes."""
    expected = None if api_key is None else api_key.encode()

    def check(headers: Mapping[str, str]) -> None:
        if expected is None:
            return
        given = headers.get("x-api-key")
        if given is None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        if not given:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
        if not hmac.compare_digest(given.encode(), expected):
            raise Unauthorized("invalid API key")

    return check
