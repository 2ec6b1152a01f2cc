"""REST endpoints of data drift (hub/drift.py): a version's baseline and its drift."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from contract.sketch import MAX_COUNT, MAX_EDGES, MAX_FEATURES
from contract.tensors import Signature
from hub import drift, registry, validation
from hub.api import auth
from hub.api.state import hub_state
from hub.tokens import Principal

router = APIRouter(prefix="/api/v1", tags=["drift"])
MAX_WINDOW: Final = timedelta(days=400)  # the longest telemetry is kept (hour rollups)
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class BaselineFeature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    side: Literal["input", "output"]
    tensor: str = Field(max_length=64)
    column: int = Field(ge=0, le=9999)
    edges: list[float] = Field(min_length=1, max_length=MAX_EDGES,
                               description="bin edges, strictly increasing")
    counts: list[Count] = Field(min_length=2, max_length=MAX_EDGES + 1,
                                description="the sample's counts: one bin more than edges")
    count: Count
    mean: float
    std: float
    min: float
    max: float


class Baseline(BaseModel):
    """Per-feature summary of a sample of the version's training inputs (and predictions),
    as `edgefleet model baseline` computes it."""

    model_config = ConfigDict(extra="forbid")
    features: list[BaselineFeature] = Field(min_length=1, max_length=MAX_FEATURES)


def _version(request: Request, name: str, version: str) -> dict[str, Any]:
    return registry.get_version(hub_state(request).db, name, validation.version(version))


@router.put("/models/{name}/versions/{version}/baseline", status_code=201,
            summary="Give a version its drift baseline (once, before it is deployed)")
def put_baseline(name: str, version: str, body: Baseline, request: Request,
                 principal: Principal = auth.operator) -> dict[str, Any]:
    state = hub_state(request)
    request.state.audit = ("model.baseline", f"{name}:{version}")
    record = _version(request, name, version)
    signature = record["signature"]
    baseline = drift.check_baseline(
        body.model_dump(), Signature.from_dict(signature) if signature else None)
    with state.db.transaction() as conn:
        drift.set_baseline(conn, name, record["version"], baseline, principal.name)
    request.state.audit = ("model.baseline", f"{name}:{record['version']}")
    return baseline


@router.get("/models/{name}/versions/{version}/baseline", summary="A version's drift baseline")
def get_baseline(name: str, version: str, request: Request,
                 principal: Principal = auth.viewer) -> dict[str, Any]:
    record = _version(request, name, version)
    return drift.get_baseline(hub_state(request).db, name, record["version"])


@router.get("/models/{name}/versions/{version}/drift",
            summary="Drift per feature, computed now from the devices' sketches")
async def get_drift(
    name: str, version: str, request: Request,
    target: list[str] = Query([], description="key=value device tag, may repeat "
                              "(all must match); none: every device"),
    window: str = Query("24h", description="how far back: 30m, 6h, 7d"),
    principal: Principal = auth.viewer,
) -> dict[str, Any]:
    selectors = [validation.parse_tag_selector(t) for t in target]
    seconds = validation.duration(window, "window")
    if seconds > MAX_WINDOW.total_seconds():
        raise validation.InvalidInput(f"window {window!r} is longer than {MAX_WINDOW.days} days")
    record = await run_in_threadpool(_version, request, name, version)
    return await run_in_threadpool(drift.compute, hub_state(request).db, name, record["version"],
                                   target=selectors, window=timedelta(seconds=seconds),
                                   actor=principal.name)
