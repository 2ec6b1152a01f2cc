"""REST endpoints for webhook subscriptions, their deliveries and dead letters (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from hub import webhooks
from hub.api import auth
from hub.api.state import hub_state
from hub.tokens import Principal
from hub.webhooks import DeliveryState

router = APIRouter(prefix="/api/v1", tags=["events"])


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2000, description="http:// or https:// URL events are POSTed to")
    types: list[str] = Field(min_length=1, max_length=32,
                             description="event types or patterns, e.g. rollout.*")
    filter: dict[str, str] = Field(default_factory=dict, max_length=2,
                                   description="globs on the event's subject and actor, "
                                   "e.g. {\"subject\": \"r-*\"}")
    secret: str = Field(min_length=webhooks.SECRET_BYTES[0], max_length=webhooks.SECRET_BYTES[1],
                        description="HMAC-SHA256 key for Edgefleet-Signature; never shown again")


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deliveries: list[int] = Field(default_factory=list, max_length=1000,
                                  description="delivery ids; none: every dead letter")


@router.post("/webhooks", status_code=201, summary="Subscribe a URL to events (admin)")
def add(body: WebhookRequest, request: Request, principal: Principal = auth.admin
        ) -> dict[str, Any]:
    request.state.audit = ("webhook.add", body.url[:200])
    record = webhooks.add(hub_state(request).db, url=body.url, types=body.types,
                          filter=body.filter, secret=body.secret, created_by=principal.name)
    request.state.audit = ("webhook.add", record["id"])
    return record


@router.get("/webhooks", summary="List webhook subscriptions and their delivery counts (admin)")
def list_webhooks(request: Request, principal: Principal = auth.admin) -> list[dict[str, Any]]:
    return webhooks.list_all(hub_state(request).db)


@router.get("/webhooks/{webhook_id}", summary="One webhook subscription (admin)")
def show(webhook_id: str, request: Request, principal: Principal = auth.admin
         ) -> dict[str, Any]:
    return webhooks.get(hub_state(request).db, webhook_id)


@router.delete("/webhooks/{webhook_id}", summary="Remove a webhook and its deliveries (admin)")
def remove(webhook_id: str, request: Request, principal: Principal = auth.admin
           ) -> dict[str, Any]:
    request.state.audit = ("webhook.remove", webhook_id)
    return webhooks.remove(hub_state(request).db, webhook_id)


@router.get("/webhooks/{webhook_id}/deliveries",
            summary="A webhook's deliveries, newest first; state=dead for dead letters (admin)")
def deliveries(
    webhook_id: str, request: Request, state: DeliveryState | None = None,
    limit: int = Query(100, ge=1, le=10_000), principal: Principal = auth.admin,
) -> list[dict[str, Any]]:
    return webhooks.deliveries(hub_state(request).db, webhook_id, state=state, limit=limit)


@router.post("/webhooks/{webhook_id}/replay",
             summary="Send deliveries again: the ones named, or every dead letter (admin)")
def replay(webhook_id: str, body: ReplayRequest, request: Request,
           principal: Principal = auth.admin) -> dict[str, int]:
    request.state.audit = ("webhook.replay", webhook_id)
    return {"queued": webhooks.replay(hub_state(request).db, webhook_id, body.deliveries)}
