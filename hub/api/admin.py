"""REST endpoints for API tokens, the audit log and the hub's own status."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from hub import audit, tokens
from hub.api import auth
from hub.api.state import hub_state
from hub.tokens import Principal

router = APIRouter(prefix="/api/v1", tags=["admin"])


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    role: str
    expires_in: int | None = Field(None, ge=60, le=tokens.MAX_LIFETIME.days * 86_400,
                                   description="seconds until the token stops working; "
                                   "none: until revoked")


@router.get("/health", summary="Is the hub up? (no token needed)")
def health(request: Request) -> dict[str, Any]:
    state = hub_state(request)
    return {"status": "ok", "mqtt_url": state.mqtt_url}


@router.get("/whoami", summary="The token this request was made with")
def whoami(principal: Principal = auth.viewer) -> dict[str, str]:
    return {"id": principal.token_id, "name": principal.name, "role": principal.role}


@router.post("/tokens", status_code=201, summary="Create an API token (admin)")
def create_token(
    body: TokenRequest, request: Request, principal: Principal = auth.admin
) -> dict[str, Any]:
    request.state.audit = ("token.create", body.name)
    record, secret = tokens.create(
        hub_state(request).db, name=body.name, role=body.role, created_by=principal.name,
        expires_in=None if body.expires_in is None else timedelta(seconds=body.expires_in),
    )
    return {**record, "token": secret}


@router.get("/tokens", summary="List API tokens (admin)")
def list_tokens(request: Request, principal: Principal = auth.admin) -> list[dict[str, Any]]:
    return tokens.list_tokens(hub_state(request).db)


@router.delete("/tokens/{token_id}", summary="Revoke an API token (admin)")
def revoke_token(
    token_id: str, request: Request, principal: Principal = auth.admin
) -> dict[str, Any]:
    request.state.audit = ("token.revoke", token_id)
    return tokens.revoke(hub_state(request).db, token_id)


@router.get("/audit", summary="Read the audit log, newest first")
def read_audit(
    request: Request,
    limit: int = Query(100, ge=1, le=10_000),
    actor: str | None = None,
    action: str | None = Query(None, description="prefix, e.g. 'model.'"),
    principal: Principal = auth.viewer,
) -> list[dict[str, Any]]:
    return audit.entries(hub_state(request).db, limit=limit, actor=actor, action=action)
