"""`edgefleet serve --load NAME:VERSION` (EDGEFLEET_SERVE_LOAD): a serving pod in Kubernetes
mode loads and self-tests the package its image carries, with no agent at its control socket.

The layout is the package image's: /opt/edgefleet/serving.json (EDGEFLEET_SERVING) beside
/opt/edgefleet/model/. kwok's pods do not run, so this is where the pod's side is tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from contract.serving import sample_request, serving_document
from modelgen import expected_linear, make_failing_onnx, make_fixed_batch_onnx, make_onnx
from test_serving_process import API_KEY, SERVE, start_serve

SIGNATURE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}


def image_root(root: Path, make: object, batching: dict[str, int] | None = None) -> Path:
    """ROOT laid out as a package image's /opt/edgefleet, the model made by MAKE."""
    (root / "model").mkdir(parents=True)
    make(root / "model" / "model.onnx")  # type: ignore[operator]
    (root / "serving.json").write_text(json.dumps(serving_document(
        model="tiny", version=4, runtime="onnxruntime", framework="onnx",
        entrypoint="model.onnx", signature=SIGNATURE, prefer=["onnxruntime:CPU"],
        sample_request=sample_request(SIGNATURE), batching=batching)))
    return root / "serving.json"


def test_the_image_s_model_is_loaded_and_self_tested_before_it_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The package's batching default applies: no agent is there to say otherwise.
    monkeypatch.setenv("EDGEFLEET_SERVING", str(image_root(
        tmp_path / "opt", make_onnx, batching={"max_batch_size": 8, "max_delay_ms": 0})))
    served = start_serve(tmp_path / "run", "--load", "tiny:4")
    try:
        assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200
        rows = [[1.0, 2.0, 3.0]]
        with served.client() as client:
            answer = client.post("/v2/models/tiny/infer", json={"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": rows[0]}]}).json()
        assert answer["model_version"] == "4"
        assert np.allclose(answer["outputs"][0]["data"],
                           expected_linear(np.array(rows, dtype=np.float32)).ravel(), atol=1e-5)
        assert "self-test passed" in served.log()
        # The request went through the batcher (the self-test runs the model directly).
        assert served.metric('edgefleet_serving_batch_rows_count{model="tiny",version="4"}') == 1
    finally:
        assert served.stop() == 0


def test_a_failing_self_test_exits_non_zero_before_answering(tmp_path: Path) -> None:
    serving = image_root(tmp_path / "opt", make_failing_onnx)
    done = subprocess.run(
        [*SERVE, "--port", "0", "--control-socket", str(tmp_path / "serve.sock"),
         "--api-key", API_KEY], capture_output=True, text=True, timeout=120,
        env={**os.environ, "EDGEFLEET_SERVING": str(serving), "EDGEFLEET_SERVE_LOAD": "tiny:4"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"Error: could not load tiny:4: self-test of .* failed", done.stderr), \
        done.stderr
    assert not (tmp_path / "serve.sock").exists()


def test_a_bad_load_value_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*SERVE, "--control-socket", str(tmp_path / "s.sock"), "--no-auth",
                           "--load", "no version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not NAME:VERSION" in done.stderr, done.stderr


def test_the_deployments_batching_turns_batching_on_in_the_pod(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGEFLEET_SERVE_BATCHING (the Deployment's env) batches the image's model: concurrent
    requests share runtime calls."""
    monkeypatch.setenv("EDGEFLEET_SERVING", str(image_root(tmp_path / "opt", make_onnx)))
    monkeypatch.setenv("EDGEFLEET_SERVE_BATCHING", "16:20")
    served = start_serve(tmp_path / "run", "--load", "tiny:4")
    try:
        def ask() -> None:
            with served.client() as client:
                for _ in range(5):
                    assert client.post("/v2/models/tiny/infer", json={"inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [1, 3],
                         "data": [1.0, 2.0, 3.0]}]}).status_code == 200

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        labels = 'model="tiny",version="4"'
        calls = served.metric(f"edgefleet_serving_batch_rows_count{{{labels}}}")
        rows = served.metric(f"edgefleet_serving_batch_rows_sum{{{labels}}}")
        assert rows == 40 and calls < rows / 1.5, (calls, rows)
    finally:
        assert served.stop() == 0


def test_batching_a_model_that_cannot_exits_with_the_reason(tmp_path: Path) -> None:
    serving = image_root(tmp_path / "opt", make_fixed_batch_onnx)
    done = subprocess.run(
        [*SERVE, "--port", "0", "--control-socket", str(tmp_path / "serve.sock"),
         "--api-key", API_KEY, "--load", "tiny:4", "--batching", "8"], capture_output=True,
        text=True, timeout=120, env={**os.environ, "EDGEFLEET_SERVING": str(serving)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot batch: input 'x' has shape [1, 3]" in done.stderr, done.stderr


@pytest.mark.parametrize("args, complaint", [
    (("--load", "tiny:4", "--batching", "lots"), "batching 'lots': use SIZE[:DELAY_MS]"),
    (("--load", "tiny:4", "--batching", "8:5000"), "max_delay_ms: 5000 is outside 0..1000"),
    (("--batching", "8"), "--batching is about the model --load names"),
    (("--load", "tiny:4", "--sketch", "[{"), "--sketch: not JSON"),
    (("--load", "tiny:4", "--sketch", '[{"side": "input"}]'),
     "--sketch: sketch feature 0: expected side, tensor, column and edges"),
    (("--sketch", "[]"), "--sketch is about the model --load names"),
])
def test_a_bad_batching_or_sketch_value_is_one_line(tmp_path: Path, args: tuple[str, ...],
                                          complaint: str) -> None:
    done = subprocess.run([*SERVE, "--control-socket", str(tmp_path / "s.sock"), "--no-auth",
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and complaint in done.stderr, done.stderr
