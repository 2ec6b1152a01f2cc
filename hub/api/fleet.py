"""REST endpoint for the hub's link to its devices: broker connection and counters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from hub.api import auth
from hub.api.state import hub_state
from hub.tokens import Principal

router = APIRouter(prefix="/api/v1", tags=["fleet"])


@router.get("/fleet/status", summary="The MQTT link: connected?, messages ingested and dropped, "
            "desired states published")
def fleet_status(request: Request, principal: Principal = auth.viewer) -> dict[str, Any]:
    fleet = hub_state(request).fleet
    if fleet is None:
        return {"running": False}
    return {"running": True, **fleet.status()}
