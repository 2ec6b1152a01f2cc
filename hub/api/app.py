"""Builds the hub's FastAPI application from its routers."""

from __future__ import annotations

from fastapi import FastAPI

from hub import ui
from hub.api import (
    admin,
    commands,
    deployments,
    devices,
    drift,
    errors,
    events,
    fleet,
    keys,
    metrics,
    models,
    openapi,
    packages,
    registry,
    rollouts,
    webhooks,
)
from hub.api.audit_log import AuditLog
from hub.api.errors import Unexpected
from hub.api.limits import RequestGate
from hub.api.state import HubState


def create_app(state: HubState) -> FastAPI:
    app = FastAPI(
        title="edgefleet hub",
        description="Model registry, devices and rollouts. Authenticate with "
        "`Authorization: Bearer <token>`.",
        version="1",
    )
    app.state.hub = state
    errors.install(app)
    for module in (admin, models, packages, devices, commands, deployments, fleet, rollouts,
                   metrics, keys, events, webhooks, drift):
        app.include_router(module.router)
    registry.install(app)
    ui.install(app)  # the dashboard at /ui
    openapi.install(app)
    app.add_middleware(RequestGate, db=state.db,
                       max_request_bytes=state.settings.max_request_bytes,
                       max_upload_bytes=state.settings.max_upload_bytes)
    app.add_middleware(Unexpected)  # a bug is one 500 line, and the connection stays
    app.add_middleware(AuditLog, db=state.db)
    app.add_middleware(metrics.RequestMetrics, metrics=state.metrics)  # outermost: times all
    return app
