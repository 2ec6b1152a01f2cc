"""Bounded input on the hub's REST API, in process: body limits enforced while the body
streams and after authentication, JSON depth, integer ranges, one-line errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub import tokens
from hub.api.app import create_app
from hub.api.limits import MAX_JSON_DEPTH
from hub.api.state import HubState
from hub.keys import KeyRing
from hub.oci_registry import Uploads
from hub.settings import HubSettings
from hub.storage.blobs import FileBlobStore
from hub.storage.db import Database
from hubapp import TestClient

REQUEST_LIMIT = 64 << 10
UPLOAD_LIMIT = 1 << 20


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[TestClient]:
    db = Database(tmp_path / "hub.db")
    blobs = FileBlobStore(tmp_path / "blobs")
    settings = HubSettings(data_dir=tmp_path, port=0, mqtt_port=0,
                           max_request_bytes=REQUEST_LIMIT, max_upload_bytes=UPLOAD_LIMIT)
    state = HubState(settings=settings, db=db, blobs=blobs,
                     keys=KeyRing(settings.signing_key_path), mqtt_url="", uploads=Uploads(blobs))
    _, secret = tokens.create(db, name="admin", role="admin", created_by="test")
    with TestClient(create_app(state), headers={"Authorization": f"Bearer {secret}"}) as client:
        yield client


def one_line(response, status: int, words: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and "\n" not in body["detail"]
    assert words in body["detail"], body


class Body:
    """A body streamed straight into the ASGI app (TestClient would read it whole
    first), counting the chunks the app took; `send` runs one request with it."""

    def __init__(self, chunks: int, size: int = 64 << 10) -> None:
        self.chunks, self.size, self.taken = chunks, size, 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.chunks):
            self.taken += 1
            yield b"[" * self.size

    def send(self, client: TestClient, method: str, path: str,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        merged = {k.lower(): v for k, v in [*client.headers.items(), *(headers or {}).items()]}
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
                 "server": ("testserver", 80), "client": ("127.0.0.1", 1), "state": {},
                 "headers": [(k.encode(), v.encode()) for k, v in merged.items() if v],
                 "app": client.app}
        chunks = iter(self)
        answer: dict[str, Any] = {}

        async def receive() -> dict[str, Any]:
            chunk = next(chunks, None)
            return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message.get("body"):
                answer["body"] = answer.get("body", b"") + message["body"]

        asyncio.run(client.app(scope, receive, send))  # type: ignore[arg-type]
        return answer["status"], json.loads(answer["body"])


def test_no_token_is_refused_before_the_body_is_read(hub: TestClient) -> None:
    body = Body(128)  # 8 MiB
    status, answer = body.send(hub, "POST", "/api/v1/tokens", {"Authorization": ""})
    assert (status, answer["error"]) == (401, "unauthorized") and body.taken == 0
    response = hub.post("/api/v1/tokens", content=b"{" * 100_000,
                        headers={"Authorization": "Bearer eft_nope"})
    one_line(response, 401, "unknown API token")


def test_a_body_past_the_limit_is_413_while_it_streams(hub: TestClient) -> None:
    body = Body(128)
    status, answer = body.send(hub, "POST", "/api/v1/tokens")
    assert status == 413 and f"({REQUEST_LIMIT} bytes)" in answer["detail"]
    assert body.taken == 2
    declared = hub.post("/api/v1/tokens", content=b" " * (REQUEST_LIMIT + 1),
                        headers={"Content-Type": "application/json"})
    one_line(declared, 413, "raise the hub's limit")
    # The limit is the body's, not the JSON's: just under it is read and judged.
    ok = hub.post("/api/v1/tokens", json={"name": "x" * 10, "role": "viewer",
                                          "pad": " " * (REQUEST_LIMIT - 100)})
    one_line(ok, 422, "pad")


def test_enrollment_has_a_small_limit_of_its_own(hub: TestClient) -> None:
    response = hub.post("/api/v1/enroll", content=b" " * (65 << 10), headers={"Authorization": ""})
    one_line(response, 413, "65536 bytes")


def test_uploads_stop_at_their_limit_and_keep_nothing(hub: TestClient, tmp_path: Path) -> None:
    body = Body(64)  # 4 MiB against 1 MiB
    status, answer = body.send(hub, "POST", "/api/v1/blobs")
    assert status == 413 and f"({UPLOAD_LIMIT} bytes)" in answer["detail"]
    assert body.taken == 17
    assert not list((tmp_path / "blobs").rglob("*.tmp*")) and not [
        p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    fits = hub.post("/api/v1/blobs", content=b"x" * UPLOAD_LIMIT)
    assert fits.status_code == 201, fits.text
    # Unauthenticated uploads are refused before their body counts.
    body = Body(64)
    assert body.send(hub, "POST", "/api/v1/blobs", {"Authorization": ""})[0] == 401
    assert body.taken == 0


def test_registry_uploads_stop_at_the_limit_in_the_registry_shape(hub: TestClient) -> None:
    start = hub.post("/v2/models/tiny/blobs/uploads/")
    assert start.status_code == 202, start.text
    status, answer = Body(32).send(hub, "PATCH", start.headers["Location"])
    assert status == 413 and answer["errors"][0]["code"] == "SIZE_INVALID"
    # The upload is gone with it.
    assert hub.get(start.headers["Location"]).status_code == 404
    manifest = hub.put("/v2/models/tiny/manifests/1", content=b"{" + b" " * REQUEST_LIMIT,
                       headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    assert manifest.status_code == 413
    assert hub.get("/v2/models/tiny/manifests/1", headers={"Authorization": ""}).status_code == 401


def test_deep_json_is_400_before_it_is_parsed(hub: TestClient) -> None:
    for depth in (MAX_JSON_DEPTH + 1, 30_000):
        deep = '{"name": "t", "role": "viewer", "x": ' + "[" * depth + "]" * depth + "}"
        one_line(hub.post("/api/v1/tokens", content=deep), 400, "nests deeper than 32")
    nested = {"a": [[[[{"b": 1}]]]]}
    reg = hub.post("/api/v1/models/m/versions", json={
        "files": [{"path": "f", "digest": "sha256:" + "0" * 64}], "lineage": nested})
    one_line(reg, 422, "unknown lineage field")  # judged on its merits: the nesting was fine


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/api/v1/devices?offset=100000000000000000000", None),
    ("GET", "/api/v1/devices?offset=1e20", None),
    ("GET", "/api/v1/models/m/versions?offset=100000000000000000000", None),
    ("POST", "/api/v1/enrollment-tokens", {"expires_in": 10**20}),
    ("POST", "/api/v1/enrollment-tokens", {"max_uses": 10**20}),
    ("POST", "/api/v1/devices/d1/deployments", {"model": "m", "version": 10**20}),
    ("POST", "/api/v1/devices/d1/deployments",
     {"model": "m", "version": 1, "candidate": {"version": 10**20, "traffic": 10}}),
    ("POST", "/api/v1/rollouts", {"model": "m", "version": 10**20, "target": {}}),
])
def test_numbers_out_of_range_are_422(hub: TestClient, method: str, path: str,
                                      body: object) -> None:
    response = hub.request(method, path, json=body)
    one_line(response, 422, "")


def test_registry_tag_page_size_is_bounded(hub: TestClient) -> None:
    for n in ("1e20", "100000000000000000000", "10001"):
        response = hub.get(f"/v2/models/tiny/tags/list?n={n}")
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["message"].startswith("n: ")


def test_api_tokens_expire_with_a_clear_401(hub: TestClient) -> None:
    made = hub.post("/api/v1/tokens", json={"name": "ci", "role": "viewer", "expires_in": 3600})
    assert made.status_code == 201 and made.json()["expires_at"], made.text
    ci = {"Authorization": f"Bearer {made.json()['token']}"}
    assert hub.get("/api/v1/whoami", headers=ci).json()["name"] == "ci"
    db = hub.app.state.hub.db  # type: ignore[attr-defined]
    with db.transaction() as conn:
        conn.execute("UPDATE api_tokens SET expires_at = '2020-01-01T00:00:00.000000Z'"
                     " WHERE name = 'ci'")
    one_line(hub.get("/api/v1/whoami", headers=ci), 401,
             "API token 'ci' expired at 2020-01-01T00:00:00.000000Z; ask an admin for a new one")
    one_line(hub.post("/api/v1/tokens", json={"name": "x", "role": "viewer"}, headers=ci), 401,
             "expired at")
    for seconds in (59, 10**20):
        one_line(hub.post("/api/v1/tokens", json={"name": "x", "role": "viewer",
                                                  "expires_in": seconds}), 422, "expires_in")
    assert "expires_at" in hub.get("/api/v1/tokens").json()[0]


def _blob(hub: TestClient, data: bytes) -> str:
    answer = hub.post("/api/v1/blobs", content=data)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["digest"])


def test_file_names_the_cli_cannot_write_are_refused(hub: TestClient) -> None:
    digest = _blob(hub, b"weights")

    def register(*paths: str) -> Any:
        return hub.post("/api/v1/models/names/versions",
                        json={"files": [{"path": p, "digest": digest} for p in paths]})

    one_line(register("a", "a/b"), 422, "file 'a' would also be the directory of 'a/b'")
    one_line(register("x/" + "n" * 250), 422, "is 250 bytes; a part may have 249")
    one_line(register("é" * 125), 422, "is 250 bytes")  # bytes, not characters
    made = register("n" * 249, "we#ird?name.bin", "a/b", "a2")
    assert made.status_code == 201, made.text


def test_range_errors_answer_in_each_apis_shape(hub: TestClient) -> None:
    digest = _blob(hub, bytes(100))
    assert hub.post("/api/v1/models/ranged/versions",
                    json={"files": [{"path": "w.bin", "digest": digest}]}).status_code == 201
    url = "/api/v1/models/ranged/versions/1/files/w.bin"
    past = hub.get(url, headers={"Range": "bytes=500-"})
    one_line(past, 416, "starts past the end of the 100-byte file")
    assert past.headers["content-range"] == "bytes */100"
    one_line(hub.get(url, headers={"Range": "lines=1-2"}), 400, "Only support bytes range")
    assert hub.get(url, headers={"Range": "bytes=10-19"}).content == bytes(10)
    start = hub.post(f"/v2/models/ranged/blobs/uploads/?digest={digest}", content=bytes(100))
    assert start.status_code == 201, start.text
    oci = hub.get(f"/v2/models/ranged/blobs/{digest}", headers={"Range": "bytes=500-"})
    assert oci.status_code == 416 and oci.json()["errors"][0]["code"] == "RANGE_INVALID"


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/api/v1/models/tiny/versions/%C2%B2", None, 422),
    ("GET", "/api/v1/models/tiny/versions/%D9%A3", None, 422),
    ("GET", "/api/v1/models/tiny/versions/%C2%B2/files/x", None, 422),
    ("DELETE", "/api/v1/models/tiny/versions/%C2%B2", None, 422),
    ("POST", "/api/v1/rollouts", {"model": "m", "version": 1, "target": {}, "waves": "abc%"}, 422),
    *(("POST", "/api/v1/rollouts", {"model": "m", "version": 1, "target": {},
                                    "max_failures": bad}, 422)
      for bad in ("abc%", "nan%", "inf%", "-5%", "1e400%")),
    ("POST", "/api/v1/rollouts/r-1/%0a%1b[31mjunk", None, 422),
    ("GET", "/api/v1/devices/d/telemetry?since=0001-01-01T00:00:00%2B05:00", None, 404),
    ("GET", "/api/v1/devices?tag=" + "k" * 5_000, None, 422),
])
def test_what_gave_500s_is_a_4xx_with_one_line(hub: TestClient, method: str, path: str,
                                               body: object, status: int) -> None:
    one_line(hub.request(method, path, json=body), status, "")


def test_audit_actions_of_refused_paths_are_printable(hub: TestClient) -> None:
    hub.post("/api/v1/nowhere/%0a%1b[31m")
    entry = hub.get("/api/v1/audit", params={"limit": 1}).json()[0]
    assert entry["action"] == "POST /api/v1/nowhere/\\n\\x1b[31m", entry


def test_a_time_before_year_one_in_utc_is_422(hub: TestClient) -> None:
    db = hub.app.state.hub.db  # type: ignore[attr-defined]
    with db.transaction() as conn:
        conn.execute("INSERT INTO devices (id, name, tags, status, desired_generation,"
                     " applied_generation, published_generation, enrolled_at)"
                     " VALUES ('d', 'd', '{}', 'online', 0, 0, 0, '2026-01-01T00:00:00Z')")
    one_line(hub.get("/api/v1/devices/d/telemetry?since=0001-01-01T00:00:00%2B05:00"), 422,
             "out of range")
    assert hub.get("/api/v1/devices/d/telemetry?since=0001-01-01T00:00:00Z").json() == []
