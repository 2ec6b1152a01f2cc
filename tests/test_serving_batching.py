"""Adaptive batching and the wait budget.

Batched answers equal unbatched ones on every runtime installed; a bad request
in a batch fails alone; concurrent requests to a serving process really share
runtime calls (the batch-rows histogram says so) and each gets its own rows
back; a model without a free batch dimension refuses batching at load.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent.runtimes import load_best
from agent.runtimes.base import LoadedModel, LoadOptions
from agent.serving.batching import batch_key, run_batch, unbatchable
from agent.serving.body import BodyError, read
from agent.serving.errors import Overloaded
from agent.serving.limits import Limiter
from agent.serving.oip import messages
from contract.settings import Batching, SettingsError
from contract.tensors import Signature, TensorSpec
from modelgen import expected_linear, make_onnx, make_openvino_ir, make_tflite
from test_serving_grpc import call, grpc_address
from test_serving_load import _request, _rows_for, _wait_for, make_slow_onnx
from test_serving_process import ServeProcess, onnx_version, start_serve

ROWS = (1, 3, 2, 1, 5)


def _inputs(seed: int, rows: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)}


def _model(tmp: Path, runtime: str) -> LoadedModel:
    onnx = make_onnx(tmp / "model.onnx")
    if runtime == "onnxruntime":
        return load_best(tmp, "model.onnx", "onnx", LoadOptions(prefer=("onnxruntime:CPU",)))
    if runtime == "openvino":
        pytest.importorskip("openvino")
        make_openvino_ir(onnx, tmp)
        return load_best(tmp, "model.xml", "openvino",
                         LoadOptions(prefer=("openvino:CPU",), precision="f32"))
    pytest.importorskip("ai_edge_litert")
    make_tflite(tmp / "model.tflite")
    return load_best(tmp, "model.tflite", "tflite", LoadOptions(prefer=("litert:CPU",)))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "litert"])
def test_batched_answers_equal_unbatched_ones(tmp_path: Path, runtime: str) -> None:
    model = _model(tmp_path, runtime)
    try:
        assert model.runtime == runtime
        assert unbatchable(model.signature) is None
        batch = [_inputs(seed, rows) for seed, rows in enumerate(ROWS)]
        assert len({batch_key(inputs) for inputs in batch}) == 1
        calls: list[int] = []

        def infer(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            calls.append(len(inputs["x"]))
            return model.infer(inputs)

        merged = run_batch(infer, batch)
        assert calls == [sum(ROWS)]  # one runtime call for them all
        for inputs, result in zip(batch, merged, strict=True):
            assert not isinstance(result, Exception)
            alone = model.infer(inputs)
            assert result.keys() == alone.keys()
            for name in alone:
                assert result[name].shape == alone[name].shape
                # Same values; a runtime may pick another kernel for another batch size,
                # so equal to float32 rounding rather than bit for bit.
                np.testing.assert_allclose(result[name], alone[name], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(result["y"], expected_linear(inputs["x"]), atol=1e-5)
    finally:
        model.close()


def test_a_failing_batch_runs_each_request_alone(tmp_path: Path) -> None:
    model = _model(tmp_path, "onnxruntime")
    try:
        good = _inputs(0, 2)
        bad = {"x": np.ones((1, 3), np.float64)}  # wrong dtype: the merged call fails
        results = run_batch(model.infer, [good, bad, good])
        assert isinstance(results[1], Exception)
        for result in (results[0], results[2]):
            assert not isinstance(result, Exception)
            np.testing.assert_allclose(result["y"], expected_linear(good["x"]), atol=1e-5)
    finally:
        model.close()


def test_requests_of_other_shapes_never_share_a_call() -> None:
    assert batch_key(_inputs(0, 2)) != batch_key({"x": np.ones((2, 4), np.float32)})
    assert batch_key(_inputs(0, 2)) == batch_key(_inputs(1, 7))
    assert batch_key({"a": np.ones((2, 1)), "b": np.ones((3, 1))}) is None


def test_only_models_with_a_free_batch_dimension_batch() -> None:
    fixed = Signature((TensorSpec("x", "FP32", (1, 3)),), (TensorSpec("y", "FP32", (-1, 2)),))
    assert unbatchable(fixed) == "input 'x' has shape [1, 3], not a free first (batch) dimension"
    unknown = Signature((TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", ()),))
    assert "output 'y' has shape unknown" in (unbatchable(unknown) or "")


def test_batching_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match=r"max_delay_ms: 5000 is outside 0\.\.1000"):
        Batching(8, 5000)
    with pytest.raises(BodyError, match="max_batch_size: must be between 2 and 4096"):
        read({"version": "1", "model_dir": "/m", "entrypoint": "model.onnx", "framework": "onnx",
              "batching": {"max_batch_size": 1}})  # off is no batching field


# ---- the wait budget ------------------------------------------------------------------


def test_a_request_that_would_wait_over_budget_is_refused_at_once() -> None:
    async def scenario() -> None:
        limiter = Limiter(max_concurrency=2, max_queue=100, max_wait=0.2)
        # two slow requests (0.15 s each) run, a third waits 0.15 s (0.3 s of work, 2 slots);
        # a fourth would wait 0.225 s
        for _ in range(2):
            await limiter.acquire(0.15)
        queued = asyncio.create_task(limiter.acquire(0.15))
        await asyncio.sleep(0)
        assert limiter.estimated_wait() == pytest.approx(0.225)
        with pytest.raises(Overloaded) as refused:
            await limiter.acquire(0.15)
        assert "wait about 225 ms, over its budget of 200 ms" in refused.value.message
        assert refused.value.retry_after == 1
        # many sub-millisecond requests fit in the same budget
        fast = Limiter(max_concurrency=2, max_queue=100, max_wait=0.1)
        await fast.acquire(0.0005)
        await fast.acquire(0.0005)
        waiting = [asyncio.create_task(fast.acquire(0.0005)) for _ in range(30)]
        await asyncio.sleep(0)
        assert fast.waiting == 30
        for _ in range(32):
            fast.release(0.0005)
            await asyncio.sleep(0)
        await asyncio.gather(*waiting)
        limiter.release(0.15)
        await queued

    asyncio.run(scenario())


# ---- in a serving process ------------------------------------------------------------
# Requests that arrive while the only slot is busy wait in the batcher, so those sent while
# a slow request computes all share the next call: no timing decides what is batched.

ROWS_OF = [1 + i % 3 for i in range(12)]
LABELS = 'model="linear",version="1"'


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("batching")
    process = start_serve(tmp / "serve", "--max-concurrency", "1", "--max-wait-ms", "0",
                          "--grpc-port", "0")
    try:
        model = make_onnx(tmp / "linear/model.onnx").parent
        process.deploy("linear", onnx_version(model, "1", batching={"max_batch_size": 64}))
        process.deploy("slow", onnx_version(make_slow_onnx(tmp / "slow/model.onnx"), "1",
                                            runtime={"threads": 1}))
        yield process
    finally:
        assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


def _while_the_slot_is_busy(served: ServeProcess, send: list[threading.Thread]) -> None:
    """Start SEND while a slow request holds the only slot; return when all are answered."""
    with served.client() as client:
        rows = _rows_for(client, "/v2/models/slow/infer", seconds=2.0)
        busy = threading.Thread(target=lambda: client.post("/v2/models/slow/infer",
                                                           json=_request(rows)))
        busy.start()
        _wait_for(lambda: served.metric("edgefleet_serving_in_flight") == 1)
        for t in send:
            t.start()
        _wait_for(lambda: served.metric("edgefleet_serving_queue_depth") == len(send))
        busy.join()
    for t in send:
        t.join()


def _batches(served: ServeProcess) -> tuple[float, float]:
    return (served.metric(f"edgefleet_serving_batch_rows_count{{{LABELS}}}"),
            served.metric(f"edgefleet_serving_batch_rows_sum{{{LABELS}}}"))


def test_requests_that_wait_share_one_call_and_get_their_own_rows(served: ServeProcess) -> None:
    answers: dict[int, tuple[int, list[float]]] = {}

    def score(i: int) -> None:
        x = _inputs(i, ROWS_OF[i])["x"]
        with served.client() as client:
            answer = client.post("/v2/models/linear/infer", json={"inputs": [
                {"name": "x", "datatype": "FP32", "shape": list(x.shape),
                 "data": x.ravel().tolist()}]})
        answers[i] = (answer.status_code, answer.json()["outputs"][0]["data"])

    calls, rows = _batches(served)
    _while_the_slot_is_busy(served, [threading.Thread(target=score, args=(i,))
                                     for i in range(len(ROWS_OF))])
    for i, (status, data) in answers.items():
        assert status == 200
        np.testing.assert_allclose(data, expected_linear(_inputs(i, ROWS_OF[i])["x"]).ravel(),
                                   atol=1e-5)
    assert len(answers) == len(ROWS_OF)
    assert _batches(served) == (calls + 1, rows + sum(ROWS_OF))


def test_grpc_requests_are_batched_too(served: ServeProcess) -> None:
    answers: dict[int, np.ndarray] = {}

    def score(i: int, channel: grpc.Channel) -> None:
        x = _inputs(100 + i, ROWS_OF[i])["x"]
        request = messages.ModelInferRequest(model_name="linear")
        request.inputs.add(name="x", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        response = call(channel, "ModelInfer", request)
        answers[i] = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(
            tuple(response.outputs[0].shape))

    calls, rows = _batches(served)
    with grpc.insecure_channel(grpc_address(served)) as channel:
        _while_the_slot_is_busy(served, [threading.Thread(target=score, args=(i, channel))
                                         for i in range(len(ROWS_OF))])
    for i, y in answers.items():
        np.testing.assert_allclose(y, expected_linear(_inputs(100 + i, ROWS_OF[i])["x"]),
                                   atol=1e-5)
    assert len(answers) == len(ROWS_OF)
    assert _batches(served) == (calls + 1, rows + sum(ROWS_OF))


def test_batching_a_model_without_a_batch_dimension_is_refused(
    served: ServeProcess, tmp_path: Path
) -> None:
    fixed = make_onnx(tmp_path / "fixed/model.onnx", batch=1).parent
    with served.control() as control:
        answer = control.put("/control/deployments/fixed", json=onnx_version(
            fixed, "1", batching={"max_batch_size": 8}))
    assert answer.status_code == 422
    assert answer.json() == {"error": "version '1' cannot batch: input 'x' has shape [1, 3],"
                                      " not a free first (batch) dimension"}


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("budget")
    process = start_serve(tmp / "serve", "--max-concurrency", "1", "--max-wait-ms", "100",
                          "--grpc-port", "0")
    try:
        process.deploy("slow", onnx_version(make_slow_onnx(tmp / "slow/model.onnx"), "1",
                                            runtime={"threads": 1}))
        yield process
    finally:
        assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


def test_over_the_wait_budget_is_503_at_once_over_rest_and_grpc(slow: ServeProcess) -> None:
    with slow.client() as client:
        # Seconds per request, measured once, so the server knows this version's pace; 3,
        # not 1: a measurement slowed by a busy machine makes the request too short to
        # still be running when the gRPC call below comes (failed once so).
        rows = _rows_for(client, "/v2/models/slow/infer", seconds=3.0)
        assert client.post("/v2/models/slow/infer", json=_request(rows)).status_code == 200
        statuses: list[int] = []
        running = threading.Thread(target=lambda: statuses.append(
            client.post("/v2/models/slow/infer", json=_request(rows)).status_code))
        running.start()
        _wait_for(lambda: slow.metric("edgefleet_serving_in_flight") == 1)
        with slow.client() as other:
            refused = other.post("/v2/models/slow/infer", json=_request(1))
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "over its budget of 100 ms" in refused.json()["error"]

        request = messages.ModelInferRequest(model_name="slow")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
            [1.0, 2.0, 3.0])
        with grpc.insecure_channel(grpc_address(slow)) as channel:
            with pytest.raises(grpc.RpcError) as error:
                call(channel, "ModelInfer", request)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "over its budget of 100 ms" in error.value.details()
        assert dict(error.value.trailing_metadata())["retry-after"] >= "1"
        running.join()
    assert statuses == [200]
    assert slow.metric('edgefleet_serving_rejected_total{model="slow"}') == 2
