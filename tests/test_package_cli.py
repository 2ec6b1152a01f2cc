"""Packages end to end through the CLI and a real hub: build, push, sign, verify, export.

Third-party tools (skopeo, umoci) check what we produce. Builds here skip the
runtime's Python packages (--no-deps) except in the slow test, which fetches
real wheels from PyPI.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import Cli
from contract.oci import OCILayout
from hubproc import HubProcess
from modelgen import make_onnx
from packager.distribution import Registry, push_layout
from test_packager_build import make_base_image


def skopeo(*args: str) -> str:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def model(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    """tiny:1, registered through the REST API."""
    path = make_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers) as c:
        digest = c.post("/api/v1/blobs", content=path.read_bytes()).json()["digest"]
        c.post("/api/v1/models/tiny/versions",
               json={"files": [{"path": "model.onnx", "digest": digest}]}).raise_for_status()
    return "tiny:1"


@pytest.fixture(scope="module")
def pushed(hub: HubProcess, model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cli = Cli(hub, tmp_path_factory.mktemp("home"))
    return cli.json("package", "build", model, "--no-deps")


def test_build_pushes_a_signed_three_platform_index(
    cli: Cli, hub: HubProcess, pushed: dict
) -> None:
    assert pushed["platforms"] == ["linux/amd64", "linux/arm/v7", "linux/arm64"]
    assert pushed["pushed"] == "models/tiny:1" and pushed["signature"].startswith("sha256:")
    listed = cli.json("package", "list", "tiny")
    # The version is an int, as in every other listing.
    assert [(p["version"], p["digest"], p["signed"]) for p in listed] == [
        (1, pushed["digest"], True)]
    shown = cli.json("package", "show", "tiny:1")
    roles = [[layer["role"] for layer in image["layers"]] for image in shown["images"]]
    assert roles == [["model", "serving"]] * 3
    # the model layer is one blob shared by every platform
    assert len({image["layers"][0]["digest"] for image in shown["images"]}) == 1
    creds = f"x:{hub.admin_token}"
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", "--creds", creds,
                            f"docker://127.0.0.1:{hub.port}/models/tiny:1"))
    assert len(raw["manifests"]) == 3
    arm = json.loads(skopeo("inspect", "--tls-verify=false", "--creds", creds, "--override-arch",
                            "arm64", f"docker://127.0.0.1:{hub.port}/models/tiny:1"))
    assert arm["Architecture"] == "arm64"


def test_verify_with_the_hubs_key_and_with_a_wrong_key(
    cli: Cli, pushed: dict, tmp_path: Path
) -> None:
    ok = cli.json("package", "verify", "tiny:1")
    assert ok["ok"] and ok["digest"] == pushed["digest"] and ok["blobs_checked"] == 12
    cli.run("keys", "generate", "--dir", str(tmp_path))
    assert stat.S_IMODE(os.stat(tmp_path / "cosign.key").st_mode) == 0o600
    wrong = cli.run("package", "verify", "tiny:1", "--key", str(tmp_path / "cosign.pub"), ok=False)
    assert wrong.returncode == 1 and "signature made by another key" in wrong.stderr
    again = cli.run("keys", "generate", "--dir", str(tmp_path), ok=False)
    assert "already exists" in again.stderr and "Traceback" not in again.stderr


def test_reproducible_builds_give_the_same_digest(cli: Cli, pushed: dict, tmp_path: Path) -> None:
    first = cli.json("package", "build", "tiny:1", "--no-deps", "--out", str(tmp_path / "a"))
    second = cli.json("package", "build", "tiny:1", "--no-deps", "--out", str(tmp_path / "b"))
    assert first["digest"] == second["digest"] == pushed["digest"]
    later = cli.json("package", "build", "tiny:1", "--no-deps", "--out", str(tmp_path / "c"),
                     "--source-date-epoch", "1700000000")
    assert later["digest"] != first["digest"]


def test_export_reads_with_skopeo_and_unpacks_with_umoci(
    cli: Cli, pushed: dict, tmp_path: Path
) -> None:
    archive = tmp_path / "tiny.tar"
    cli.run("package", "export", "tiny:1", "--out", str(archive), "--quiet")
    assert json.loads(skopeo("inspect", "--raw", f"oci-archive:{archive}:1"))["manifests"]
    assert cli.json("package", "verify", str(archive) + ":1",
                    "--key", str(_hub_key(cli, tmp_path)))["ok"]
    single = tmp_path / "single"
    skopeo("copy", "--override-arch", "arm64", f"oci-archive:{archive}:1", f"oci:{single}:arm64")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{single}:arm64", str(bundle)],
                   check=True, capture_output=True)
    rootfs = bundle / "rootfs" / "opt" / "edgefleet"
    assert (rootfs / "model" / "model.onnx").is_file()
    serving = json.loads((rootfs / "serving.json").read_text())
    assert serving["runtime"] == "onnxruntime" and serving["signature"]["inputs"][0]["name"] == "x"


def _hub_key(cli: Cli, tmp_path: Path) -> Path:
    pem = httpx.get(f"{cli.env['EDGEFLEET_HUB']}/api/v1/signing-key",
                    headers={"Authorization": f"Bearer {cli.env['EDGEFLEET_TOKEN']}"}).json()
    path = tmp_path / "hub.pub"
    path.write_text(pem["public_key"])
    return path


def test_skopeo_copy_into_the_hub_and_back_keeps_digests(
    cli: Cli, hub: HubProcess, tmp_path: Path
) -> None:
    built = cli.json("package", "build", "tiny:1", "--no-deps", "--out", str(tmp_path / "lay"))
    creds = f"x:{hub.admin_token}"
    remote = f"docker://127.0.0.1:{hub.port}/models/copied:1"
    skopeo("copy", "--all", "--preserve-digests", f"oci:{tmp_path / 'lay'}:1", remote,
           "--dest-tls-verify=false", "--dest-creds", creds)
    skopeo("copy", "--all", "--preserve-digests", remote, f"oci:{tmp_path / 'back'}:1",
           "--src-tls-verify=false", "--src-creds", creds)
    raw = skopeo("inspect", "--raw", f"oci:{tmp_path / 'back'}:1")
    assert "sha256:" + __import__("hashlib").sha256(raw.encode()).hexdigest() == built["digest"]


def test_tampered_blob_in_the_registry_is_caught(cli: Cli, hub: HubProcess, pushed: dict) -> None:
    shown = cli.json("package", "show", "tiny:1")
    serving = shown["images"][0]["layers"][1]["digest"].removeprefix("sha256:")
    blob = next((hub.data_dir / "blobs").rglob(serving))
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        failed = cli.run("package", "verify", "tiny:1", ok=False)
        assert failed.returncode == 1
        assert "verification failed" in failed.stderr and "digest mismatch" in failed.stderr
    finally:
        blob.write_bytes(original)


def test_build_errors_are_clear(cli: Cli, model: str) -> None:
    missing = cli.run("package", "build", "nosuch:1", "--no-deps", ok=False)
    assert "no model named 'nosuch'" in missing.stderr
    bad_platform = cli.run("package", "build", model, "--no-deps", "--platform", "sparc",
                           ok=False)
    assert "sparc" in bad_platform.stderr and "Traceback" not in bad_platform.stderr
    local = cli.run("package", "verify", "/nonexistent-dir:1", ok=False)
    assert local.returncode != 0 and "Traceback" not in local.stderr
    for base, says in (("nosuch-dir", "is not a file, a directory or REPOSITORY:TAG"),
                       ("bases/nosuch:1", "is not in the hub's registry")):
        failed = cli.run("package", "build", model, "--base", base, "--variant", "based",
                         ok=False)
        assert says in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.slow
def test_a_base_image_can_come_from_the_hubs_registry(cli: Cli, hub: HubProcess, model: str,
                                                       tmp_path: Path) -> None:
    base = make_base_image(tmp_path / "base", ["linux/amd64", "linux/arm64"])
    with Registry(hub.url, hub.admin_token) as registry:
        push_layout(OCILayout(base), registry, "bases/python", ["3.11"])
    built = cli.json("package", "build", model, "--base", "bases/python:3.11", "--platform",
                     "linux/amd64", "--out", str(tmp_path / "out"))
    layout = OCILayout(tmp_path / "out")
    index = json.loads(layout.get(built["digest"]))
    manifest = json.loads(layout.get(index["manifests"][0]["digest"]))
    assert [layer["annotations"]["dev.edgefleet.layer"] for layer in manifest["layers"]] == [
        "base", "deps", "edgefleet", "model", "serving"]


def test_the_default_build_is_native_and_needs_no_wheels(
    cli: Cli, model: str, tmp_path: Path
) -> None:
    built = cli.json("package", "build", model, "--out", str(tmp_path / "native"))
    assert built["platforms"] == ["linux/amd64", "linux/arm/v7", "linux/arm64"]
    layout = OCILayout(tmp_path / "native")
    index = json.loads(layout.get(built["digest"]))
    manifest = json.loads(layout.get(index["manifests"][0]["digest"]))
    assert [layer["annotations"]["dev.edgefleet.layer"] for layer in manifest["layers"]] == [
        "model", "serving"]


@pytest.mark.slow
def test_image_build_with_real_wheels_names_the_missing_platform_first(
        cli: Cli, model: str, tmp_path: Path) -> None:
    failed = cli.run("package", "build", model, "--image", "--out", str(tmp_path / "x"), ok=False)
    assert "onnxruntime" in failed.stderr and "linux/arm/v7" in failed.stderr
    assert "--skip-unavailable" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "x").exists()  # found before any layer was written
    built = cli.json("package", "build", model, "--image", "--out", str(tmp_path / "y"),
                     "--platform", "linux/amd64,linux/arm/v7", "--skip-unavailable")
    assert built["platforms"] == ["linux/amd64"] and "linux/arm/v7" in built["skipped"]
    layout = OCILayout(tmp_path / "y")
    index = json.loads(layout.get(built["digest"]))
    manifest = json.loads(layout.get(index["manifests"][0]["digest"]))
    assert [layer["annotations"]["dev.edgefleet.layer"] for layer in manifest["layers"]] == [
        "base", "deps", "edgefleet", "model", "serving"]


def test_openvino_packages_carry_ir_and_optimisation_is_checked(cli: Cli, model: str,
                                                                 tmp_path: Path) -> None:
    built = cli.json("package", "build", model, "--no-deps", "--runtime", "openvino",
                     "--out", str(tmp_path / "ov"))
    assert built["runtime"] == "openvino" and "max abs diff" in built["accuracy"]
    strict = cli.run("package", "build", model, "--no-deps", "--optimize", "int8",
                     "--max-abs-diff", "1e-12", "--out", str(tmp_path / "q"), ok=False)
    assert strict.returncode == 1 and "max abs diff" in strict.stderr
    assert "Traceback" not in strict.stderr
