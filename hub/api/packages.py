"""REST endpoints for packages: list, show, check a build, and signing with the hub's key."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from contract.names import DEFAULT_VARIANT, InvalidName
from contract.names import variant as check_variant
from hub import packages
from hub.api import auth
from hub.api.state import hub_state
from hub.tokens import Principal
from hub.validation import InvalidInput

router = APIRouter(prefix="/api/v1", tags=["packages"])


@router.get("/packages", summary="List packages (model versions built into OCI packages)")
def list_packages(
    request: Request,
    model: str | None = Query(None, description="only this model's packages"),
    principal: Principal = auth.viewer,
) -> list[dict[str, Any]]:
    state = hub_state(request)
    return packages.list_packages(state.db, state.blobs, model=model)


def _variant(text: str) -> str:
    try:
        return check_variant(text)
    except InvalidName as exc:
        raise InvalidInput(str(exc)) from None


VARIANT = Query(DEFAULT_VARIANT, max_length=64,
                description="the package variant of the version (its runtime, optimisation, "
                "platforms), as named at build")


@router.get("/packages/{model}/{version}",
            summary="Show one package: platforms, layers, build inputs, what uses it")
def show_package(
    model: str, version: str, request: Request, variant: str = VARIANT,
    principal: Principal = auth.viewer,
) -> dict[str, Any]:
    state = hub_state(request)
    return packages.show_package(state.db, state.blobs, model, version, _variant(variant))


@router.get("/packages/{model}/{version}/check",
            summary="May a build with these inputs go under this variant? 409 if it is taken")
def check_build(
    model: str, version: str, request: Request, variant: str = VARIANT,
    build: str = Query(max_length=10_000, description="the build inputs, a JSON object"),
    principal: Principal = auth.viewer,
) -> dict[str, Any]:
    try:
        inputs = json.loads(build)
    except ValueError:
        inputs = None
    if not isinstance(inputs, dict):
        raise InvalidInput("build must be a JSON object of the build inputs")
    state = hub_state(request)
    return packages.check_build(state.db, state.blobs, model, version, _variant(variant), inputs)


@router.post("/packages/{model}/{version}/sign", summary="Sign a pushed package with the hub's key")
async def sign_package(
    model: str, version: str, request: Request, variant: str = VARIANT,
    principal: Principal = auth.operator,
) -> dict[str, Any]:
    state = hub_state(request)
    chosen = _variant(variant)
    request.state.audit = ("package.sign", f"{model}:{version}"
                           + ("" if chosen == DEFAULT_VARIANT else f"/{chosen}"))
    reference = f"{request.url.netloc}/{packages.repository(model)}"
    signature = await run_in_threadpool(
        lambda: packages.sign(state.db, state.blobs, state.signing_key, model, version,
                              reference=reference, variant=chosen)
    )
    return {"model": model, "version": version, "variant": chosen, "signature": signature,
            "reference": reference}


@router.get("/signing-key", summary="The hub's public signing key (PEM)")
def signing_key(request: Request, principal: Principal = auth.viewer) -> dict[str, str]:
    return {"public_key": hub_state(request).signing_public_key}
