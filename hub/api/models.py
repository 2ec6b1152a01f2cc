"""REST endpoints of the model registry and of blob uploads."""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from hub import profiles, registry, validation
from hub.api import auth
from hub.api.errors import error_response
from hub.api.limits import BodyTooLarge
from hub.api.state import hub_state
from hub.api.streaming import LargeFileResponse, receive_into
from hub.errors import BadRequest, NotFound
from hub.storage.blobs import BlobError, check_digest
from hub.tokens import Principal

router = APIRouter(prefix="/api/v1", tags=["models"])


class FileRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(max_length=1024)
    digest: str = Field(max_length=80)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    files: list[FileRef] = Field(min_length=1, max_length=validation.MAX_FILES)
    description: str = ""
    tags: dict[str, str] = {}
    metrics: dict[str, float] = {}
    lineage: dict[str, Any] = {}
    require_model: bool = Field(
        False, description="refuse the version (422) unless one of its files is a model "
        "the packager reads (.onnx, .tflite, OpenVINO .xml with its .bin)")


class ProfileRow(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    device_class: str = Field(max_length=40, description="the OCI platform measured on, "
                              "e.g. linux/amd64: the class of devices it stands for")
    runtime: str = Field(max_length=40)
    device: str = Field(max_length=64, description="as the runtime names it: CPU, GPU.0")
    variant: str = Field(max_length=64, description="the package variant measured")
    batch: int
    iterations: int
    p50_ms: float
    p99_ms: float
    throughput: float = Field(description="rows per second at this batch size")
    peak_rss_bytes: int = Field(description="resident-memory high-water mark of the process "
                                "that ran it")


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field(max_length=253, description="the machine measured on")
    rows: list[ProfileRow] = Field(min_length=1, max_length=profiles.MAX_ROWS)


def _selectors(tag: list[str]) -> list[tuple[str, str]]:
    return [validation.parse_tag_selector(t) for t in tag]


@router.head("/blobs/{digest}", summary="Does the hub hold this blob?")
def blob_exists(digest: str, request: Request, principal: Principal = auth.viewer) -> Response:
    state = hub_state(request)
    try:  # one look, not exists-then-size: on S3 each is a request
        size = state.blobs.size(check_digest(digest))
    except BlobError:
        return Response(status_code=404)
    return Response(headers={"Content-Length": str(size)})


@router.post("/blobs", status_code=201, summary="Upload one file's bytes (streamed)")
async def upload_blob(
    request: Request,
    digest: str | None = Query(None, description="sha256:<hex> the upload must match"),
    principal: Principal = auth.operator,
) -> dict[str, Any]:
    state = hub_state(request)
    if digest is not None:
        check_digest(digest)
    request.state.audit = ("blob.upload", digest or "")
    declared = request.headers.get("content-length")
    writer = state.blobs.writer()
    try:
        received = await receive_into(request, writer.write)
    except ClientDisconnect:
        writer.abort()
        raise BadRequest("upload cut off by the client; nothing was stored") from None
    except BodyTooLarge:
        writer.abort()
        raise
    if declared is not None and validation.is_number(declared) and int(declared) != received:
        writer.abort()
        raise BadRequest(f"upload truncated: got {received} of {declared} bytes")
    stored, size = await to_thread.run_sync(writer.commit, digest)
    request.state.audit = ("blob.upload", stored)
    return {"digest": stored, "size": size}


@router.post("/models/{name}/versions", status_code=201, summary="Register a new version")
def register(
    name: str, body: RegisterRequest, request: Request, principal: Principal = auth.operator
) -> dict[str, Any]:
    state = hub_state(request)
    request.state.audit = ("model.register", name)
    record = registry.register_version(
        state.db,
        state.blobs,
        name=name,
        files=[(f.path, f.digest) for f in body.files],
        created_by=principal.name,
        description=body.description,
        tags=body.tags,
        metrics=body.metrics,
        lineage=body.lineage,
        require_model=body.require_model,
    )
    request.state.audit = ("model.register", f"{name}:{record['version']}")
    return record


@router.get("/models", summary="List models")
def list_models(
    request: Request,
    tag: list[str] = Query([], description="key=value; only models with a version so tagged"),
    principal: Principal = auth.viewer,
) -> list[dict[str, Any]]:
    return registry.list_models(hub_state(request).db, tags=_selectors(tag))


@router.get("/models/{name}/versions", summary="List the versions of a model")
def list_versions(
    name: str,
    request: Request,
    tag: list[str] = Query([], description="key=value, may repeat (all must match)"),
    limit: int = Query(100, ge=1, le=10_000),
    offset: int = Query(0, ge=0, le=validation.MAX_OFFSET),
    principal: Principal = auth.viewer,
) -> list[dict[str, Any]]:
    return registry.list_versions(
        hub_state(request).db, name, tags=_selectors(tag), limit=limit, offset=offset
    )


@router.get("/models/{name}/versions/{version}", summary="Show one version")
def show_version(
    name: str, version: str, request: Request, principal: Principal = auth.viewer
) -> dict[str, Any]:
    return registry.get_version(hub_state(request).db, name, validation.version(version))


@router.post("/models/{name}/versions/{version}/profiles",
             summary="Store profile rows measured on one machine (replacing rows of the same key)")
def post_profile(
    name: str, version: str, body: ProfileRequest, request: Request,
    principal: Principal = auth.operator,
) -> list[dict[str, Any]]:
    state = hub_state(request)
    request.state.audit = ("model.profile", f"{name}:{version}")
    number = registry.get_version(state.db, name, validation.version(version))["version"]
    stored = profiles.store(state.db, name, number, [r.model_dump() for r in body.rows],
                            host=body.host, profiled_by=principal.name)
    request.state.audit = ("model.profile", f"{name}:{number}")
    runtimes = sorted({f"{r.runtime}:{r.device}" for r in body.rows})
    request.state.audit_detail = (f"{len(body.rows)} row(s) on {body.host}: "
                                  f"{', '.join(runtimes)}")
    return stored


@router.get("/models/{name}/versions/{version}/profiles", summary="A version's profile rows")
def get_profile(
    name: str, version: str, request: Request, principal: Principal = auth.viewer
) -> list[dict[str, Any]]:
    db = hub_state(request).db
    number = registry.get_version(db, name, validation.version(version))["version"]
    return profiles.read(db, name, number)


@router.get("/models/{name}/versions/{version}/files/{path:path}", summary="Download a file")
def download_file(
    name: str, version: str, path: str, request: Request, principal: Principal = auth.viewer
) -> LargeFileResponse:
    state = hub_state(request)
    found = registry.version_file(state.db, name, validation.version(version), path)
    if not state.blobs.exists(found["digest"]):
        raise NotFound(f"the bytes of {path!r} ({found['digest']}) are missing from the blob store")
    return LargeFileResponse(
        state.blobs.local_path(found["digest"]),
        media_type="application/octet-stream",
        headers={"X-Content-Digest": found["digest"]},
        refuse=lambda status, detail: error_response(request, status, "bad range", detail),
    )


@router.delete("/models/{name}/versions/{version}", status_code=204, summary="Delete a version")
async def delete_version(
    name: str, version: str, request: Request, principal: Principal = auth.operator
) -> Response:
    state = hub_state(request)
    request.state.audit = ("model.delete", f"{name}:{version}")
    number = validation.version(version)
    if not isinstance(number, int):
        raise validation.InvalidInput("name the version to delete explicitly, not 'latest'")
    await run_in_threadpool(registry.delete_version, state.db, state.blobs, name, number)
    return Response(status_code=204)

