"""REST endpoints for what devices should run (desired) next to what they report.

A change commits to the database, hands the device to the publisher and
answers; the signed desired state reaches the broker moments later, or once
the broker is reachable again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from contract.names import DEFAULT_VARIANT
from hub import deployments, devices, validation
from hub.api import auth
from hub.api.state import HubState, hub_state
from hub.tokens import Principal

router = APIRouter(prefix="/api/v1", tags=["deployments"])
VARIANT_HELP = "the version's package variant, as named at build"
Version = Annotated[int, Field(ge=1, le=validation.MAX_VERSION)] | Literal["latest"]


class CandidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Version
    variant: str = Field(DEFAULT_VARIANT, max_length=64, description=VARIANT_HELP)
    traffic: int = Field(ge=1, le=100, description="split: percent of requests it answers "
                         "(1-99); shadow: percent of requests copied to it (1-100)")
    shadow: bool = False


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=64)
    version: Version
    variant: str = Field(DEFAULT_VARIANT, max_length=64, description=VARIANT_HELP)
    name: str | None = Field(None, max_length=64, description="deployment name; default: "
                             "the model's name")
    prefer: list[str] = Field([], max_length=32, description="runtime:DEVICE choices, best first")
    candidate: CandidateRequest | None = None


def _publish(state: HubState, device_id: str) -> None:
    if state.fleet is not None:  # else the next start catches up
        state.fleet.notify([device_id])


@router.post("/devices/{device_id}/deployments", status_code=201,
             summary="Deploy a model version to a device (creates or replaces the deployment)")
async def deploy(
    device_id: str, body: DeployRequest, request: Request, principal: Principal = auth.operator
) -> dict[str, Any]:
    state = hub_state(request)
    name = body.name or body.model
    request.state.audit = ("device.deploy", f"{device_id}/{name}")
    candidate = None if body.candidate is None else deployments.Candidate(
        body.candidate.version, body.candidate.traffic, body.candidate.shadow,
        body.candidate.variant)
    generation = await run_in_threadpool(
        lambda: deployments.assign(
            state.db, device_id, name=name, model=body.model, version=body.version,
            variant=body.variant, prefer=body.prefer, candidate=candidate)
    )
    _publish(state, device_id)
    desired = await run_in_threadpool(deployments.for_device, state.db, device_id)
    return {"device_id": device_id, "generation": generation,
            "deployment": next(d for d in desired if d["name"] == name)}


@router.get("/devices/{device_id}/deployments",
            summary="A device's deployments: desired, next to what it reports")
def list_deployments(
    device_id: str, request: Request, principal: Principal = auth.viewer
) -> dict[str, Any]:
    db = hub_state(request).db
    device = devices.get_device(db, device_id)
    return {
        "device_id": device_id,
        "status": device["status"],
        "desired_generation": device["desired_generation"],
        "published_generation": device["published_generation"],
        "applied_generation": device["applied_generation"],
        "desired": deployments.for_device(db, device_id),
        "reported": deployments.reported_for_device(db, device_id),
    }


@router.delete("/devices/{device_id}/deployments/{name}",
               summary="Remove a deployment from a device")
async def undeploy(
    device_id: str, name: str, request: Request, principal: Principal = auth.operator
) -> dict[str, Any]:
    state = hub_state(request)
    request.state.audit = ("device.undeploy", f"{device_id}/{name}")
    generation = await run_in_threadpool(deployments.unassign, state.db, device_id, name)
    _publish(state, device_id)
    return {"device_id": device_id, "name": name, "generation": generation}
