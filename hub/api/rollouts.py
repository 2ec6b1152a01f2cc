"""REST endpoints for rollouts: create, list, show, pause, resume, abort, roll back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from hub import rollouts
from hub.api import auth
from hub.api.state import hub_state
from hub.tokens import Principal

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=64)
    version: int | str
    target: dict[str, str] = Field(description="tag selector; every key=value must match")
    deployment: str | None = Field(None, max_length=64)
    waves: str = Field("100%", max_length=200, description="cumulative: 5%,25%,100% or 10,100,all")
    max_failures: str = Field("0", max_length=10, description="5% of the target, or a count")
    soak: str = Field("0s", max_length=10)
    device_timeout: str = Field("15m", max_length=10)
    auto_rollback: bool = False
    traffic: int | None = Field(None, ge=1, le=99, description="A/B: the new version's share")
    shadow: bool = False
    priority: int = 0
    prefer: list[str] = []
    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_latency_ratio: float = Field(3.0, gt=1)


def _engine_poke(request: Request) -> None:
    engine = getattr(hub_state(request), "rollouts", None)
    if engine is not None:
        engine.poke()


@router.post("/rollouts", status_code=201, summary="Start a rollout")
def create(body: RolloutRequest, request: Request, principal: Principal = auth.operator) -> dict:
    request.state.audit = ("rollout.create", f"{body.model}:{body.version}")
    spec = rollouts.RolloutSpec(**{**body.model_dump(), "prefer": tuple(body.prefer)})
    record = rollouts.create(hub_state(request).db, spec, created_by=principal.name)
    request.state.audit = ("rollout.create", record["id"])
    _engine_poke(request)
    return record


@router.get("/rollouts", summary="List rollouts, newest first")
def list_(request: Request, state: str | None = None,
          principal: Principal = auth.viewer) -> list[dict[str, Any]]:
    return rollouts.list_rollouts(hub_state(request).db, state=state)


@router.get("/rollouts/{rollout_id}", summary="One rollout: waves, progress, failed devices")
def show(rollout_id: str, request: Request,
         devices: bool = Query(False, description="also list every device with its wave and state"),
         principal: Principal = auth.viewer) -> dict:
    return rollouts.show(hub_state(request).db, rollout_id, devices=devices)


@router.post("/rollouts/{rollout_id}/{action}", summary="pause, resume, abort or rollback")
async def act(rollout_id: str, action: str, request: Request,
              principal: Principal = auth.operator) -> dict:
    state = hub_state(request)
    request.state.audit = (f"rollout.{action}", rollout_id)
    actions = {
        "pause": lambda: rollouts.pause(state.db, rollout_id, actor=principal.name),
        "resume": lambda: rollouts.resume(state.db, rollout_id, actor=principal.name),
        "abort": lambda: rollouts.abort(state.db, rollout_id, actor=principal.name),
        "rollback": lambda: rollouts.roll_back(state.db, rollout_id, actor=principal.name,
                                               notify=state.fleet.notify),
    }
    if action not in actions:
        raise rollouts.InvalidInput(f"unknown action {action!r}; use one of {', '.join(actions)}")
    record = await run_in_threadpool(actions[action])
    _engine_poke(request)
    return record
