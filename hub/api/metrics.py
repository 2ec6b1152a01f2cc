"""The hub's metrics over HTTP: `GET /metrics` for any API token, the same text without
authentication on `--metrics-port` (`standalone`), and the middleware that counts and
times every request by its route template (hub/metrics.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.api import auth
from hub.api.state import HubState, hub_state
from hub.metrics import UNMATCHED, HubMetrics
from hub.prometheus import CONTENT_TYPE
from hub.tokens import Principal

router = APIRouter(tags=["admin"])


@router.get("/metrics", summary="The hub's own metrics in the Prometheus text format",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
def metrics(request: Request, principal: Principal = auth.viewer) -> Response:
    state = hub_state(request)
    return Response(state.metrics.render(state), media_type=CONTENT_TYPE)


def standalone(state: HubState) -> Starlette:
    """The app of the --metrics-port listener: /metrics and nothing else, no token."""

    async def scrape(request: Request) -> Response:
        return Response(await run_in_threadpool(state.metrics.render, state),
                        media_type=CONTENT_TYPE)

    return Starlette(routes=[Route("/metrics", scrape)])


def _route(scope: Scope) -> str:
    """The template of the route that took the request (`/api/v1/devices/{device_id}`)."""
    route = scope.get("route")
    if isinstance(route, Mount):
        return route.path + "/{path}"
    return getattr(route, "path", None) or UNMATCHED


class RequestMetrics:
    """ASGI middleware: each HTTP request counted by method, route and status, and its
    time to the response's first byte observed."""

    def __init__(self, app: ASGIApp, *, metrics: HubMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, elapsed = 500, None

        async def send_and_note(message: Message) -> None:
            nonlocal status, elapsed
            if message["type"] == "http.response.start":
                status, elapsed = message["status"], time.perf_counter() - started
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.request(scope["method"], _route(scope), status,
                                 time.perf_counter() - started if elapsed is None else elapsed)
