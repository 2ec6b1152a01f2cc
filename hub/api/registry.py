"""The OCI distribution API at /v2/: pull, push (monolithic and chunked), tags.

Auth takes the hub's own tokens, as `Authorization: Bearer <token>` or as
HTTP Basic with the token as password (any user name), which is what
`skopeo --creds user:TOKEN` sends. Pull needs a viewer token or a device
token; push needs operator. Errors have the spec's shape:
{"errors": [{"code": ..., "message": ..., "detail": ...}]}.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from hub import oci_registry as reg
from hub import tokens
from hub.api.errors import add_handler, registry_response
from hub.api.limits import BodyTooLarge
from hub.api.state import HubState, hub_state
from hub.api.streaming import LargeFileResponse, receive_into
from hub.errors import HubError
from hub.oci_registry import RegistryError
from hub.storage.blobs import BlobError
from hub.tokens import Principal
from hub.validation import is_number

router = APIRouter(prefix="/v2", include_in_schema=False)
CHALLENGE = {"WWW-Authenticate": 'Basic realm="edgefleet"'}


def _secret(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return None


async def _authorize(request: Request, state: HubState, *, push: bool) -> Principal:
    secret = _secret(request)
    if secret is None:
        raise RegistryError(401, "UNAUTHORIZED", "authentication required", headers=CHALLENGE)
    try:
        principal = await run_in_threadpool(tokens.authenticate, state.db, secret)
    except HubError as exc:
        raise RegistryError(401, "UNAUTHORIZED", exc.detail, headers=CHALLENGE) from None
    request.state.principal = principal
    allowed = principal.can("operator") if push else (
        principal.can("viewer") or principal.can(tokens.DEVICE_ROLE)
    )
    if not allowed:
        need = "an operator token" if push else "a viewer or device token"
        raise RegistryError(
            403, "DENIED", f"this needs {need}; {principal.name} is {principal.role}"
        )
    return principal


async def _access(request: Request, repo: str, *, push: bool) -> HubState:
    state = hub_state(request)
    reg.check_repo(repo)
    await _authorize(request, state, push=push)
    if push:
        # A push is a dozen requests (blob uploads, child manifests by digest); the audit
        # log keeps one row for it, its tag (put_manifest), and any step that failed.
        request.state.audit = ("registry.upload", repo)
        request.state.audit_quiet = True
    return state


def _upload_headers(repo: str, upload_id: str, size: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{repo}/blobs/uploads/{upload_id}",
        "Docker-Upload-UUID": upload_id,
        "Range": f"0-{max(size - 1, 0)}",
    }


async def _receive(request: Request, state: HubState, repo: str, upload_id: str) -> None:
    """Stream the request body onto the upload; a cut-off body is an error, and one
    past the hub's limit ends the upload."""
    upload = state.uploads.get(repo, upload_id)

    def write(piece: bytes) -> None:
        upload.writer.write(piece)
        upload.size += len(piece)

    try:
        await receive_into(request, write)
    except ClientDisconnect:
        raise RegistryError(400, "BLOB_UPLOAD_INVALID", "upload cut off by the client") from None
    except BodyTooLarge as exc:
        state.uploads.cancel(repo, upload_id)
        raise RegistryError(413, "SIZE_INVALID", exc.detail) from None


async def _complete(state: HubState, repo: str, upload_id: str, digest: str) -> Response:
    upload = state.uploads.get(repo, upload_id)
    reg.check_reference(digest)
    try:
        stored, _ = await run_in_threadpool(upload.writer.commit, digest)
    except BlobError as exc:
        state.uploads.finish(upload_id)
        raise RegistryError(400, "DIGEST_INVALID", str(exc)) from None
    state.uploads.finish(upload_id)
    await run_in_threadpool(reg.link_blob, state.db, repo, stored)
    return Response(
        status_code=201,
        headers={"Location": f"/v2/{repo}/blobs/{stored}", "Docker-Content-Digest": stored},
    )


@router.get("/")
async def base(request: Request) -> dict:
    await _authorize(request, hub_state(request), push=False)
    return {}


@router.get("/_catalog")
async def catalog(request: Request) -> dict:
    state = hub_state(request)
    await _authorize(request, state, push=False)
    return {"repositories": await run_in_threadpool(reg.repositories, state.db)}


@router.post("/{repo:path}/blobs/uploads/")
async def start_upload(
    repo: str,
    request: Request,
    digest: str | None = None,
    mount: str | None = None,
    from_: str | None = Query(None, alias="from"),
) -> Response:
    state = await _access(request, repo, push=True)
    if mount and from_:
        reg.check_reference(mount)
        if await run_in_threadpool(reg.mount_blob, state.db, state.blobs, repo, mount, from_):
            return Response(
                status_code=201,
                headers={"Location": f"/v2/{repo}/blobs/{mount}", "Docker-Content-Digest": mount},
            )
    upload_id = state.uploads.start(repo)
    if digest is not None:  # monolithic upload in one POST
        await _receive(request, state, repo, upload_id)
        return await _complete(state, repo, upload_id, digest)
    return Response(status_code=202, headers=_upload_headers(repo, upload_id, 0))


@router.patch("/{repo:path}/blobs/uploads/{upload_id}")
async def upload_chunk(repo: str, upload_id: str, request: Request) -> Response:
    state = await _access(request, repo, push=True)
    upload = state.uploads.get(repo, upload_id)
    content_range = request.headers.get("content-range")
    if content_range:
        start, _, _ = content_range.removeprefix("bytes=").partition("-")
        if not is_number(start) or int(start) != upload.size:
            raise RegistryError(
                416, "BLOB_UPLOAD_INVALID",
                f"chunk starts at {start}, the upload has {upload.size} bytes",
                headers=_upload_headers(repo, upload_id, upload.size),
            )
    await _receive(request, state, repo, upload_id)
    return Response(status_code=202, headers=_upload_headers(repo, upload_id, upload.size))


@router.put("/{repo:path}/blobs/uploads/{upload_id}")
async def finish_upload(
    repo: str, upload_id: str, request: Request, digest: str | None = None
) -> Response:
    state = await _access(request, repo, push=True)
    if digest is None:
        raise RegistryError(400, "DIGEST_INVALID", "the final PUT needs ?digest=sha256:...")
    await _receive(request, state, repo, upload_id)
    return await _complete(state, repo, upload_id, digest)


@router.get("/{repo:path}/blobs/uploads/{upload_id}")
async def upload_status(repo: str, upload_id: str, request: Request) -> Response:
    state = await _access(request, repo, push=True)
    upload = state.uploads.get(repo, upload_id)
    return Response(status_code=204, headers=_upload_headers(repo, upload_id, upload.size))


@router.delete("/{repo:path}/blobs/uploads/{upload_id}")
async def cancel_upload(repo: str, upload_id: str, request: Request) -> Response:
    state = await _access(request, repo, push=True)
    state.uploads.cancel(repo, upload_id)
    return Response(status_code=204)


async def _blob(repo: str, digest: str, request: Request) -> tuple[HubState, int]:
    state = await _access(request, repo, push=False)
    reg.check_reference(digest)
    if not await run_in_threadpool(reg.has_blob, state.db, state.blobs, repo, digest):
        raise RegistryError(404, "BLOB_UNKNOWN", f"blob {digest} not found in {repo}")
    return state, await run_in_threadpool(state.blobs.size, digest)


@router.head("/{repo:path}/blobs/{digest}")
async def head_blob(repo: str, digest: str, request: Request) -> Response:
    _, size = await _blob(repo, digest, request)
    return Response(
        headers={"Content-Length": str(size), "Docker-Content-Digest": digest,
                 "Content-Type": "application/octet-stream"}
    )


@router.get("/{repo:path}/blobs/{digest}")
async def get_blob(repo: str, digest: str, request: Request) -> LargeFileResponse:
    state, _ = await _blob(repo, digest, request)
    return LargeFileResponse(
        await run_in_threadpool(state.blobs.local_path, digest),  # an object store's fetch
        media_type="application/octet-stream",
        headers={"Docker-Content-Digest": digest},
        refuse=lambda status, detail: registry_response(
            RegistryError(status, "RANGE_INVALID", detail)),
    )


async def _manifest(repo: str, reference: str, request: Request) -> tuple[HubState, reg.Manifest]:
    state = await _access(request, repo, push=False)
    return state, await run_in_threadpool(reg.resolve, state.db, repo, reference)


@router.head("/{repo:path}/manifests/{reference}")
async def head_manifest(repo: str, reference: str, request: Request) -> Response:
    _, found = await _manifest(repo, reference, request)
    return Response(headers={
        "Content-Type": found.media_type, "Content-Length": str(found.size),
        "Docker-Content-Digest": found.digest,
    })


@router.get("/{repo:path}/manifests/{reference}")
async def get_manifest(repo: str, reference: str, request: Request) -> Response:
    state, found = await _manifest(repo, reference, request)
    body = await run_in_threadpool(_read_blob, state, found.digest)
    return Response(body, media_type=found.media_type,
                    headers={"Docker-Content-Digest": found.digest})


def _read_blob(state: HubState, digest: str) -> bytes:
    with state.blobs.open(digest) as f:
        return f.read()


@router.put("/{repo:path}/manifests/{reference}")
async def put_manifest(repo: str, reference: str, request: Request) -> Response:
    state = await _access(request, repo, push=True)
    request.state.audit = ("registry.push", f"{repo}:{reference}")
    request.state.audit_quiet = reg.is_digest(reference)  # the tag comes last: the push
    try:
        body = await request.body()
    except BodyTooLarge as exc:
        raise RegistryError(413, "MANIFEST_INVALID", exc.detail) from None
    media_type = request.headers.get("content-type", "").split(";")[0].strip()
    digest = await run_in_threadpool(
        reg.put_manifest, state.db, state.blobs, repo, reference, media_type, body
    )
    return Response(
        status_code=201,
        headers={"Location": f"/v2/{repo}/manifests/{digest}", "Docker-Content-Digest": digest},
    )


@router.delete("/{repo:path}/manifests/{reference}")
async def delete_manifest(repo: str, reference: str, request: Request) -> Response:
    await _access(request, repo, push=True)
    raise RegistryError(405, "UNSUPPORTED", "deleting manifests is not supported")


@router.get("/{repo:path}/tags/list")
async def list_tags(
    repo: str, request: Request, n: int | None = Query(None, ge=0, le=10_000),
    last: str | None = None,
) -> Response:
    state = await _access(request, repo, push=False)
    found = await run_in_threadpool(lambda: reg.tags(state.db, repo, n=n, last=last))
    headers = {}
    if n is not None and len(found) == n and found:
        headers["Link"] = f'</v2/{repo}/tags/list?n={n}&last={quote(found[-1])}>; rel="next"'
    return JSONResponse({"name": repo, "tags": found}, headers=headers)


async def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
    request.state.audit_detail = exc.message
    return registry_response(exc)


def install(app: FastAPI) -> None:
    app.include_router(router)
    add_handler(app, RegistryError, _registry_error)

