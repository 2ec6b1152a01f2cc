"""REST endpoints for commands to one device: ask (operator), follow (viewer), answer (the
device itself, with its own token). See hub/commands.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from contract import names, protocol
from contract.protocol import CommandState, ProfileArgs
from hub import commands, validation
from hub.api import auth
from hub.api.state import hub_state
from hub.broker_logins import BrokerUnavailable
from hub.errors import Forbidden
from hub.tokens import Principal
from hub.validation import InvalidInput

router = APIRouter(prefix="/api/v1", tags=["devices"])
_MAX_SECONDS = int(protocol.MAX_COMMAND_VALIDITY.total_seconds())


class ProfileCommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["profile"] = "profile"
    model: str = Field(max_length=names.MODEL_NAME.max_len)
    version: int = Field(ge=1, le=validation.MAX_VERSION)
    variant: str = Field(names.DEFAULT_VARIANT, max_length=names.VARIANT.max_len)
    max_batch: int = Field(8, ge=1, le=protocol.MAX_PROFILE_BATCH)
    iterations: int = Field(50, ge=1, le=protocol.MAX_PROFILE_ITERATIONS)
    expires_in: int = Field(int(commands.DEFAULT_VALIDITY.total_seconds()), ge=1,
                            le=_MAX_SECONDS, description="seconds the device has to answer")


@router.post("/devices/{device_id}/commands", status_code=201,
             summary="Ask an online device to profile a model version (one at a time)")
def send_command(device_id: str, body: ProfileCommandRequest, request: Request,
                 principal: Principal = auth.operator) -> dict[str, Any]:
    state = hub_state(request)
    request.state.audit = ("device.command", device_id)
    try:
        args = ProfileArgs(model=names.model_name(body.model), version=body.version,
                           variant=names.variant(body.variant), max_batch=body.max_batch,
                           iterations=body.iterations)
    except names.InvalidName as exc:
        raise InvalidInput(str(exc)) from None
    record, command = commands.create_profile(
        state.db, device_id, args, validity=timedelta(seconds=body.expires_in),
        actor=principal.name)
    request.state.audit_detail = f"{command.id}: profile {args.model}:{args.version} " \
        f"({args.variant})"
    if state.fleet is None:
        commands.fail(state.db, device_id, command.id, "the hub has no broker link")
        raise BrokerUnavailable("the hub has no broker link; nothing was sent")
    try:
        state.fleet.send_command(device_id, state.keys.sign_command(command))
    except Exception as exc:  # the session's: a broker away, or no PUBACK in time
        commands.fail(state.db, device_id, command.id, f"not delivered: {exc}")
        raise BrokerUnavailable(f"the broker did not take the command: {exc}") from None
    return record


@router.get("/devices/{device_id}/commands/{command_id}", summary="A command and its outcome")
def show_command(device_id: str, command_id: str, request: Request,
                 principal: Principal = auth.viewer) -> dict[str, Any]:
    return commands.get(hub_state(request).db, device_id, command_id)


@router.post("/devices/{device_id}/commands/{command_id}/result",
             summary="A device answers one of its commands (its own device token)")
def command_result(device_id: str, command_id: str, body: dict[str, Any], request: Request,
                   principal: Principal = auth.device) -> dict[str, Any]:
    if principal.name != device_id:
        raise Forbidden(f"a device answers its own commands, not {device_id!r}'s")
    request.state.audit = ("device.command_result", f"{device_id}/{command_id}")
    try:
        result = protocol.read_command_result(body, device_id=device_id)
    except protocol.ProtocolError as exc:
        raise InvalidInput(str(exc)) from None
    if result.command_id != command_id:
        raise InvalidInput(f"command_id {result.command_id!r} is not {command_id!r}")
    record = commands.record_result(hub_state(request).db, result)
    if result.state is CommandState.DONE:  # audited as model.profile: a profile.done event
        request.state.audit = ("model.profile", f"{record['model']}:{record['version']}")
        runtimes = sorted({f"{r['runtime']}:{r['device']}" for r in result.rows})
        request.state.audit_detail = (f"{len(result.rows)} row(s) on device {device_id}: "
                                      f"{', '.join(runtimes)}")
    else:
        request.state.audit_detail = str(result.state) + (
            f": {result.error}" if result.error else "")
    return record
