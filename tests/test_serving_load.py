"""Under load: a full queue answers 503 with Retry-After, the event loop stays free, shadow
copies are dropped rather than slowing primary traffic.

A real slow model makes the load: the linear model plus a chain of [N, 512] x [512, 512]
products whose result is multiplied by zero, so its answers are still the linear model's
and its time grows with the rows N of the request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelgen import LINEAR_B, LINEAR_W, ONNX_IR_VERSION, ONNX_OPSET, expected_linear, make_onnx
from test_serving_process import ServeProcess, onnx_version, start_serve

SLOW_ROUNDS = 8
WIDTH = 512


def make_slow_onnx(path: Path) -> Path:
    """y = x @ LINEAR_W + LINEAR_B + 0 * sum(((x @ P) @ M) @ M ...), input "x" FP32 [N, 3]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xW"]),
        helper.make_node("Add", ["xW", "b"], ["linear"]),
        helper.make_node("MatMul", ["x", "P"], ["h0"]),
        *(helper.make_node("MatMul", [f"h{i}", "M"], [f"h{i + 1}"]) for i in range(SLOW_ROUNDS)),
        helper.make_node("ReduceSum", [f"h{SLOW_ROUNDS}"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["linear", "nothing"], ["y"]),
    ]
    constants = {
        "W": LINEAR_W,
        "b": LINEAR_B,
        "P": np.full((3, WIDTH), 1 / 3, np.float32),
        "M": np.full((WIDTH, WIDTH), 1 / WIDTH, np.float32),  # averages: values stay finite
        "zero": np.zeros((), np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path.parent


def _request(rows: int) -> dict[str, object]:
    x = np.tile(np.array([1.0, 2.0, 3.0], np.float32), (rows, 1))
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 3],
                        "data": x.ravel().tolist()}]}


def _rows_for(client: httpx.Client, path: str, seconds: float) -> int:
    """How many rows make one request to PATH take about SECONDS on this machine."""
    rows = 256
    start = time.perf_counter()
    assert client.post(path, json=_request(rows)).status_code == 200
    took = time.perf_counter() - start
    return int(min(max(rows * seconds / took, rows), 200_000))


def _wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slow_onnx(tmp_path_factory.mktemp("slow") / "model.onnx")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, slow_dir: Path) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("load")
    # --max-wait-ms 0: the count alone limits the queue here (the wait budget has its own test)
    process = start_serve(tmp / "serve", "--max-concurrency", "1", "--max-queue", "1",
                          "--max-wait-ms", "0")
    try:
        process.deploy("slow", onnx_version(slow_dir, "1", runtime={"threads": 1}))
        process.deploy("fast", {
            **onnx_version(make_onnx(tmp / "fast/model.onnx").parent, "1"),
            "candidate": onnx_version(slow_dir, "2", runtime={"threads": 1}),
            "shadow": True, "traffic": 100,
        })
        yield process
    finally:
        assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


def test_full_queue_is_503_with_retry_after_and_the_loop_stays_free(served: ServeProcess) -> None:
    with served.client() as client:
        rows = _rows_for(client, "/v2/models/slow/infer", seconds=1.5)
        statuses: list[int] = []

        def score() -> None:
            with served.client() as own:
                statuses.append(own.post("/v2/models/slow/infer", json=_request(rows)).status_code)

        running = threading.Thread(target=score)
        running.start()
        _wait_for(lambda: served.metric("edgefleet_serving_in_flight") == 1)
        queued = threading.Thread(target=score)
        queued.start()
        _wait_for(lambda: served.metric("edgefleet_serving_queue_depth") == 1)

        # while the only slot computes, the loop still answers at once
        start = time.perf_counter()
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/models/slow").status_code == 200
        assert time.perf_counter() - start < 0.5

        turned_away = client.post("/v2/models/slow/infer", json=_request(1))
        assert turned_away.status_code == 503
        assert turned_away.headers["retry-after"] == "1"
        assert turned_away.json() == {
            "error": "the server is at capacity (1 inferences running, 1 waiting); retry later"
        }
        running.join()
        queued.join()
    assert statuses == [200, 200]
    assert served.metric('edgefleet_serving_rejected_total{model="slow"}') == 1
    assert served.metric("edgefleet_serving_in_flight") == 0


def test_shadow_copies_are_dropped_while_the_candidate_is_busy(served: ServeProcess) -> None:
    with served.client() as client:
        # the shadow candidate (the slow model) needs about a second per copy of this size
        rows = _rows_for(client, "/v2/models/fast/versions/2/infer", seconds=1.0)
        x = np.tile(np.array([1.0, 2.0, 3.0], np.float32), (rows, 1))
        start = time.perf_counter()
        for _ in range(10):
            body = client.post("/v2/models/fast/infer", json=_request(rows)).json()
            assert body["model_version"] == "1"
            assert np.allclose(body["outputs"][0]["data"], expected_linear(x).ravel(), atol=1e-5)
        primary_seconds = time.perf_counter() - start
    labels = '{model="fast",version="2"}'
    _wait_for(lambda: served.metric(f"edgefleet_serving_shadow_requests_total{labels}")
              + served.metric(f"edgefleet_serving_shadow_dropped_total{labels}") == 10)
    # the first copy keeps the candidate busy for about a second; copies meanwhile are dropped
    assert served.metric(f"edgefleet_serving_shadow_dropped_total{labels}") >= 5
    assert primary_seconds < 5, f"primary traffic waited for its shadow: {primary_seconds:.1f}s"
    _wait_for(lambda: served.metric(
        'edgefleet_serving_shadow_agreement_total{model="fast",version="2",result="agree"}'
    ) == served.metric(f"edgefleet_serving_shadow_requests_total{labels}"))
