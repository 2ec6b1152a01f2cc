"""REST endpoints for what devices should run (desired) next to what they report.

A change commits to the database, hands the device to the publisher and
answers; the signed desired state reaches the broker moments later, or once
the broker is reachable again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from contract.names import DEFAULT_VARIANT
from contract.settings import MAX_ACCELERATORS, MAX_BATCH_DELAY_MS, MAX_BATCH_SIZE, Settings
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


class ResourcesRequest(BaseModel):
    """Left out: the agent's default (its --container-cpus, --cpu, ...). Ranges are checked
    in contract/settings.py, with one line naming the field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    cpus: StrictStr | StrictInt | StrictFloat | None = Field(
        None, description="CPU cores, fractional (0.5, 2) or millicores (500m); a limit")
    memory: StrictStr | StrictInt | None = Field(
        None, description="memory limit in bytes, or with a unit: 512Mi, 2Gi, 500M")
    accelerators: dict[str, StrictInt] = Field(
        {}, max_length=MAX_ACCELERATORS,
        description="extended resources and counts, e.g. {\"nvidia.com/gpu\": 1}")


class BatchingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_size: StrictInt = Field(description="rows per runtime call, 2-"
                                      f"{MAX_BATCH_SIZE}; 1 turns batching off")
    max_delay_ms: StrictInt = Field(0, description="how long a batch's first request waits "
                                    f"for more, 0-{MAX_BATCH_DELAY_MS}")


BATCHING_HELP = ("adaptive batching for models with a free batch dimension; 'off' turns it off "
                 "whatever the package says; left out: the package's default (else off)")


class SettingsRequest(BaseModel):
    """The settings fields a deployment and a rollout share."""

    resources: ResourcesRequest | None = None
    batching: BatchingRequest | Literal["off"] | None = Field(None, description=BATCHING_HELP)

    def settings(self) -> Settings:
        return deployments.settings_from(
            None if self.resources is None else self.resources.model_dump(exclude_none=True),
            self.batching.model_dump() if isinstance(self.batching, BatchingRequest)
            else self.batching)


class DeployRequest(SettingsRequest):
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
    chosen = body.settings()
    generation = await run_in_threadpool(
        lambda: deployments.assign(
            state.db, device_id, name=name, model=body.model, version=body.version,
            variant=body.variant, prefer=body.prefer, candidate=candidate, settings=chosen)
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
