"""REST endpoints for packages: list, show, and signing with the hub's key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from hub import packages
from hub.api import auth
from hub.api.state import hub_state
from hub.tokens import Principal

router = APIRouter(prefix="/api/v1", tags=["packages"])


@router.get("/packages", summary="List packages (model versions built into OCI packages)")
def list_packages(
    request: Request,
    model: str | None = Query(None, description="only this model's packages"),
    principal: Principal = auth.viewer,
) -> list[dict[str, Any]]:
    state = hub_state(request)
    return packages.list_packages(state.db, state.blobs, model=model)


@router.get("/packages/{model}/{version}", summary="Show one package: platforms and layers")
def show_package(
    model: str, version: str, request: Request, principal: Principal = auth.viewer
) -> dict[str, Any]:
    state = hub_state(request)
    return packages.show_package(state.db, state.blobs, model, version)


@router.post("/packages/{model}/{version}/sign", summary="Sign a pushed package with the hub's key")
async def sign_package(
    model: str, version: str, request: Request, principal: Principal = auth.operator
) -> dict[str, Any]:
    state = hub_state(request)
    request.state.audit = ("package.sign", f"{model}:{version}")
    reference = f"{request.url.netloc}/{packages.repository(model)}"
    signature = await run_in_threadpool(
        lambda: packages.sign(state.db, state.blobs, state.signing_key, model, version,
                              reference=reference)
    )
    return {"model": model, "version": version, "signature": signature, "reference": reference}


@router.get("/signing-key", summary="The hub's public signing key (PEM)")
def signing_key(request: Request, principal: Principal = auth.viewer) -> dict[str, str]:
    return {"public_key": hub_state(request).signing_public_key}
