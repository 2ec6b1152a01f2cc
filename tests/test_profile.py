"""`edgefleet model profile` against a real hub: tiny models run on every runtime here
(onnxruntime and OpenVINO for the ONNX model, LiteRT and OpenVINO for the TFLite one), each
in a child process of the agent's profiler; the rows are stored with the version, shown by
`model show --json`, and announced as a profile.done event. Bad input is refused with one
line. Few calls per batch size: these check the plumbing, not the numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Cli
from hubproc import HubProcess
from modelgen import make_fixed_batch_onnx, make_onnx, make_tflite

BATCHES = [1, 2, 4]


def register(hub: HubProcess, name: str, path: Path) -> None:
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers) as c:
        digest = c.post("/api/v1/blobs", content=path.read_bytes()).json()["digest"]
        c.post(f"/api/v1/models/{name}/versions",
               json={"files": [{"path": path.name, "digest": digest}]}).raise_for_status()


@pytest.fixture(scope="module")
def models(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("models")
    register(hub, "tiny", make_onnx(base / "model.onnx"))
    register(hub, "tinylite", make_tflite(base / "model.tflite"))
    register(hub, "tinyvar", make_onnx(base / "var" / "model.onnx"))
    register(hub, "fixed", make_fixed_batch_onnx(base / "fixed" / "model.onnx"))


def test_a_model_whose_batch_is_fixed_is_profiled_at_batch_size_1(
        cli: Cli, models: None) -> None:
    done = cli.run("model", "profile", "fixed:1", "--max-batch", "4", "--iterations", "2",
                   "--runtime", "onnxruntime", "--json")
    assert [r["batch"] for r in json.loads(done.stdout)] == [1]
    assert ("onnxruntime:CPU: only batch size 1 is profiled: input 'x' has shape [1, 3], not "
            "a free first (batch) dimension") in done.stderr


def test_each_packaged_variant_is_profiled_from_its_package(
        cli: Cli, hub: HubProcess, models: None) -> None:
    for variant, optimize in (("default", []), ("fp16", ["--optimize", "fp16"]),
                              ("int8", ["--optimize", "int8"])):
        cli.run("package", "build", "tinyvar:1", "--platform", "linux/amd64", "--variant",
                variant, *optimize, "--batching", "off", "--quiet")
    done = cli.run("model", "profile", "tinyvar:1", "--max-batch", "2", "--iterations", "3",
                   "--runtime", "onnxruntime", "--json")
    rows = json.loads(done.stdout)
    assert sorted({(r["variant"], r["runtime"]) for r in rows}) == [
        ("default", "onnxruntime"), ("fp16", "onnxruntime"), ("int8", "onnxruntime")]
    assert "fetch the int8 package of tinyvar:1" in done.stderr
    done = cli.run("model", "profile", "tinyvar:1", "--variant", "int8", "--max-batch", "1",
                   "--iterations", "2", "--json")
    assert {r["variant"] for r in json.loads(done.stdout)} == {"int8"}
    stored = cli.json("model", "show", "tinyvar:1")["profiles"]
    assert {r["variant"] for r in stored} == {"default", "fp16", "int8"}


def measured(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[int]]:
    """(runtime, device) -> the batch sizes measured on it."""
    found: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        found.setdefault((row["runtime"], row["device"]), []).append(row["batch"])
    return found


@pytest.mark.parametrize(("ref", "runtimes"), [("tiny:1", ["onnxruntime", "openvino"]),
                                               ("tinylite:1", ["litert", "openvino"])])
def test_a_profile_on_each_runtime_is_stored_and_shown(
        cli: Cli, hub: HubProcess, models: None, ref: str, runtimes: list[str]) -> None:
    done = cli.run("model", "profile", ref, "--max-batch", "4", "--iterations", "5", "--json")
    rows = json.loads(done.stdout)
    # No GPU or NPU here: each runtime lists only its CPU.
    assert measured(rows) == {(r, "CPU"): BATCHES for r in runtimes}
    for row in rows:
        assert row["device_class"] == "linux/amd64" and row["variant"] == "default"
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["throughput"] > 0
        assert row["iterations"] == 5 and row["peak_rss_bytes"] > 10 * 2**20  # numpy alone
    # Progress: a line per runtime and per batch size on stderr, stdout stays JSON.
    for runtime in runtimes:
        assert f"profile {ref} (default) on {runtime}:CPU" in done.stderr
        assert f"{runtime}:CPU batch 4: p50" in done.stderr

    shown = cli.json("model", "show", ref)
    assert measured(shown["profiles"]) == measured(rows)
    assert {r["profiled_by"] for r in shown["profiles"]} == {"admin"}
    people = cli.run("model", "show", ref).stdout
    assert "p99_ms" in people and " MiB" in people

    # Measuring again replaces the rows of the same key instead of adding to them.
    cli.run("model", "profile", ref, "--max-batch", "1", "--iterations", "2",
            "--runtime", runtimes[0])
    again = cli.json("model", "show", ref)["profiles"]
    assert measured(again) == measured(rows)
    assert [r["iterations"] for r in again if r["runtime"] == runtimes[0] and r["batch"] == 1
            ] == [2]

    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    page = httpx.get(f"{hub.url}/api/v1/events", params={"type": "profile.done"},
                     headers=headers).json()
    assert ref in [e["subject"] for e in page["events"]]


def test_bad_input_is_refused_clearly(cli: Cli, hub: HubProcess, models: None) -> None:
    for batch in ("0", "257"):
        done = cli.run("model", "profile", "tiny:1", "--max-batch", batch, ok=False)
        assert done.returncode == 2 and "from 1 to 256" in done.stderr
    done = cli.run("model", "profile", "tiny:1", "--iterations", "0", ok=False)
    assert done.returncode == 2 and "--iterations" in done.stderr
    done = cli.run("model", "profile", "../etc:1", ok=False)
    assert done.returncode == 2 and "model name '../etc'" in done.stderr
    done = cli.run("model", "profile", "tiny:99", ok=False)
    assert done.returncode == 1 and "has no version 99" in done.stderr
    # No runtime here reads TFLite among those asked for.
    done = cli.run("model", "profile", "tinylite:1", "--runtime", "onnxruntime", ok=False)
    assert done.returncode == 1
    assert "no runtime here can load tinylite:1 (default, tflite)" in done.stderr
    assert "nothing could be profiled of tinylite:1" in done.stderr
    done = cli.run("model", "profile", "tiny:1", "--variant", "int8", ok=False)
    assert done.returncode == 1 and "tiny:1 has no package of variant int8 (it has none)" in (
        done.stderr)
    done = cli.run("model", "profile", "tiny:1", "--variant", "../x", ok=False)
    assert done.returncode == 2 and "--variant" in done.stderr

    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    good = {"device_class": "linux/amd64", "runtime": "onnxruntime", "device": "CPU",
            "variant": "default", "batch": 1, "iterations": 5, "p50_ms": 0.1, "p99_ms": 0.2,
            "throughput": 100.0, "peak_rss_bytes": 1000}
    for bad, why in [({"device_class": "windows/amd64"}, "not a device platform"),
                     ({"runtime": "tensorflow"}, "runtime 'tensorflow' is unknown"),
                     ({"device": "CPU\u202e"}, "not a device name"),
                     ({"variant": "../x"}, "variant"),
                     ({"batch": 0}, "outside 1..256"),
                     ({"p50_ms": 3.0}, "above its p99_ms"),
                     ({"throughput": -1.0}, "at least 0")]:
        answer = httpx.post(f"{hub.url}/api/v1/models/tiny/versions/1/profiles",
                            json={"host": "lab", "rows": [{**good, **bad}]}, headers=headers)
        assert answer.status_code == 422 and why in answer.text, (bad, answer.text)
    answer = httpx.post(f"{hub.url}/api/v1/models/tiny/versions/1/profiles",
                        json={"host": "lab\x1b[2J", "rows": [good]}, headers=headers)
    assert answer.status_code == 422 and "control characters" in answer.text
    answer = httpx.post(f"{hub.url}/api/v1/models/tiny/versions/7/profiles",
                        json={"host": "lab", "rows": [good]}, headers=headers)
    assert answer.status_code == 404
