"""The dashboard's pages under /ui: server-rendered, read through the hub's domain modules.

Changes go through the REST API's own handlers (hub/api/rollouts.py), so a
rollout made from the form is validated, audited and started exactly as one
made with `POST /api/v1/rollouts`. Every POST needs the session's CSRF token
and the role the API would ask for; buttons a role may not use are not shown.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import pydantic
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute

from hub import deployments, devices, packages, registry, tokens
from hub.api import rollouts as rollouts_api
from hub.api.state import hub_state
from hub.errors import HubError, InvalidInput, Unauthorized
from hub.rollouts import reads
from hub.rollouts.states import ENDED, TRANSITIONS, Event
from hub.storage.db import Database, parse_time
from hub.tokens import Principal
from hub.ui import charts, queries, session

HERE = Path(__file__).parent
# The rollout commands (as the API names them) and the states each may start from: the
# engine's own transition table, so a button shows exactly when the API would take it.
ACTIONS = {action: sorted(TRANSITIONS[event][0]) for action, event in (
    ("pause", Event.PAUSE), ("resume", Event.RESUME), ("abort", Event.ABORT),
    ("rollback", Event.ROLL_BACK))}
# No inline script or style anywhere: injected markup could not run even if escaping failed.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _ago(stamp: str | None) -> str:
    if not stamp:
        return "never"
    seconds = (datetime.now(UTC) - parse_time(stamp)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def _short_time(stamp: str | None) -> str:
    return stamp[:19].replace("T", " ") if stamp else ""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(ago=_ago, short_time=_short_time, qs=lambda params: urlencode(params))
    return env


ENV = _environment()


def page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(ENV.get_template(template).render(**context), status_code=status_code,
                        headers=HEADERS)


class UiRoute(APIRoute):
    """Turns the hub's errors into pages (or JSON for the polling endpoint), and a
    missing or dead session into the sign-in page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            wants_json = request.url.path.endswith(".json")
            try:
                return await handler(request)
            except session.SignInNeeded:
                if wants_json:
                    return JSONResponse({"error": "unauthorized", "detail": "sign in again"}, 401)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/ui/signin?next={quote(target)}", 303)
            except (HubError, InvalidInput) as exc:
                status, error, detail = (
                    (exc.status, exc.error, exc.detail) if isinstance(exc, HubError)
                    else (422, "invalid input", str(exc)))
                request.state.audit_detail = detail
                if wants_json:
                    return JSONResponse({"error": error, "detail": detail}, status)
                referer = request.headers.get("referer", "")
                own = f"{request.url.scheme}://{request.url.netloc}/ui/"
                return page("error.html", status, me=None, error=error, detail=detail,
                            status=status, back=referer if referer.startswith(own) else "/ui/fleet")

        return guarded


router = APIRouter(prefix="/ui", route_class=UiRoute, include_in_schema=False)


def _base(request: Request, active: str) -> tuple[Database, dict[str, Any]]:
    """The database, and what every page's frame needs: who, their CSRF token, their role."""
    db = hub_state(request).db
    me, csrf = session.current(request, db)
    return db, {"me": me, "csrf": csrf, "active": active, "can_operate": me.can("operator")}


async def _operator_form(request: Request) -> tuple[Principal, dict[str, str]]:
    """A POST from a page: CSRF first (a forged request learns nothing), then the role."""
    db = hub_state(request).db
    me, csrf = await run_in_threadpool(session.current, request, db)
    form = await session.read_form(request)
    session.check_csrf(request, csrf, form)
    me.require("operator")
    return me, form


# -- signing in --------------------------------------------------------------------


def _next(target: str) -> str:
    """Only a page of the dashboard: never an open redirect to another site."""
    return target if target.startswith("/ui/") and not target.startswith("/ui//") else "/ui/fleet"


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/fleet", 303)


@router.get("/signin")
def signin_form(request: Request, next: str = "/ui/fleet") -> HTMLResponse:
    nonce = session.signin_nonce(request)
    response = page("signin.html", me=None, error=None, next=_next(next), csrf=nonce)
    session.keep_signin_nonce(response, request, nonce)
    return response


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await session.read_form(request)
    session.check_origin(request)
    nonce = request.cookies.get(session.SIGNIN_COOKIE, "")
    request.state.audit = ("ui.signin", "")
    if not nonce or form.get(session.CSRF_FIELD) != nonce:
        request.state.audit_detail = "sign-in form without its CSRF cookie"
        fresh = session.signin_nonce(request)
        refused = page("signin.html", 403, me=None, next=_next(form.get("next", "")), csrf=fresh,
                       error="This sign-in form had expired; it was reloaded, try again.")
        session.keep_signin_nonce(refused, request, fresh)
        return refused
    secret = form.get("token", "").strip()
    try:
        principal = await run_in_threadpool(tokens.authenticate, hub_state(request).db, secret)
        if principal.role == tokens.DEVICE_ROLE:
            raise Unauthorized("a device token cannot sign in; use an API token (eft_...)")
    except Unauthorized as exc:
        request.state.audit_detail = exc.detail
        return page("signin.html", 401, me=None, next=_next(form.get("next", "")), csrf=nonce,
                    error=exc.detail)
    request.state.principal = principal
    request.state.audit = ("ui.signin", principal.name)
    response = RedirectResponse(_next(form.get("next", "")), 303)
    session.start(response, request, secret)
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    db = hub_state(request).db
    _, csrf = await run_in_threadpool(session.current, request, db)
    session.check_csrf(request, csrf, await session.read_form(request))
    request.state.audit = ("ui.signout", "")
    response = RedirectResponse("/ui/signin", 303)
    session.end(response)
    return response


# -- fleet and devices ---------------------------------------------------------------


@router.get("/fleet")
def fleet(request: Request) -> HTMLResponse:
    db, base = _base(request, "fleet")
    wanted = queries.FleetFilter.parse(dict(request.query_params))
    return page("fleet.html", **base, f=wanted, facets=queries.facets(db),
                listing=queries.device_page(db, wanted))


@router.get("/devices/{device_id}")
def device(device_id: str, request: Request, window: str = "1h") -> HTMLResponse:
    db, base = _base(request, "fleet")
    record = devices.get_device(db, device_id)
    window_name, span = queries.checked_window(window)
    data = queries.device_telemetry(db, device_id, span,
                                    policy=hub_state(request).settings.retention)
    gap = 3 * span.total_seconds() / queries.BUCKETS  # more than two empty buckets: a gap

    def chart(title: str, unit: str, series: list[queries.Series],
              y_max: float | None = None) -> charts.Chart:
        return charts.line_chart(title, unit, series, start=data.start, end=data.end, gap=gap,
                                 y_max=y_max)

    shown = [chart("CPU", "%", data.cpu, 100.0), chart("Memory", "%", data.memory, 100.0),
             chart("Requests", "per second", data.requests),
             chart("Error rate", "%", data.error_rate),
             chart("Latency p50 / p95", "ms", data.latency)]
    return page("device.html", **base, device=record, window=window_name,
                windows=list(queries.WINDOWS), points=data.points, charts=shown,
                desired={d["name"]: d for d in deployments.for_device(db, device_id)},
                reported=deployments.reported_for_device(db, device_id),
                recent=queries.recent_states(db, device_id),
                refusals=list(reversed(record["reported"].get("refusals", []))))


# -- models ----------------------------------------------------------------------------


@router.get("/models")
def models(request: Request) -> HTMLResponse:
    db, base = _base(request, "models")
    return page("models.html", **base, models=registry.list_models(db))


@router.get("/models/{name}")
def model(name: str, request: Request) -> HTMLResponse:
    db, base = _base(request, "models")
    state = hub_state(request)
    versions = registry.list_versions(db, name, limit=100)
    built: dict[int, list[dict]] = {}  # a version's packages, one per variant
    for package in packages.list_packages(db, state.blobs, model=name):
        built.setdefault(package["version"], []).append(package)
    return page("model.html", **base, name=name, versions=versions, packages=built,
                running=queries.where_versions_run(db, name))


# -- rollouts --------------------------------------------------------------------------

FORM_FIELDS = ("model", "version", "target", "deployment", "waves", "max_failures", "soak",
               "device_timeout", "priority")


def _rollout_request(form: dict[str, str]) -> rollouts_api.RolloutRequest:
    """The form as the API's own request model: the same rules, the same messages."""
    target: dict[str, str] = {}
    for part in form.get("target", "").split(","):
        if part.strip():
            key, equals, value = part.partition("=")
            if not equals:
                raise InvalidInput(f"target {part.strip()[:80]!r} must look like key=value")
            target[key.strip()] = value.strip()
    version = form.get("version", "").strip()
    body: dict[str, Any] = {
        "model": form.get("model", "").strip(),
        "version": int(version) if version.isdigit() else version,
        "target": target, "deployment": form.get("deployment", "").strip() or None,
        "auto_rollback": form.get("auto_rollback") == "on",
    }
    for key in ("waves", "max_failures", "soak", "device_timeout"):
        if form.get(key, "").strip():
            body[key] = form[key].strip()
    priority = form.get("priority", "").strip()
    if priority:
        body["priority"] = priority
    try:
        return rollouts_api.RolloutRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        raise InvalidInput("; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}"
            for e in exc.errors()[:5])) from None


def _rollouts_page(request: Request, status: int = 200, error: str | None = None,
                   entered: dict[str, str] | None = None) -> HTMLResponse:
    db, base = _base(request, "rollouts")
    return page("rollouts.html", status, **base, rollouts=reads.list_rollouts(db),
                models=registry.list_models(db), error=error, entered=entered or {})


@router.get("/rollouts")
def rollouts_list(request: Request) -> HTMLResponse:
    return _rollouts_page(request)


@router.post("/rollouts")
async def rollout_create(request: Request) -> Response:
    request.state.audit = ("rollout.create", "")
    me, form = await _operator_form(request)
    entered = {k: form.get(k, "") for k in (*FORM_FIELDS, "auto_rollback")}
    try:
        body = _rollout_request(form)
        request.state.audit = ("rollout.create", f"{body.model}:{body.version}")
        record = await run_in_threadpool(rollouts_api.create, body, request, me)
    except (HubError, InvalidInput) as exc:
        detail = exc.detail if isinstance(exc, HubError) else str(exc)
        request.state.audit_detail = detail
        status = exc.status if isinstance(exc, HubError) else 422
        return await run_in_threadpool(_rollouts_page, request, status, detail, entered)
    return RedirectResponse(f"/ui/rollouts/{quote(record['id'])}", 303)


def _progress(db: Database, rollout_id: str) -> dict[str, Any]:
    record = reads.show(db, rollout_id)
    return {**record, "soak_left": record["soak_left_s"],
            "actions": [a for a, states in ACTIONS.items() if record["state"] in states],
            "terminal": record["state"] in ENDED}


@router.get("/rollouts/{rollout_id}")
def rollout(rollout_id: str, request: Request) -> HTMLResponse:
    db, base = _base(request, "rollouts")
    return page("rollout.html", **base, r=_progress(db, rollout_id), actions=ACTIONS)


@router.get("/rollouts/{rollout_id}/progress.json")
def rollout_progress(rollout_id: str, request: Request) -> JSONResponse:
    db = hub_state(request).db
    session.current(request, db)
    return JSONResponse(_progress(db, rollout_id), headers={"Cache-Control": "no-store"})


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(rollout_id: str, action: str, request: Request) -> Response:
    request.state.audit = (f"rollout.{action[:20]}", rollout_id)  # refusals are logged as such
    me, _ = await _operator_form(request)
    if action not in ACTIONS:
        raise InvalidInput(f"unknown action {action[:20]!r}; use one of {', '.join(ACTIONS)}")
    await rollouts_api.act(rollout_id, action, request, me)
    return RedirectResponse(f"/ui/rollouts/{quote(rollout_id)}", 303)


# -- audit -----------------------------------------------------------------------------


@router.get("/audit")
def audit_log(request: Request) -> HTMLResponse:
    db, base = _base(request, "audit")
    wanted = queries.AuditFilter.parse(dict(request.query_params))
    entries = queries.audit_entries(db, wanted)
    older = {**{k: v for k, v in wanted.__dict__.items() if v and k != "before"},
             "before": entries[-1]["id"]} if len(entries) == 100 else None
    return page("audit.html", **base, f=wanted, entries=entries, older=older,
                results=queries.RESULTS)

