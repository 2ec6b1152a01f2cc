"""build_package: the image index it writes, checked from outside with skopeo and umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from contract.errors import PackageError
from contract.oci import (
    CONFIG,
    INDEX,
    LAYER_TAR,
    LAYER_TAR_GZIP,
    MANIFEST,
    OCILayout,
    Platform,
    canonical_json,
)
from packager.archive import write_archive
from packager.build import BuildProgress, build_package
from packager.deps import PlatformUnavailable, UnavailableWheel
from packager.image import SERVE_REQUIREMENTS
from packager.layers import write_layer
from packager.modelfile import ModelInfo, inspect_model
from packager.tarball import Entry
from packager_fixtures import (
    EPOCH,
    NAME,
    VERSION,
    FakeDeps,
    build,
    model_files,
    needs_skopeo,
    needs_umoci,
    skopeo,
    unpack_platform,
)

TAG = str(VERSION)


def serving_json(layout: OCILayout, manifest: dict) -> dict:
    serving = next(
        layer
        for layer in manifest["layers"]
        if layer["annotations"]["dev.edgefleet.layer"] == "serving"
    )
    with tarfile.open(fileobj=io.BytesIO(layout.get(serving["digest"]))) as tar:
        member = tar.extractfile("opt/edgefleet/serving.json")
        assert member is not None
        return json.loads(member.read())


def blobs(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def image(layout: OCILayout, platform: str) -> tuple[dict, dict]:
    """The manifest and config of PLATFORM's image in the package tagged TAG."""
    index = json.loads(layout.get(layout.resolve(TAG).digest))
    entry = next(
        m for m in index["manifests"] if str(Platform.from_dict(m["platform"], what="")) == platform
    )
    manifest = json.loads(layout.get(entry["digest"]))
    return manifest, json.loads(layout.get(manifest["config"]["digest"]))


@needs_skopeo
def test_skopeo_sees_an_index_with_one_manifest_per_platform(tmp_path: Path) -> None:
    result = build(tmp_path / "layout", model_files(tmp_path / "model"))
    raw = skopeo("inspect", "--raw", f"oci:{tmp_path / 'layout'}:{TAG}")
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == result.digest
    index = json.loads(raw)
    assert index["mediaType"] == INDEX
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v7"},
    ]
    assert index["annotations"] == {
        "org.opencontainers.image.title": NAME,
        "org.opencontainers.image.version": TAG,
        "org.opencontainers.image.created": "2023-11-14T22:13:20Z",
    }
    assert {m["mediaType"] for m in index["manifests"]} == {MANIFEST}


@needs_skopeo
@pytest.mark.parametrize(
    ("override", "architecture"),
    [
        (["--override-arch", "arm64"], "arm64"),
        (["--override-arch", "arm", "--override-variant", "v7"], "arm"),
    ],
)
def test_skopeo_picks_each_platforms_image(
    tmp_path: Path, override: list[str], architecture: str
) -> None:
    build(tmp_path / "layout", model_files(tmp_path / "model"))
    info = json.loads(skopeo("inspect", *override, f"oci:{tmp_path / 'layout'}:{TAG}"))
    assert (info["Os"], info["Architecture"]) == ("linux", architecture)
    assert info["Labels"]["org.opencontainers.image.title"] == NAME
    assert "EDGEFLEET_SERVING=/opt/edgefleet/serving.json" in info["Env"]
    assert info["Created"].startswith("2023-11-14T22:13:20")


@needs_skopeo
@needs_umoci
def test_an_unpacked_image_has_the_model_files_and_serving_json(tmp_path: Path) -> None:
    files = model_files(tmp_path / "model")
    build(tmp_path / "layout", files, prefer=["onnxruntime:CPU"])
    rootfs = unpack_platform(tmp_path / "layout", TAG, tmp_path / "bundle", arch="arm64")
    model_dir = rootfs / "opt" / "edgefleet" / "model"
    assert (model_dir / "model.onnx").read_bytes() == files["model.onnx"].read_bytes()
    assert (model_dir / "assets" / "labels.txt").read_text() == "low\nhigh\n"
    serving = json.loads((rootfs / "opt" / "edgefleet" / "serving.json").read_bytes())
    assert serving == {
        "schema": "edgefleet.serving/v1",
        "model": NAME,
        "version": VERSION,
        "runtime": "onnxruntime",
        "framework": "onnx",
        "entrypoint": "model.onnx",
        "signature": {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        },
        "prefer": ["onnxruntime:CPU"],
        "sample_request": {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 1.0, 1.0]}]
        },
    }
    runtime_config = json.loads((tmp_path / "bundle" / "config.json").read_bytes())
    assert runtime_config["process"]["args"] == [
        "edgefleet",
        "serve",
        "--host",
        "0.0.0.0",
        "--control-socket",
        "/run/edgefleet/control.sock",
    ]


def test_same_inputs_and_epoch_give_the_same_bytes(tmp_path: Path) -> None:
    first = build(tmp_path / "a" / "layout", model_files(tmp_path / "a" / "model"))
    files = model_files(tmp_path / "b" / "elsewhere")
    for path in files.values():
        os.utime(path, (1, 1))
        path.chmod(0o600)
    second = build(tmp_path / "b" / "layout", files)
    assert second.digest == first.digest
    assert blobs(tmp_path / "a" / "layout") == blobs(tmp_path / "b" / "layout")
    later = build(tmp_path / "c" / "layout", files, source_date_epoch=EPOCH + 1)
    assert later.digest != first.digest


def test_the_epoch_comes_from_the_environment_or_defaults_to_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = model_files(tmp_path / "model")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    from_env = build(tmp_path / "env", files, source_date_epoch=None)
    assert from_env.digest == build(tmp_path / "explicit", files).digest
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    unset = build(tmp_path / "unset", files, source_date_epoch=None)
    index = json.loads(OCILayout(tmp_path / "unset").get(unset.digest))
    assert index["annotations"]["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(PackageError, match="SOURCE_DATE_EPOCH='yesterday' is not a whole number"):
        build(tmp_path / "bad", files, source_date_epoch=None)


def test_the_model_layer_is_shared_by_every_platform_and_stored_once(tmp_path: Path) -> None:
    result = build(tmp_path / "layout", model_files(tmp_path / "model"))
    layout = OCILayout(tmp_path / "layout")
    layers = {p: image(layout, p)[0]["layers"] for p in result.manifests}
    assert (
        len({json.dumps(layer) for per_platform in layers.values() for layer in per_platform}) == 2
    )
    model, serving = layers["linux/amd64"]
    assert (model["mediaType"], model["annotations"]) == (
        LAYER_TAR,
        {"dev.edgefleet.layer": "model"},
    )
    assert serving["mediaType"] == LAYER_TAR_GZIP
    # model + serving layers, and per platform a config and a manifest, and the index.
    assert len(blobs(tmp_path / "layout")) == 2 + 2 * 3 + 1


def test_configs_describe_their_platform_and_layers(tmp_path: Path) -> None:
    build(tmp_path / "layout", model_files(tmp_path / "model"))
    layout = OCILayout(tmp_path / "layout")
    manifest, config = image(layout, "linux/arm/v7")
    assert manifest["config"]["mediaType"] == CONFIG
    assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm", "v7")
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"][:1]] + [
        "sha256:"
        + hashlib.sha256(gzip.decompress(layout.get(manifest["layers"][1]["digest"]))).hexdigest()
    ]
    assert config["config"]["Entrypoint"] == ["edgefleet", "serve"]
    assert config["config"]["ExposedPorts"] == {"8500/tcp": {}}
    assert [h["created_by"] for h in config["history"]] == [
        "edgefleet package: model layer",
        "edgefleet package: serving layer",
    ]
    assert "variant" not in image(layout, "linux/arm64")[1]


def test_deps_are_asked_per_platform_and_go_below_the_model(tmp_path: Path) -> None:
    deps = FakeDeps(tmp_path / "deps")
    build(tmp_path / "layout", model_files(tmp_path / "model"), deps=deps)
    wanted = ("onnxruntime", "numpy", *SERVE_REQUIREMENTS)
    assert deps.calls == [
        (wanted, "linux/amd64"),
        (wanted, "linux/arm64"),
        (wanted, "linux/arm/v7"),
    ]
    layout = OCILayout(tmp_path / "layout")
    amd64, amd64_config = image(layout, "linux/amd64")
    arm64, _ = image(layout, "linux/arm64")
    roles = [layer["annotations"]["dev.edgefleet.layer"] for layer in amd64["layers"]]
    assert roles == ["deps", "edgefleet", "model", "serving"]
    assert amd64["layers"][0]["mediaType"] == LAYER_TAR_GZIP
    assert amd64["layers"][0] != arm64["layers"][0]
    assert amd64["layers"][1:] == arm64["layers"][1:]
    assert "PYTHONPATH=/opt/edgefleet/python" in amd64_config["config"]["Env"]


def test_a_platform_without_wheels_fails_or_is_skipped(tmp_path: Path) -> None:
    files = model_files(tmp_path / "model")
    deps = FakeDeps(tmp_path / "deps", missing=["linux/arm/v7"])
    with pytest.raises(UnavailableWheel, match="no onnxruntime wheel for linux/arm/v7"):
        build(tmp_path / "strict", files, deps=deps)
    result = build(tmp_path / "layout", files, deps=deps, skip_unavailable=True)
    assert list(result.manifests) == ["linux/amd64", "linux/arm64"]
    assert "no onnxruntime wheel for linux/arm/v7" in result.skipped["linux/arm/v7"]
    everything = FakeDeps(tmp_path / "deps", missing=["linux/amd64", "linux/arm64", "linux/arm/v7"])
    with pytest.raises(PackageError, match="no platform could be built"):
        build(tmp_path / "none", files, deps=everything, skip_unavailable=True)


def make_base_image(root: Path, platforms: list[str]) -> Path:
    """A multi-platform base image with one layer and some config, like a python:3.11 image."""
    layout = OCILayout.create(root)
    entries = []
    for name in platforms:
        platform = Platform.parse(name)
        layer = write_layer(
            layout,
            [Entry("etc/base-release", f"base for {platform}\n".encode())],
            role="os",
            compress=True,
            mtime=0,
        )
        config = layout.put(
            canonical_json(
                {
                    **platform.to_dict(),
                    "config": {
                        "Env": ["PATH=/usr/bin", "PYTHONPATH=/usr/lib/extra"],
                        "Cmd": ["python3"],
                    },
                    "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
                    "history": [{"created_by": "base"}],
                }
            ),
            CONFIG,
        )
        manifest = layout.put(
            canonical_json(
                {
                    "schemaVersion": 2,
                    "mediaType": MANIFEST,
                    "config": config.to_dict(),
                    "layers": [layer.descriptor.to_dict()],
                }
            ),
            MANIFEST,
        )
        entries.append({**manifest.to_dict(), "platform": platform.to_dict()})
    index = layout.put(
        canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}), INDEX
    )
    layout.tag("3.11", index)
    return root


@pytest.mark.parametrize("as_archive", [False, True])
def test_a_base_images_layers_go_at_the_bottom(tmp_path: Path, as_archive: bool) -> None:
    base = make_base_image(tmp_path / "base", ["linux/amd64", "linux/arm64"])
    if as_archive:
        write_archive(OCILayout(base), tmp_path / "base.tar")
        base = tmp_path / "base.tar"
    result = build(
        tmp_path / "layout",
        model_files(tmp_path / "model"),
        platforms=["linux/arm64", "linux/amd64"],
        base_image=base,
        deps=FakeDeps(tmp_path / "deps"),
    )
    layout = OCILayout(tmp_path / "layout")
    manifest, config = image(layout, "linux/arm64")
    roles = [layer["annotations"]["dev.edgefleet.layer"] for layer in manifest["layers"]]
    assert roles == ["base", "deps", "edgefleet", "model", "serving"]
    assert b"base for linux/arm64" in gzip.decompress(layout.get(manifest["layers"][0]["digest"]))
    assert config["config"]["Env"] == [
        "PATH=/usr/bin",
        "EDGEFLEET_SERVING=/opt/edgefleet/serving.json",
        "PYTHONPATH=/opt/edgefleet/python:/usr/lib/extra",
    ]
    assert config["config"]["Cmd"][0] == "--host"
    assert len(config["rootfs"]["diff_ids"]) == 5
    assert [h["created_by"] for h in config["history"]][:2] == [
        "base",
        "edgefleet package: deps layer",
    ]
    assert list(result.manifests) == ["linux/arm64", "linux/amd64"]


@needs_skopeo
@needs_umoci
def test_an_image_on_a_base_unpacks_with_both(tmp_path: Path) -> None:
    base = make_base_image(tmp_path / "base", ["linux/amd64"])
    build(
        tmp_path / "layout",
        model_files(tmp_path / "model"),
        platforms=["linux/amd64"],
        base_image=base,
    )
    rootfs = unpack_platform(tmp_path / "layout", TAG, tmp_path / "bundle", arch="amd64")
    assert (rootfs / "etc" / "base-release").read_text() == "base for linux/amd64\n"
    assert (rootfs / "opt" / "edgefleet" / "model" / "model.onnx").is_file()


def test_a_platform_missing_from_the_base_fails_or_is_skipped(tmp_path: Path) -> None:
    base = make_base_image(tmp_path / "base", ["linux/amd64", "linux/arm64"])
    files = model_files(tmp_path / "model")
    with pytest.raises(
        PlatformUnavailable, match="has no linux/arm/v7 image .it has linux/amd64, linux/arm64"
    ):
        build(tmp_path / "strict", files, base_image=base)
    result = build(tmp_path / "layout", files, base_image=base, skip_unavailable=True)
    assert list(result.skipped) == ["linux/arm/v7"]


def test_progress_is_reported_step_by_step(tmp_path: Path) -> None:
    events: list[BuildProgress] = []
    build(tmp_path / "layout", model_files(tmp_path / "model"), progress=events.append)
    assert [e.completed for e in events] == [0, 1, 2, 3, 4, 5, 6]
    assert {e.total for e in events} == {6}
    assert events[3].step == "image for linux/arm64"
    assert events[-1].step == "done"


def test_two_versions_in_one_layout_share_the_model_layer(tmp_path: Path) -> None:
    files = model_files(tmp_path / "model")
    build(tmp_path / "layout", files)
    build(tmp_path / "layout", files, version=3)
    layout = OCILayout(tmp_path / "layout")
    assert sorted(layout.refs()) == ["2", "3"]
    assert len(blobs(tmp_path / "layout")) == 2 + 2 * 3 + 1 + (1 + 3 * 2 + 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"platforms": ["linux"]}, "is not os/architecture"),
        ({"platforms": []}, "no platforms given"),
        ({"platforms": ["linux/arm64", "linux/arm64"]}, "named twice"),
        (
            {"runtime": "litert"},
            "runtime litert cannot run onnx models; use onnxruntime or openvino",
        ),
        ({"runtime": "tensorrt"}, "unknown runtime 'tensorrt'"),
        ({"info": ModelInfo(None, None, None)}, "framework is unknown"),
        ({"info": ModelInfo("onnx", "other.onnx", None)}, "entrypoint 'other.onnx' is not among"),
        (
            {"info": ModelInfo("onnx", "../model.onnx", None)},
            "entrypoint '../model.onnx' is not among",
        ),
        ({"tag": "v2:latest"}, "cannot be a tag"),
        ({"prefer": ["CUDA"]}, "is not runtime:DEVICE"),
    ],
)
def test_bad_options_fail_before_anything_is_written(
    tmp_path: Path, options: dict, message: str
) -> None:
    files = model_files(tmp_path / "model")
    with pytest.raises(PackageError, match=message):
        build(tmp_path / "layout", files, **options)
    assert not (tmp_path / "layout").exists()


def test_unclean_model_file_names_are_refused(tmp_path: Path) -> None:
    files = model_files(tmp_path / "model")
    with pytest.raises(PackageError, match="'../labels.txt': not a clean relative path"):
        build(tmp_path / "layout", {**files, "../labels.txt": files["assets/labels.txt"]})


def test_openvino_runs_onnx_when_asked(tmp_path: Path) -> None:
    build(tmp_path / "layout", model_files(tmp_path / "model"), runtime="openvino")
    layout = OCILayout(tmp_path / "layout")
    serving = serving_json(layout, image(layout, "linux/amd64")[0])
    assert serving["prefer"] == ["openvino:NPU", "openvino:GPU", "openvino:CPU"]


@needs_skopeo
def test_an_exported_archive_is_an_oci_archive(tmp_path: Path) -> None:
    result = build(tmp_path / "layout", model_files(tmp_path / "model"))
    write_archive(OCILayout(tmp_path / "layout"), tmp_path / "package.tar", mtime=EPOCH)
    raw = skopeo("inspect", "--raw", f"oci-archive:{tmp_path / 'package.tar'}:{TAG}")
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == result.digest


def test_a_model_without_signature_can_be_given_a_sample_request(tmp_path: Path) -> None:
    files = model_files(tmp_path / "model")
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0.5] * 6}]}
    build_package(
        tmp_path / "layout",
        name=NAME,
        version="2024.1",
        files=files,
        info=ModelInfo("onnx", "model.onnx", None),
        deps=None,
        sample_request=request,
        platforms=["linux/amd64"],
    )
    layout = OCILayout(tmp_path / "layout")
    index = json.loads(layout.get(layout.resolve("2024.1").digest))
    serving = serving_json(layout, json.loads(layout.get(index["manifests"][0]["digest"])))
    assert (serving["version"], serving["signature"]) == ("2024.1", None)
    assert serving["sample_request"] == request


def test_the_batching_default_is_measured_and_written_only_when_it_pays(tmp_path: Path) -> None:
    """The tiny linear model costs about the same for 32 rows as for one: batching on."""
    from agent.runtimes import time_on_cpu
    from packager.batching import PROBE_ROWS, measure_batching

    files = model_files(tmp_path / "model")
    info = inspect_model(files)
    assert info.signature is not None
    profile = measure_batching(time_on_cpu, "onnxruntime", files, "model.onnx",
                               info.signature.to_dict())
    assert profile.setting == {"max_batch_size": PROBE_ROWS, "max_delay_ms": 0}, profile.note
    assert profile.note.startswith("batching: on by default (32 rows in one call")
    build(tmp_path / "layout", files, batching=profile.setting)
    layout = OCILayout(tmp_path / "layout")
    assert serving_json(layout, image(layout, "linux/amd64")[0])["batching"] == profile.setting

    fixed = measure_batching(time_on_cpu, "onnxruntime", files, "model.onnx", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1]}]})
    assert fixed.setting is None and "not a free first (batch) dimension" in fixed.note
