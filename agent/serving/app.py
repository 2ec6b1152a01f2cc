"""The Open Inference Protocol (KServe V2) REST API and /metrics.

Bodies are read and written as bytes, not through pydantic models: the
binary tensor extension puts raw tensor data after the JSON, and the
checks that matter are against each model's signature (see tensors.py).
Everything but the health endpoints needs the API key.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from agent.serving import codec
from agent.serving.auth import key_check
from agent.serving.errors import BadRequest, install_handlers
from agent.serving.metrics import CONTENT_TYPE
from agent.serving.scoring import Scorer
from agent.serving.table import Deployment, ModelVersion

EXTENSIONS = ["binary_tensor_data"]


def _server_version() -> str:
    try:
        return package_version("edgefleet")
    except PackageNotFoundError:
        return "unknown"


def _metadata(deployment: Deployment, version: ModelVersion) -> dict[str, Any]:
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


def create_app(scorer: Scorer, *, api_key: str | None) -> FastAPI:
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
    api = APIRouter(dependencies=[Depends(check_key)])
    server_metadata = {"name": "edgefleet", "version": _server_version(), "extensions": EXTENSIONS}

    @api.get("/v2")
    async def metadata() -> dict[str, Any]:
        return server_metadata

    # Each handler serves both /v2/models/{name}/... and .../versions/{version}/...;
    # the path parameters are read from the request so neither becomes a query parameter.
    async def model_metadata(request: Request) -> dict[str, Any]:
        name, version = _model_path(request)
        deployment = table.get(name)
        chosen = deployment.primary if version is None else deployment.find(version)
        return _metadata(deployment, chosen)

    async def model_ready(request: Request) -> dict[str, Any]:
        name, version = _model_path(request)
        deployment = table.get(name)
        if version is not None:
            deployment.find(version)
        # A name is only routed once its versions are loaded, so found means ready.
        return {"name": name, "ready": True}

    async def infer(request: Request) -> Response:
        await check_key(request)
        name, version = _model_path(request)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise BadRequest(f"Content-Encoding {encoding} is not supported; send the body uncompressed")
        body = await request.body()
        content, headers = await scorer.infer(
            name, version, body, request.headers.get(codec.HEADER_LENGTH)
        )
        return Response(content, headers=headers)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        api.add_api_route(prefix, model_metadata, methods=["GET"])
        api.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        # A plain Starlette route, not a FastAPI one: the hot path skips dependency
        # resolution and response handling it does not need (about 0.1 ms a request).
        app.add_route(prefix + "/infer", infer, methods=["POST"])

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(scorer.telemetry.render(), media_type=CONTENT_TYPE)

    app.include_router(health)
    app.include_router(api)
    return app
