"""The hub's OCI registry (/v2/) against the distribution spec, driven by skopeo and raw HTTP."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from contract import signing
from hubproc import HubProcess


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image made by umoci (a third-party tool): we do not test ourselves with ourselves."""
    root = tmp_path_factory.mktemp("umoci")
    lay = root / "layout"
    subprocess.run(["umoci", "init", "--layout", str(lay)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{lay}:v1"], check=True)
    (root / "payload.txt").write_text("hello from a layer\n")
    subprocess.run(
        ["umoci", "insert", "--rootless", "--image", f"{lay}:v1", str(root / "payload.txt"),
         "/payload.txt"],
        check=True, capture_output=True,
    )
    return lay


def registry_client(hub: HubProcess, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=hub.url, headers=headers, timeout=30)


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    digest = sha(data)
    answer = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert answer.status_code == 201, answer.text
    return digest


def push_image(client: httpx.Client, repo: str, tag: str, layer: bytes) -> str:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                        "diff_ids": [sha(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": push_blob(client, repo, config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": push_blob(client, repo, layer), "size": len(layer)}],
    }).encode()
    answer = client.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
                        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert answer.status_code == 201, answer.text
    assert answer.headers["docker-content-digest"] == sha(manifest)
    return sha(manifest)


def test_skopeo_round_trip_keeps_digests(hub: HubProcess, layout: Path, tmp_path: Path) -> None:
    creds = f"anyone:{hub.admin_token}"
    remote = f"docker://127.0.0.1:{hub.port}/models/umoci-image:v1"
    skopeo("copy", "--all", f"oci:{layout}:v1", remote, "--dest-tls-verify=false",
           "--dest-creds", creds)
    original = skopeo("inspect", "--raw", f"oci:{layout}:v1").stdout
    pushed = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", creds, remote).stdout
    assert pushed == original
    skopeo("copy", "--all", remote, f"oci:{tmp_path / 'back'}:v1", "--src-tls-verify=false",
           "--src-creds", creds)
    back = skopeo("inspect", "--raw", f"oci:{tmp_path / 'back'}:v1").stdout
    assert sha(back.encode()) == sha(original.encode())
    tags = json.loads(skopeo("list-tags", "--tls-verify=false", "--creds", creds,
                             remote.rsplit(":", 1)[0]).stdout)
    assert tags["Tags"] == ["v1"]


def test_manifest_get_head_by_tag_and_digest(hub: HubProcess) -> None:
    with registry_client(hub, hub.admin_token) as c:
        digest = push_image(c, "models/plain", "1", b"layer-bytes")
        for ref in ("1", digest):
            got = c.get(f"/v2/models/plain/manifests/{ref}")
            assert got.status_code == 200
            assert got.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
            assert got.headers["docker-content-digest"] == digest == sha(got.content)
            head = c.head(f"/v2/models/plain/manifests/{ref}")
            assert head.status_code == 200 and (
                int(head.headers["content-length"]) == len(got.content)
            )


def test_chunked_upload_and_range_reads(hub: HubProcess) -> None:
    data = bytes(range(256)) * 1000
    with registry_client(hub, hub.admin_token) as c:
        started = c.post("/v2/models/chunked/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["location"]
        offset = 0
        for piece in (data[:100_000], data[100_000:200_000], data[200_000:]):
            answer = c.patch(location, content=piece, headers={
                "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                "Content-Type": "application/octet-stream"})
            assert answer.status_code == 202, answer.text
            offset += len(piece)
            assert answer.headers["range"] == f"0-{offset - 1}"
            location = answer.headers["location"]
        assert c.get(location).headers["range"] == f"0-{len(data) - 1}"
        done = c.put(location, params={"digest": sha(data)})
        assert done.status_code == 201
        blob = f"/v2/models/chunked/blobs/{sha(data)}"
        assert c.get(blob).content == data
        part = c.get(blob, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert int(c.head(blob).headers["content-length"]) == len(data)


def test_out_of_order_chunk_and_bad_digest_are_refused(hub: HubProcess) -> None:
    with registry_client(hub, hub.admin_token) as c:
        location = c.post("/v2/models/broken/blobs/uploads/").headers["location"]
        skipped = c.patch(location, content=b"abc", headers={"Content-Range": "10-12"})
        assert skipped.status_code == 416
        c.patch(location, content=b"abc", headers={"Content-Range": "0-2"})
        wrong = c.put(location, params={"digest": sha(b"something else")})
        assert wrong.status_code == 400
        assert wrong.json()["errors"][0]["code"] == "DIGEST_INVALID"
        assert c.head(f"/v2/models/broken/blobs/{sha(b'abc')}").status_code == 404
        # the failed session is gone
        assert c.get(location).json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/v2/models/nothing/manifests/1", {}, 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/models/nothing/blobs/sha256:" + "0" * 64, {}, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/models/nothing/tags/list", {}, 404, "NAME_UNKNOWN"),
        ("GET", "/v2/Models/UPPER/manifests/1", {}, 400, "NAME_INVALID"),
        ("GET", "/v2/models/x/manifests/bad:tag", {}, 400, "TAG_INVALID"),
        ("GET", "/v2/models/x/manifests/sha256:short", {}, 400, "DIGEST_INVALID"),
        ("PUT", "/v2/models/x/manifests/1", {"content": b"{not json",
         "headers": {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}},
         400, "MANIFEST_INVALID"),
        ("PUT", "/v2/models/x/manifests/1", {"content": json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + "1" * 64, "size": 2}, "layers": []}).encode(),
         "headers": {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}},
         400, "MANIFEST_BLOB_UNKNOWN"),
        ("DELETE", "/v2/models/x/manifests/1", {}, 405, "UNSUPPORTED"),
    ],
)
def test_errors_have_the_spec_shape(
    hub: HubProcess, method: str, path: str, kwargs: dict, status: int, code: str
) -> None:
    with registry_client(hub, hub.admin_token) as c:
        answer = c.request(method, path, **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["errors"][0]
    assert error["code"] == code and error["message"]


def test_auth_basic_bearer_roles_and_devices(hub: HubProcess, api: httpx.Client) -> None:
    with registry_client(hub, None) as anonymous:
        challenge = anonymous.get("/v2/")
        assert challenge.status_code == 401
        assert challenge.headers["www-authenticate"].startswith("Basic")
    basic = httpx.get(f"{hub.url}/v2/", auth=("whoever", hub.admin_token))
    assert basic.status_code == 200
    viewer = api.post("/api/v1/tokens", json={"name": "reg-viewer", "role": "viewer"}).json()
    with registry_client(hub, viewer["token"]) as c:
        assert c.get("/v2/models/plain/manifests/1").status_code == 200
        denied = c.post("/v2/models/plain/blobs/uploads/")
        assert denied.status_code == 403 and denied.json()["errors"][0]["code"] == "DENIED"
    enrollment = api.post("/api/v1/enrollment-tokens", json={}).json()
    device = httpx.post(f"{hub.url}/api/v1/enroll", json={
        "token": enrollment["token"], "name": "puller",
        "public_key": signing.public_key_pem(signing.generate_private_key())}).json()
    with registry_client(hub, device["device_token"]) as c:
        assert c.get("/v2/models/plain/manifests/1").status_code == 200
        assert c.post("/v2/models/plain/blobs/uploads/").status_code == 403
        # a device token is no API token
        assert c.get("/api/v1/models").status_code == 403


def test_blobs_shared_across_repositories_are_stored_once(hub: HubProcess) -> None:
    layer = b"the same model weights in two repositories" * 100
    with registry_client(hub, hub.admin_token) as c:
        push_image(c, "models/one", "1", layer)
        mounted = c.post("/v2/models/two/blobs/uploads/",
                         params={"mount": sha(layer), "from": "models/one"})
        assert mounted.status_code == 201
        push_image(c, "models/two", "1", layer)
        assert c.head(f"/v2/models/two/blobs/{sha(layer)}").status_code == 200
        # not linked into a third repository: invisible there
        assert c.head(f"/v2/models/three/blobs/{sha(layer)}").status_code == 404
    copies = list((hub.data_dir / "blobs").rglob(sha(layer).removeprefix("sha256:")))
    assert len(copies) == 1


def test_tag_listing_paginates(hub: HubProcess) -> None:
    with registry_client(hub, hub.admin_token) as c:
        for tag in ("a", "b", "c"):
            push_image(c, "models/paged", tag, f"layer-{tag}".encode())
        first = c.get("/v2/models/paged/tags/list", params={"n": 2})
        assert first.json() == {"name": "models/paged", "tags": ["a", "b"]}
        assert 'rel="next"' in first.headers["link"]
        rest = c.get("/v2/models/paged/tags/list", params={"n": 2, "last": "b"})
        assert rest.json()["tags"] == ["c"]
