"""REST endpoints for rollouts: create, list, show, pause, resume, abort, roll back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ConfigDict, Field

from hub.api import auth
from hub.api.deployments import SettingsRequest
from hub.api.state import hub_state
from hub.rollouts import commands, reads
from hub.rollouts.spec import OPTIONS
from hub.rollouts.states import RolloutState
from hub.tokens import Principal
from hub.validation import InvalidInput

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


def _option(name: str, **constraints: Any) -> Any:
    return Field(OPTIONS[name].default, description=OPTIONS[name].help, **constraints)


class RolloutRequest(SettingsRequest):
    # Ranges are checked once, in hub/rollouts/spec.py, with one line naming the option.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(max_length=64)
    version: int | str = Field(description="a version number or 'latest'")
    variant: str = _option("variant", max_length=64)
    target: dict[str, str] = Field(description="tag selector; every key=value must match")
    deployment: str | None = Field(None, max_length=64,
                                   description="deployment name on the devices; the model's")
    waves: str = _option("waves", max_length=200)
    max_failures: str = _option("max_failures", max_length=20)
    soak: str = _option("soak", max_length=20)
    device_timeout: str = _option("device_timeout", max_length=20)
    auto_rollback: bool = _option("auto_rollback")
    traffic: int | None = _option("traffic")
    shadow: bool = _option("shadow")
    priority: int = _option("priority")
    prefer: list[str] = Field(default_factory=list, description=OPTIONS["prefer"].help,
                              max_length=32)
    max_error_rate: float = _option("max_error_rate")
    max_latency_ratio: float = _option("max_latency_ratio")
    max_latency_ms: float | None = _option("max_latency_ms")


def _engine_poke(request: Request) -> None:
    engine = hub_state(request).rollouts
    if engine is not None:
        engine.poke()


@router.post("/rollouts", status_code=201, summary="Start a rollout")
def create(body: RolloutRequest, request: Request, principal: Principal = auth.operator) -> dict:
    request.state.audit = ("rollout.create", f"{body.model}:{body.version}")
    state = hub_state(request)
    record = commands.create(state.db, state.blobs, created_by=principal.name,
                             **body.model_dump())
    request.state.audit = ("rollout.create", record["id"])
    _engine_poke(request)
    return record


@router.get("/rollouts", summary="List rollouts, newest first")
def list_(request: Request,
          state: str | None = Query(None, description="only rollouts in this state"),
          principal: Principal = auth.viewer) -> list[dict[str, Any]]:
    if state and state not in set(RolloutState):
        raise InvalidInput(f"unknown state {state[:40]!r}; use one of "
                           f"{', '.join(s.value for s in RolloutState)}")
    return reads.list_rollouts(hub_state(request).db,
                               state=RolloutState(state) if state else None)


@router.get("/rollouts/{rollout_id}", summary="One rollout: waves, progress, soak, failed devices")
def show(rollout_id: str, request: Request,
         devices: bool = Query(False, description="also list every device with its wave and state"),
         principal: Principal = auth.viewer) -> dict:
    return reads.show(hub_state(request).db, rollout_id, devices=devices)


@router.post("/rollouts/{rollout_id}/{action}", summary="pause, resume, abort or rollback")
async def act(rollout_id: str, action: str, request: Request,
              principal: Principal = auth.operator) -> dict:
    state = hub_state(request)
    actions = {
        "pause": lambda: commands.pause(state.db, rollout_id, actor=principal.name),
        "resume": lambda: commands.resume(state.db, rollout_id, actor=principal.name),
        "abort": lambda: commands.abort(state.db, rollout_id, actor=principal.name),
        "rollback": lambda: commands.roll_back(state.db, rollout_id, actor=principal.name,
                                               notify=_notify(request)),
    }
    if action not in actions:  # audited under a fixed name: the path is anyone's text
        request.state.audit = ("rollout.unknown-action", rollout_id)
        raise InvalidInput(f"unknown action {action[:40]!r}; use one of {', '.join(actions)}")
    request.state.audit = (f"rollout.{action}", rollout_id)
    record = await run_in_threadpool(actions[action])
    _engine_poke(request)
    return record


def _notify(request: Request) -> commands.Notify:
    fleet = hub_state(request).fleet
    if fleet is None:  # the link not started yet: its catch-up at start publishes these
        return lambda devices: None
    return fleet.notify
