"""REST endpoints for the hub's signing key: show it, rotate it, register a root key.

A rotation is done here, in the hub that holds the key (hub/keys.py): the
next key is made, the statement signed (by the current key, or by the
offline root key in the operator's hands: `POST /keys/next` says what to
sign), packages signed again, and every device's desired state published
again, signed by the new key and carrying the chain.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from contract import keys, signing
from hub import desired, packages
from hub.api import auth
from hub.api.state import HubState, hub_state
from hub.errors import Conflict
from hub.keys import KeyRingError
from hub.tokens import Principal
from hub.validation import InvalidInput

router = APIRouter(prefix="/api/v1", tags=["keys"])


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    statement: dict[str, Any] | None = Field(
        None, description="the rotation statement for the pending next key, signed with the "
        "root key (`keys rotate --root-key`); none: the current key signs it")


class RootRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    public_key: str = Field(max_length=1024, description="the root key's public half (PEM)")


def trusted_by(state: HubState) -> dict[str, int]:
    """How many devices last reported trusting each hub key (by key id)."""
    rows = state.db.query(
        "SELECT json_extract(inventory, ?) AS key, count(*) AS n FROM devices GROUP BY key",
        (f"$.{keys.HUB_KEY_FACT}",))
    return {row["key"] or "unknown": row["n"] for row in rows}


@router.get("/keys", summary="The hub's signing key, its retired keys and who trusts which")
def list_keys(request: Request, principal: Principal = auth.viewer) -> dict[str, Any]:
    state = hub_state(request)
    return {**state.keys.describe(), "devices": trusted_by(state)}


@router.post("/keys/next", summary="Make (or show) the key the next rotation moves to (admin)")
def next_key(request: Request, principal: Principal = auth.admin) -> dict[str, Any]:
    request.state.audit = ("keys.prepare", "")
    return hub_state(request).keys.prepare()


@router.post("/keys/rotate", summary="Rotate the hub's signing key (admin)")
async def rotate(body: RotateRequest, request: Request,
                 principal: Principal = auth.admin) -> dict[str, Any]:
    state = hub_state(request)
    ring = state.keys
    retiring = ring.key_id
    request.state.audit = ("keys.rotate", retiring)
    try:
        statement = await run_in_threadpool(lambda: ring.rotate(
            lambda old, new: packages.countersign_all(state.db, state.blobs, old, new),
            body.statement))
    except KeyRingError as exc:
        raise Conflict(str(exc)) from None
    except keys.RotationError as exc:
        raise InvalidInput(f"the rotation statement does not verify: {exc}") from None
    request.state.audit = ("keys.rotate", f"{retiring} -> {ring.key_id}")
    if state.fleet is not None:  # every device: its state signed by the new key
        state.fleet.publisher.republish_all()
    else:
        desired.forget_published(state.db)
    return {"retired": retiring, "current": ring.key_id, "rotation": statement["sequence"],
            "signed_by": statement["signature"]["keyid"]}


@router.post("/keys/root", status_code=201,
             summary="Register the offline root key's public half (admin, once)")
def set_root(body: RootRequest, request: Request,
             principal: Principal = auth.admin) -> dict[str, Any]:
    request.state.audit = ("keys.root", "")
    try:
        hub_state(request).keys.set_root(body.public_key)
    except signing.SignatureError as exc:
        raise InvalidInput(f"public_key: {exc}") from None
    except KeyRingError as exc:
        raise Conflict(str(exc)) from None
    root_id = keys.pem_key_id(body.public_key)
    request.state.audit = ("keys.root", root_id)
    return {"root_key_id": root_id}
