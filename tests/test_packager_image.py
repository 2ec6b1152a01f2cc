"""Runnable package images: the edgefleet layer, the Debian base, a real image on real engines."""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.oci import OCILayout, Platform
from engines import Engine, engine  # noqa: F401  (fixture)
from hubproc import HubProcess, free_port
from packager.base import DebianBase, check_debian_platform
from packager.build import BuildResult
from packager.deps import PipDeps, PlatformUnavailable
from packager.distribution import Registry
from packager.image import LAUNCHER, SERVE_REQUIREMENTS, app_entries, app_layer
from packager_fixtures import EPOCH, FakeDeps, build, model_files, run, skopeo

ROOT = Path(__file__).resolve().parent.parent


def test_serve_requirements_are_the_projects_own() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["agent"])
    assert set(SERVE_REQUIREMENTS) <= declared


def test_the_edgefleet_layer_holds_the_serving_code_and_a_launcher(tmp_path: Path) -> None:
    paths = {entry.path: entry for entry in app_entries()}
    assert paths[LAUNCHER].mode == 0o755
    assert "opt/edgefleet/python/agent/serving/cli.py" in paths
    assert not [p for p in paths if "__pycache__" in p or p.startswith("opt/edgefleet/python/hub")]
    first = app_layer(OCILayout.create(tmp_path / "a"))
    again = app_layer(OCILayout.create(tmp_path / "b"))
    assert first == again


def test_a_platform_without_qemu_or_debian_name_is_unavailable() -> None:
    with pytest.raises(PlatformUnavailable, match="no Debian base for linux/s390"):
        check_debian_platform(Platform.parse("linux/s390"))


def layers(result: BuildResult, platform: str = "linux/amd64") -> dict[str, str]:
    """Role -> layer digest of PLATFORM's image."""
    layout = OCILayout(result.layout)
    manifest = json.loads(layout.get(result.manifests[platform].digest))
    return {layer["annotations"]["dev.edgefleet.layer"]: layer["digest"]
            for layer in manifest["layers"]}


def test_a_model_only_update_shares_the_deps_and_edgefleet_layers(tmp_path: Path) -> None:
    files, deps = model_files(tmp_path / "model"), FakeDeps(tmp_path / "deps")
    options: dict[str, Any] = {"deps": deps, "layer_cache": tmp_path / "cache",
                               "platforms": ["linux/amd64"]}
    first = layers(build(tmp_path / "layout", files, **options))
    later = layers(build(tmp_path / "layout", files, version=3, source_date_epoch=EPOCH + 86400,
                         **options))
    assert first["deps"] == later["deps"] and first["edgefleet"] == later["edgefleet"]
    assert first["serving"] != later["serving"]


def test_a_damaged_deps_layer_cache_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    files, deps = model_files(tmp_path / "model"), FakeDeps(tmp_path / "deps")
    options: dict[str, Any] = {"deps": deps, "layer_cache": tmp_path / "cache",
                               "platforms": ["linux/amd64"]}
    first = build(tmp_path / "a", files, **options)
    cached = OCILayout(tmp_path / "cache").blob_path(layers(first)["deps"])
    cached.write_bytes(b"not the layer")
    again = build(tmp_path / "b", files, **options)
    assert again.digest == first.digest


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildResult]:
    """A runnable linux/amd64 image of the tiny model: Debian base (cached), real wheels."""
    root = tmp_path_factory.mktemp("image")
    yield build(root / "layout", model_files(root / "model"), platforms=["linux/amd64"],
                deps=PipDeps(), debian=DebianBase())


@pytest.mark.slow
def test_the_image_is_reproducible_and_readable_by_skopeo_and_umoci(
        image: BuildResult, tmp_path: Path) -> None:
    again = build(tmp_path / "again", model_files(tmp_path / "model"), platforms=["linux/amd64"],
                  deps=PipDeps(), debian=DebianBase())
    assert again.digest == image.digest
    inspected = json.loads(skopeo("inspect", "--config", f"oci:{image.layout}:{image.tag}"))
    assert inspected["config"]["Entrypoint"] == ["edgefleet", "serve"]
    run("umoci", "unpack", "--rootless", "--image", f"{image.layout}:{image.tag}",
        tmp_path / "bundle")
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "usr/bin/python3").exists() and (rootfs / LAUNCHER).is_file()
    assert (rootfs / "opt/edgefleet/python/onnxruntime").is_dir()
    assert (rootfs / "opt/edgefleet/model/model.onnx").is_file()


@pytest.mark.slow
def test_the_image_answers_an_inference_request(
        image: BuildResult, engine: Engine, tmp_path: Path) -> None:
    port = free_port()
    name = f"localhost/edgefleet-test/diabetes:{image.tag}"
    engine.load(image.layout, image.tag, name)
    control = tmp_path / "run"
    control.mkdir()
    container = engine.client.containers.run(
        name, detach=True, network_mode="host",
        command=["--host", "127.0.0.1", "--port", str(port),
                 "--control-socket", "/run/edgefleet/control.sock"],
        environment={"EDGEFLEET_SERVE_API_KEY": "secret"},
        volumes={str(control): {"bind": "/run/edgefleet", "mode": "rw"}},
    )
    try:
        transport = httpx.HTTPTransport(uds=str(control / "control.sock"))
        with httpx.Client(transport=transport, base_url="http://serving", timeout=60) as serving:
            deadline = time.monotonic() + 60
            while not (control / "control.sock").exists():
                container.reload()
                assert container.status in ("created", "running"), container.logs().decode()
                assert time.monotonic() < deadline, container.logs().decode()
                time.sleep(0.1)
            loaded = serving.put("/control/deployments/diabetes", json={
                "version": "2", "model_dir": "/opt/edgefleet/model",
                "entrypoint": "model.onnx", "framework": "onnx"})
            assert loaded.status_code == 200, loaded.text
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v2/models/diabetes/infer",
            headers={"Authorization": "Bearer secret"},
            json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                              "data": [1.0, 2.0, 3.0]}]},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [1, 2]
    finally:
        container.remove(force=True)


@pytest.mark.slow
def test_a_debian_base_is_shared_through_the_hubs_registry(
        image: BuildResult, hub: HubProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Registry(hub.url, hub.admin_token) as registry:
        # The base the image fixture built (cached on this machine) goes to the hub...
        built, tag = DebianBase(registry=registry, push=True)(["linux/amd64"])
        # ...and a machine without it, and without mmdebstrap, pulls it instead of building.
        monkeypatch.setenv("PATH", str(tmp_path))
        pulled, again = DebianBase(cache_dir=tmp_path / "cache", registry=registry)(["linux/amd64"])
    assert again == tag
    assert OCILayout(pulled).resolve(tag).digest == OCILayout(built).resolve(tag).digest
