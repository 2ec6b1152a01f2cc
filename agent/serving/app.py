"""The Open Inference Protocol (KServe V2) REST API, /metrics and /metrics/sketches.

Bodies are read and written as bytes, not through pydantic models: the
binary tensor extension puts raw tensor data after the JSON, and the
checks that matter are against each model's signature (see tensors.py).
Everything but the health endpoints needs the API key.

Inference requests skip FastAPI: ScoringAPI answers them itself and hands
everything else on. FastAPI's middleware, routing and dependency layers
cost ~0.04 ms a request, a tenth of the whole 0.5 ms budget for a tiny
model, and the infer endpoint uses none of what they offer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from agent import options as o
from agent.serving import codec
from agent.serving.auth import key_check
from agent.serving.errors import (
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    ServingError,
    error_response,
    install_handlers,
    internal_error_response,
)
from agent.serving.metrics import CONTENT_TYPE
from agent.serving.scoring import Scorer
from agent.serving.table import Deployment, ModelVersion

EXTENSIONS = ["binary_tensor_data"]


def server_version() -> str:
    try:
        return package_version("edgefleet")
    except PackageNotFoundError:
        return "unknown"


def metadata_of(deployment: Deployment, version: ModelVersion) -> dict[str, Any]:
    signature = version.model.signature
    return {
        "name": deployment.name,
        "versions": [v.version for _, v in deployment.roles()],
        "platform": f"{version.model.runtime}_{version.spec.framework}",
        "inputs": [t.to_dict() for t in signature.inputs],
        "outputs": [t.to_dict() for t in signature.outputs],
    }


def _model_path(request: Request) -> tuple[str, str | None]:
    return request.path_params["name"], request.path_params.get("version")


SKETCHES_PATH = "/metrics/sketches"   # the drift counts as JSON (Telemetry.sketch_counts)
_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class ScoringAPI:
    """The scoring API as an ASGI app: .../infer answered here, the rest by REST (FastAPI)."""

    def __init__(
        self, scorer: Scorer, rest: FastAPI, check_key: Callable[[Mapping[str, str]], None],
        *, max_body_bytes: int,
    ) -> None:
        self.scorer = scorer
        self.rest = rest
        self._check_key = check_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if found is None:
            await self.rest(scope, receive, send)
            return
        try:
            content, headers = await self._infer(scope, receive, found["name"],
                                                 found["version"])
        except ServingError as e:
            await error_response(e)(scope, receive, send)
            return
        except ClientDisconnect:
            return  # nobody left to answer
        except Exception:
            await internal_error_response(scope["method"], scope["path"])(scope, receive, send)
            return
        # Sent as raw ASGI messages: a starlette Response would build the same two.
        raw = [(b"content-length", str(len(content)).encode())]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": content})

    async def _infer(self, scope: Scope, receive: Receive, name: str,
                     version: str | None) -> tuple[bytes, dict[str, str]]:
        if scope["method"] != "POST":
            raise MethodNotAllowed(scope["method"], scope["path"], allowed="POST")
        headers = _headers(scope)
        self._check_key(headers)
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise BadRequest(
                f"Content-Encoding {encoding} is not supported; send the body uncompressed"
            )
        limit = self.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(_too_large(limit))
        return await self.scorer.infer(
            name, version, lambda: _read_body(receive, limit),
            headers.get(codec.HEADER_LENGTH.lower()),
            int(declared) if declared.isascii() and declared.isdigit() else 0,
        )


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (ASGI gives them so); the first of repeats."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def _too_large(limit: int) -> str:
    return (f"the request body is larger than this server reads ({limit} bytes); send"
            " smaller batches, or start it with a larger --max-body-bytes")


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes LIMIT rather than once it is all in."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(_too_large(limit))
        if not message.get("more_body", False):
            return bytes(body)


def create_app(scorer: Scorer, *, api_key: str | None,
               max_body_bytes: int = o.MAX_BODY_BYTES.default) -> ScoringAPI:
    table = scorer.table
    app = FastAPI(title="edgefleet serve", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)

    health = APIRouter()

    @health.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @health.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        # Not ready while a model the agent asked for is still loading.
        return JSONResponse({"ready": table.ready}, 200 if table.ready else 503)

    check_key = key_check(api_key)

    async def key_dependency(request: Request) -> None:
        check_key(request.headers)

    api = APIRouter(dependencies=[Depends(key_dependency)])
    server_metadata = {"name": "edgefleet", "version": server_version(), "extensions": EXTENSIONS}

    @api.get("/v2")
    async def metadata() -> dict[str, Any]:
        return server_metadata

    # Each handler serves both /v2/models/{name}/... and .../versions/{version}/...;
    # the path parameters are read from the request so neither becomes a query parameter.
    async def model_metadata(request: Request) -> dict[str, Any]:
        name, version = _model_path(request)
        deployment = table.get(name)
        chosen = deployment.primary if version is None else deployment.find(version)
        return metadata_of(deployment, chosen)

    async def model_ready(request: Request) -> dict[str, Any]:
        name, version = _model_path(request)
        deployment = table.get(name)
        if version is not None:
            deployment.find(version)
        # A name is only routed once its versions are loaded, so found means ready.
        return {"name": name, "ready": True}

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        api.add_api_route(prefix, model_metadata, methods=["GET"])
        api.add_api_route(prefix + "/ready", model_ready, methods=["GET"])

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(scorer.telemetry.render(), media_type=CONTENT_TYPE)

    @api.get(SKETCHES_PATH)
    async def sketches() -> list[dict[str, Any]]:
        # Where no agent reads /control/stats (Kubernetes mode) the drift counts are read
        # here: JSON, since a feature's bins as Prometheus samples would be a line each.
        telemetry = scorer.telemetry
        await asyncio.to_thread(telemetry.settle_sketches)  # counted off the request path
        return telemetry.sketch_counts()

    app.include_router(health)
    app.include_router(api)
    return ScoringAPI(scorer, app, check_key, max_body_bytes=max_body_bytes)
