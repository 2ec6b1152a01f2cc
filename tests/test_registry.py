"""The model registry through a real hub process: CLI and REST over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import Cli
from hubproc import HubProcess
from modelgen import make_onnx


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def upload(api: httpx.Client, data: bytes) -> str:
    response = api.post("/api/v1/blobs", content=data)
    assert response.status_code == 201, response.text
    return response.json()["digest"]


def register(
    api: httpx.Client, name: str, files: dict[str, bytes], **extra: object
) -> httpx.Response:
    refs = [{"path": p, "digest": upload(api, data)} for p, data in files.items()]
    return api.post(f"/api/v1/models/{name}/versions", json={"files": refs, **extra})


def snapshot(api: httpx.Client) -> list:
    """Everything the registry holds, to show a bad request changed nothing."""
    models = api.get("/api/v1/models").json()
    return [models] + [api.get(f"/api/v1/models/{m['name']}/versions").json() for m in models]


def test_register_list_download_round_trip(cli: Cli, tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "model.onnx")
    out = cli.run("model", "register", str(model), "--name", "roundtrip", "--tag", "team=health",
                  "--metric", "rmse=53.1", "--description", "ridge on diabetes")
    assert "Registered roundtrip:1" in out.stdout
    record = cli.json("model", "show", "roundtrip:1")
    assert record["framework"] == "onnx"
    assert record["signature"]["inputs"][0]["name"] == "x"
    assert record["tags"] == {"team": "health"} and record["metrics"] == {"rmse": 53.1}
    assert record["files"] == [
        {"path": "model.onnx", "digest": digest_of(model), "size": model.stat().st_size}
    ]
    listed = cli.json("model", "list", "roundtrip")
    assert [(v["name"], v["version"]) for v in listed] == [("roundtrip", 1)]
    cli.run("model", "download", "roundtrip:1", "--out", str(tmp_path / "back"))
    assert (tmp_path / "back" / "model.onnx").read_bytes() == model.read_bytes()
    # 'latest' and a bare name mean the newest version
    assert cli.json("model", "show", "roundtrip")["version"] == 1


def test_multi_file_model_keeps_every_file(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "bundle"
    (src / "extra").mkdir(parents=True)
    make_onnx(src / "model.onnx")
    (src / "labels.txt").write_text("low\nhigh\n")
    (src / "extra" / "README.md").write_text("notes")
    cli.run("model", "register", str(src), "--name", "bundle")
    record = cli.json("model", "show", "bundle:1")
    assert [f["path"] for f in record["files"]] == ["extra/README.md", "labels.txt", "model.onnx"]
    assert record["framework"] == "onnx" and record["entrypoint"] == "model.onnx"
    cli.run("model", "download", "bundle:1", "--out", str(tmp_path / "back"))
    for rel in ("model.onnx", "labels.txt", "extra/README.md"):
        assert (tmp_path / "back" / rel).read_bytes() == (src / rel).read_bytes()


def test_names_the_hub_takes_the_cli_downloads(api: httpx.Client, cli: Cli,
                                               tmp_path: Path) -> None:
    files = {"n" * 249: b"long", "we#ird?name%20.bin": b"hash", "dir/x #1": b"space"}
    assert register(api, "hostile", files).status_code == 201
    cli.run("model", "download", "hostile:1", "--out", str(tmp_path / "back"))
    for name, data in files.items():
        assert (tmp_path / "back" / name).read_bytes() == data
    refused = register(api, "hostile", {"a": b"1", "a/b": b"2"})
    assert refused.status_code == 422 and "directory of 'a/b'" in refused.json()["detail"]


def test_tag_filtering(api: httpx.Client, cli: Cli) -> None:
    register(api, "tagged", {"m.bin": b"a"}, tags={"stage": "dev", "team": "a"})
    register(api, "tagged", {"m.bin": b"b"}, tags={"stage": "prod", "team": "a"})
    register(api, "tagged", {"m.bin": b"c"}, tags={"stage": "prod", "team": "b"})
    prod = cli.json("model", "list", "tagged", "--tag", "stage=prod")
    assert [v["version"] for v in prod] == [3, 2]
    both = cli.json("model", "list", "tagged", "--tag", "stage=prod", "--tag", "team=a")
    assert [v["version"] for v in both] == [2]
    names = [m["name"] for m in cli.json("model", "list", "--tag", "team=b")]
    assert "tagged" in names and "roundtrip" not in names


def test_concurrent_registrations_get_distinct_consecutive_versions(api: httpx.Client) -> None:
    digest = upload(api, b"same bytes for everyone")
    body = {"files": [{"path": "w.bin", "digest": digest}]}

    def one(_: int) -> int:
        with httpx.Client(base_url=str(api.base_url), headers=api.headers, timeout=60) as c:
            response = c.post("/api/v1/models/race/versions", json=body)
            assert response.status_code == 201, response.text
            return response.json()["version"]

    with ThreadPoolExecutor(16) as pool:
        versions = sorted(pool.map(one, range(40)))
    assert versions == list(range(1, 41))


def test_identical_files_are_stored_once(api: httpx.Client, hub: HubProcess) -> None:
    payload = b"deduplicated weights " * 1000
    register(api, "dedup-a", {"w.bin": payload})
    register(api, "dedup-b", {"other-name.bin": payload})
    hexdigest = hashlib.sha256(payload).hexdigest()
    copies = list((hub.data_dir / "blobs").rglob(hexdigest))
    assert len(copies) == 1


def test_delete_refused_while_deployed_then_allowed(api: httpx.Client, hub: HubProcess) -> None:
    assert register(api, "deployed", {"w.bin": b"v1"}).status_code == 201
    assert register(api, "deployed", {"w.bin": b"v2"}).status_code == 201
    # No rollout API yet: record an active deployment in the hub's real database.
    with sqlite3.connect(hub.data_dir / "hub.db") as db:
        db.execute(
            "INSERT INTO deployments (device_id, name, model, version, active, created_at)"
            " VALUES ('dev-1', 'main', 'deployed', 1, 1, '2026-01-01T00:00:00Z'),"
            " ('dev-2', 'main', 'deployed', 1, 0, '2026-01-01T00:00:00Z')"
        )
    refused = api.delete("/api/v1/models/deployed/versions/1")
    assert refused.status_code == 409
    assert "dev-1" in refused.json()["detail"] and "dev-2" not in refused.json()["detail"]
    assert api.get("/api/v1/models/deployed/versions/1").status_code == 200
    assert api.delete("/api/v1/models/deployed/versions/2").status_code == 204
    assert api.get("/api/v1/models/deployed/versions/2").status_code == 404
    # numbers are never reused
    assert register(api, "deployed", {"w.bin": b"v3"}).json()["version"] == 3


def test_deleting_a_version_drops_blobs_nothing_else_uses(
    api: httpx.Client, hub: HubProcess
) -> None:
    shared, own = b"shared-by-two-versions", b"only-in-version-one"
    register(api, "gc", {"a.bin": shared, "b.bin": own})
    register(api, "gc", {"a.bin": shared})
    assert api.delete("/api/v1/models/gc/versions/1").status_code == 204
    blobs = hub.data_dir / "blobs"
    assert list(blobs.rglob(hashlib.sha256(shared).hexdigest()))
    assert not list(blobs.rglob(hashlib.sha256(own).hexdigest()))
    assert api.get("/api/v1/models/gc/versions/2/files/a.bin").content == shared


def test_lineage_from_git_work_tree(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    make_onnx(repo / "model.onnx")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "model"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cli.run("model", "register", str(repo / "model.onnx"), "--name", "lineage",
            "--dataset-digest", "sha256:" + "0" * 64, "--run-id", "run-42")
    lineage = cli.json("model", "show", "lineage:1")["lineage"]
    assert lineage == {"git_commit": head, "git_dirty": False,
                       "dataset_digest": "sha256:" + "0" * 64, "run_id": "run-42"}
    (repo / "notes.txt").write_text("uncommitted")
    cli.run("model", "register", str(repo / "model.onnx"), "--name", "lineage")
    assert cli.json("model", "show", "lineage:2")["lineage"]["git_dirty"] is True


@pytest.fixture(scope="module")
def existing(hub: HubProcess) -> None:
    with httpx.Client(
        base_url=hub.url, headers={"Authorization": f"Bearer {hub.admin_token}"}
    ) as c:
        assert register(c, "existing", {"w.bin": b"w"}).status_code == 201


@pytest.mark.usefixtures("existing")
@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "words"),
    [
        ("GET", "/api/v1/models/nosuchmodel/versions", {}, 404, "no model named"),
        ("GET", "/api/v1/models/existing/versions/99", {}, 404, "has no version 99"),
        ("GET", "/api/v1/models/existing/versions/abc", {}, 422, "version must be a number"),
        ("POST", "/api/v1/models/bad/versions", {"content": b"{not json",
         "headers": {"content-type": "application/json"}}, 400, "JSON"),
        ("POST", "/api/v1/models/bad/versions", {"json": {"files": "model.onnx"}}, 422, "files"),
        ("POST", "/api/v1/models/bad/versions", {"json": {"files": []}}, 422, "files"),
        ("POST", "/api/v1/models/bad/versions",
         {"json": {"files": [{"path": "a", "digest": "sha256:" + "1" * 64}],
                   "metrics": {"x": "y"}}},
         422, "metrics"),
        ("POST", "/api/v1/models/" + "a" * 300 + "/versions",
         {"json": {"files": [{"path": "a", "digest": "sha256:" + "1" * 64}]}}, 422, "limit is 64"),
        ("POST", "/api/v1/models/Bad Name/versions",
         {"json": {"files": [{"path": "a", "digest": "sha256:" + "1" * 64}]}},
         422, "invalid model name"),
        ("POST", "/api/v1/models/bad/versions",
         {"json": {"files": [{"path": "../../etc/passwd", "digest": "sha256:" + "1" * 64}]}},
         422, "relative path"),
        ("POST", "/api/v1/models/bad/versions",
         {"json": {"files": [{"path": "/etc/passwd", "digest": "sha256:" + "1" * 64}]}},
         422, "relative path"),
        ("POST", "/api/v1/models/bad/versions",
         {"json": {"files": [{"path": "a", "digest": "md5:abc"}]}}, 400, "not a sha256 digest"),
        ("POST", "/api/v1/models/bad/versions",
         {"json": {"files": [{"path": "a", "digest": "sha256:" + "1" * 64}]}},
         422, "never uploaded"),
        ("POST", "/api/v1/models/bad/versions",
         {"json": {"files": [{"path": "a", "digest": "sha256:" + "1" * 64}], "lineage": {"x": 1}}},
         422, "unknown lineage"),
        ("POST", "/api/v1/blobs?digest=sha256:" + "2" * 64, {"content": b"other bytes"},
         400, "does not match"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    api: httpx.Client, method: str, path: str, kwargs: dict, status: int, words: str
) -> None:
    before = snapshot(api)
    response = api.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert words in body["detail"] or words in body["error"]
    assert snapshot(api) == before


def test_corrupt_model_file_is_refused(api: httpx.Client) -> None:
    response = register(api, "corrupt", {"model.onnx": b"\x08\x07garbage that is not protobuf"})
    assert response.status_code == 422
    assert "model.onnx" in response.json()["detail"]
    assert api.get("/api/v1/models/corrupt/versions").status_code == 404


def test_truncated_upload_stores_nothing(hub: HubProcess, api: httpx.Client) -> None:
    import contextlib
    import socket
    import ssl

    payload = b"x" * 100_000
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    raw = socket.create_connection(("127.0.0.1", hub.port))
    context = ssl.create_default_context()
    with context.wrap_socket(raw, server_hostname="127.0.0.1") if hub.tls else raw as s:
        s.sendall(
            b"POST /api/v1/blobs HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {hub.admin_token}\r\n".encode()
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload[:40_000]
        )
        # The connection ends mid-body: TCP's FIN, no TLS close_notify.
        socket.socket.shutdown(s, socket.SHUT_WR)
        s.settimeout(10)
        with contextlib.suppress(ssl.SSLError):
            while s.recv(65536):
                pass
    assert api.head(f"/api/v1/blobs/{digest}").status_code == 404
    assert not list((hub.data_dir / "blobs" / "tmp").iterdir())
    entry = api.get("/api/v1/audit", params={"action": "blob.upload", "limit": 1}).json()[0]
    assert entry["result"] == "failed" and "cut off" in entry["detail"]


def test_files_past_the_background_flushes_move_whole(
    cli: Cli, api: httpx.Client, hub: HubProcess, tmp_path: Path
) -> None:
    """Bigger than the blob store's flush step and the pieces both ends hand to
    their threads (the hub hashes each big piece in one while another writes it):
    stored, refused and downloaded whole, in order."""
    from hub.storage.blobs import FLUSH_EVERY

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(FLUSH_EVERY + (5 << 20) + 123))
    wrong = "sha256:" + "0" * 64
    refused = api.post("/api/v1/blobs", params={"digest": wrong}, content=big.read_bytes())
    assert refused.status_code == 400 and "does not match" in refused.json()["detail"]
    assert api.head(f"/api/v1/blobs/{digest_of(big)}").status_code == 404
    assert not list((hub.data_dir / "blobs" / "tmp").iterdir())

    cli.run("model", "register", str(big), "--name", "big", "--allow-non-model")
    assert cli.json("model", "show", "big:1")["files"][0]["digest"] == digest_of(big)
    cli.run("model", "download", "big:1", "--out", str(tmp_path / "back"))
    assert (tmp_path / "back" / "big.bin").read_bytes() == big.read_bytes()
    assert not list((hub.data_dir / "blobs" / "tmp").iterdir())


def test_download_is_checked_and_supports_range(api: httpx.Client) -> None:
    register(api, "ranged", {"w.bin": bytes(range(256)) * 4})
    response = api.get(
        "/api/v1/models/ranged/versions/1/files/w.bin", headers={"Range": "bytes=10-19"}
    )
    assert response.status_code == 206 and response.content == bytes(range(10, 20))
    whole = api.get("/api/v1/models/ranged/versions/1/files/w.bin")
    assert (
        whole.headers["x-content-digest"] == "sha256:" + hashlib.sha256(whole.content).hexdigest()
    )
    assert api.get("/api/v1/models/ranged/versions/1/files/nope.bin").status_code == 404


def test_cli_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    missing = cli.run("model", "show", "nosuchmodel:1", ok=False)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    assert "no model named 'nosuchmodel'" in missing.stderr
    unreachable = cli.run("model", "list", "--hub", "http://127.0.0.1:9", ok=False)
    assert "cannot reach the hub" in unreachable.stderr and "Traceback" not in unreachable.stderr
    bad_ref = cli.run("model", "show", "x:y", ok=False)
    assert "MODEL:VERSION" in bad_ref.stderr
    bad_metric = cli.run("model", "register", str(make_onnx(tmp_path / "m.onnx")), "--name", "m",
                         "--metric", "rmse=high", ok=False)
    assert "not a number" in bad_metric.stderr


def test_version_listing_json_is_stable(cli: Cli) -> None:
    rows = cli.json("model", "list")
    assert all({"name", "versions", "latest_version"} <= set(r) for r in rows)
    json.dumps(rows)
