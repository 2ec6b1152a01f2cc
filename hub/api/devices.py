"""REST endpoints for devices, enrollment tokens and enrollment itself."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract import signing, tls
from hub import devices, telemetry, validation
from hub.api import auth
from hub.api.state import hub_state
from hub.errors import Forbidden, NotFound
from hub.storage.db import format_time
from hub.tokens import Principal
from hub.validation import InvalidInput

router = APIRouter(prefix="/api/v1", tags=["devices"])
MAX_TOKEN_SECONDS = 10 * 365 * 86_400


class EnrollmentTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: dict[str, str] = {}
    expires_in: int = Field(86_400, ge=1, le=MAX_TOKEN_SECONDS,
                            description="seconds until the token expires (at most 10 years)")
    max_uses: int | None = Field(None, ge=1, le=1_000_000_000)


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=200)
    public_key: str = Field(max_length=4096)
    name: str = Field(max_length=128)
    platform: str | None = Field(None, max_length=64)
    csr: str | None = Field(None, max_length=tls.MAX_CSR_BYTES,
                            description="PEM request for the device's broker certificate")

    @field_validator("csr")
    @classmethod
    def _a_request(cls, pem: str | None) -> str | None:
        if pem is not None:
            try:
                tls.read_csr(pem)
            except tls.TlsError as exc:
                raise ValueError(str(exc)) from None
        return pem

    @field_validator("public_key")
    @classmethod
    def _a_p256_key(cls, pem: str) -> str:
        # Checked before the token is used: a key no signature can be checked with would
        # enroll a device that can never prove who it is.
        try:
            signing.load_public_key(pem)
        except signing.SignatureError as exc:
            raise ValueError(str(exc)) from None
        return pem


class CertificateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    csr: str = Field(max_length=tls.MAX_CSR_BYTES)


class TagsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    set: dict[str, str] = {}
    remove: list[str] = []


@router.post("/enrollment-tokens", status_code=201, summary="Create an enrollment token")
def create_enrollment_token(
    body: EnrollmentTokenRequest, request: Request, principal: Principal = auth.operator
) -> dict[str, Any]:
    request.state.audit = ("enrollment_token.create", "")
    record, secret = devices.create_enrollment_token(
        hub_state(request).db,
        tags=body.tags,
        expires_in=timedelta(seconds=body.expires_in),
        max_uses=body.max_uses,
        created_by=principal.name,
    )
    request.state.audit = ("enrollment_token.create", record["id"])
    trust = hub_state(request).trust_pem
    # The token carries the fingerprint of the CA the device will trust (kubeadm-style).
    return {**record, "token": tls.pinned_token(secret, tls.fingerprint(trust)) if trust
            else secret}


@router.get("/tls/ca", summary="The certificate the hub's TLS chains to (no token needed; "
            "devices check it against the fingerprint in their enrollment token)")
def trust_anchor(request: Request) -> dict[str, Any]:
    trust = hub_state(request).trust_pem
    if trust is None:
        raise NotFound("this hub runs with --insecure: it has no TLS certificate")
    return {"certificate": trust, "fingerprint": tls.fingerprint(trust)}


@router.get("/enrollment-tokens", summary="List enrollment tokens")
def list_enrollment_tokens(
    request: Request, principal: Principal = auth.operator
) -> list[dict[str, Any]]:
    return devices.list_enrollment_tokens(hub_state(request).db)


@router.delete("/enrollment-tokens/{token_id}", status_code=204, summary="Revoke one")
def revoke_enrollment_token(
    token_id: str, request: Request, principal: Principal = auth.operator
) -> Response:
    request.state.audit = ("enrollment_token.revoke", token_id)
    devices.revoke_enrollment_token(hub_state(request).db, token_id)
    return Response(status_code=204)


@router.post("/enroll", status_code=201, summary="A device joins with an enrollment token")
async def enroll(body: EnrollRequest, request: Request) -> dict[str, Any]:
    state = hub_state(request)
    request.state.audit_actor = "enrollment"
    request.state.audit = ("device.enroll", body.name)
    certificates, issued = state.certificates, []

    def issue(device_id: str, secret: str) -> None:
        # Without a request the device has no broker identity until it asks for one at
        # POST /devices/{id}/certificate.
        if certificates is not None and body.csr is not None:
            issued.append(certificates.issue(device_id, body.csr))

    try:
        secret, _ = tls.split_token(body.token)  # the pin is for the device to check
    except tls.TlsError as exc:
        raise InvalidInput(f"token: {exc}") from None
    device, device_token = await run_in_threadpool(
        lambda: devices.enroll(
            state.db,
            secret=secret,
            public_key=body.public_key,
            name=body.name,
            platform=body.platform,
            grant=state.broker.add_device if state.broker is not None
            else issue if certificates is not None else None,
        )
    )
    request.state.audit = ("device.enroll", device["id"])
    answer = {
        "device": device,
        "device_token": device_token,
        "hub_public_key": state.signing_public_key,
        # Where a device enrolling after key rotations starts: contract/keys.py.
        "hub_key_trust": state.keys.trust().as_json(),
        # The managed broker has them already (hub/broker_logins.py); an external one's
        # operator adds them.
        "mqtt": {"url": state.mqtt_url, "username": device["id"], "password": device_token},
    }
    if certificates is not None:  # the certificate is the broker identity: no password
        answer["mqtt"] = {"url": state.mqtt_url, "username": device["id"],
                          **({"certificate": issued[0]} if issued else {})}
    return answer


@router.post("/devices/{device_id}/certificate", summary="A device renews its broker "
             "certificate (its own device token; a request for its own key)")
def renew_certificate(device_id: str, body: CertificateRequest, request: Request,
                      principal: Principal = auth.device) -> dict[str, Any]:
    request.state.audit = ("device.certificate", device_id)
    state = hub_state(request)
    if principal.name != device_id:
        raise Forbidden(f"a device renews its own certificate, not {device_id!r}")
    if state.certificates is None:
        raise NotFound("this hub issues no device certificates (--insecure, or an external "
                       "broker)")
    try:
        return {"certificate": state.certificates.issue(device_id, body.csr)}
    except tls.TlsError as exc:
        raise InvalidInput(f"csr: {exc}") from None


@router.get("/devices", summary="List devices")
def list_devices(
    request: Request,
    tag: list[str] = Query([], description="key=value, may repeat (all must match)"),
    limit: int = Query(1000, ge=1, le=100_000),
    offset: int = Query(0, ge=0, le=validation.MAX_OFFSET),
    principal: Principal = auth.viewer,
) -> list[dict[str, Any]]:
    selectors = [validation.parse_tag_selector(t) for t in tag]
    return devices.list_devices(hub_state(request).db, tags=selectors, limit=limit, offset=offset)


@router.get("/devices/{device_id}", summary="Show one device")
def show_device(
    device_id: str, request: Request, principal: Principal = auth.viewer
) -> dict[str, Any]:
    return devices.get_device(hub_state(request).db, device_id)


@router.delete("/devices/{device_id}", status_code=204, summary="Delete a device: its "
               "credential and broker login stop working at once, its deployments go")
def delete_device(
    device_id: str, request: Request, principal: Principal = auth.operator
) -> Response:
    request.state.audit = ("device.delete", device_id)
    state = hub_state(request)
    devices.get_device(state.db, device_id)
    # The broker first: if it cannot be told, nothing changes and the caller may retry.
    if state.broker is not None:
        state.broker.remove_device(device_id)
    if state.certificates is not None:
        state.certificates.revoke(device_id)
    devices.delete_device(state.db, device_id)
    if state.fleet is not None:
        state.fleet.forget(device_id)
    return Response(status_code=204)


@router.patch("/devices/{device_id}/tags", summary="Set or remove device tags")
def tag_device(
    device_id: str, body: TagsRequest, request: Request, principal: Principal = auth.operator
) -> dict[str, Any]:
    request.state.audit = ("device.tag", device_id)
    return devices.update_tags(
        hub_state(request).db, device_id, set_tags=body.set, remove=body.remove
    )


def _utc(moment: datetime) -> datetime:
    """A time without a zone is taken to be UTC."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


@router.get("/devices/{device_id}/telemetry", summary="A device's telemetry, oldest first: "
            "raw points or per-minute/per-hour rollups, the finest that holds the window")
def device_telemetry(
    device_id: str,
    request: Request,
    response: Response,
    since: datetime | None = Query(None, description="ISO 8601 time; only points at or after "
                                   "it (default: an hour before `until`)"),
    until: datetime | None = Query(None, description="ISO 8601 time; only points before it "
                                   "(default: now)"),
    kind: Literal["system", "inference"] | None = None,
    resolution: Literal["auto", "raw", "minute", "hour"] = Query(
        "auto", description="auto: raw points for windows up to 6 h within raw retention, "
        "minute rollups up to 3 days within theirs, else hour rollups"),
    limit: int = Query(1000, ge=1, le=100_000),
    principal: Principal = auth.viewer,
) -> list[dict[str, Any]]:
    state = hub_state(request)
    devices.get_device(state.db, device_id)
    now = datetime.now(UTC)
    end = _utc(until) if until else now
    start = _utc(since) if since else end - timedelta(hours=1)
    chosen = resolution if resolution != "auto" else telemetry.choose_resolution(
        start, end, now, state.settings.retention)
    # Each item says its resolution too; the header says it when there is none.
    response.headers["X-Edgefleet-Resolution"] = chosen
    if chosen == "raw":
        # Without SINCE every raw point kept may come back, as before rollups existed.
        return telemetry.query(state.db, device_id, since=format_time(start) if since else None,
                               until=format_time(end) if until else None, kind=kind,
                               limit=limit)
    return telemetry.query_rollups(state.db, device_id, chosen, since=start, until=end,
                                   kind=kind, limit=limit)
