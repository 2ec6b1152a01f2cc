"""The Open Inference Protocol over HTTP: tritonclient as is, plain JSON, errors, auth, metrics."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelgen import (
    ONNX_IR_VERSION,
    ONNX_OPSET,
    expected_linear,
    make_onnx,
    make_openvino_ir,
    make_tflite,
)
from test_serving_process import API_KEY, ServeProcess, onnx_version, start_serve

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def auth() -> dict[str, str]:
    """Headers for one tritonclient call: it adds its own to the dict it is given."""
    return dict(AUTH)


def make_string_echo(path: Path) -> Path:
    """Input "s" BYTES [N] -> output "t", the same strings."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "echo",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("protocol")
    process = start_serve(tmp / "serve")
    try:
        process.deploy("linear", onnx_version(make_onnx(tmp / "linear/model.onnx").parent, "1"))
        process.deploy("echo", onnx_version(make_string_echo(tmp / "echo/model.onnx").parent, "1"))
        yield process
    finally:
        assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


@pytest.fixture
def client(served: ServeProcess) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


@pytest.fixture
def triton(served: ServeProcess) -> Iterator[Any]:
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
    yield c
    c.close()


def _x_request(**extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.ravel().tolist()}],
        **extra,
    }


# ---- tritonclient, unchanged -------------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_tritonclient_round_trip(triton: Any, binary_in: bool, binary_out: bool) -> None:
    import tritonclient.http as httpclient

    x = httpclient.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X, binary_data=binary_in)
    y = httpclient.InferRequestedOutput("y", binary_data=binary_out)
    result = triton.infer("linear", [x], outputs=[y], request_id="r-1", headers=auth())
    assert np.allclose(result.as_numpy("y"), expected_linear(X), atol=1e-6)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out


def test_tritonclient_metadata_health_and_default_binary_outputs(triton: Any) -> None:
    import tritonclient.http as httpclient

    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("linear", headers=auth())
    assert triton.is_model_ready("linear", "1", headers=auth())
    assert not triton.is_model_ready("linear", "7", headers=auth())
    server = triton.get_server_metadata(headers=auth())
    assert server["name"] == "edgefleet" and "binary_tensor_data" in server["extensions"]
    model = triton.get_model_metadata("linear", headers=auth())
    assert model == {
        "name": "linear",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
    assert triton.get_model_metadata("linear", "1", headers=auth()) == model
    # no outputs named: tritonclient asks for every output in binary
    x = httpclient.InferInput("x", list(X.shape), "FP32").set_data_from_numpy(X)
    result = triton.infer("linear", [x], model_version="1", headers=auth())
    assert np.allclose(result.as_numpy("y"), expected_linear(X), atol=1e-6)
    assert result.get_output("y")["parameters"]["binary_data_size"] == X.shape[0] * 2 * 4


def test_tritonclient_sees_the_servers_errors(triton: Any) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    wrong = np.ones((2, 4), dtype=np.float32)
    x = httpclient.InferInput("x", [2, 4], "FP32").set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("linear", [x], headers=auth())
    assert raised.value.status() == "400"
    assert raised.value.message() == "input 'x': expected FP32 [-1, 3], got FP32 [2, 4]"
    with pytest.raises(InferenceServerException) as raised:
        triton.get_model_metadata("linear")
    assert raised.value.status() == "401"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_bytes_round_trip(triton: Any, binary: bool) -> None:
    import tritonclient.http as httpclient

    words = np.array(["hello", "wörld", ""], dtype=object)
    s = httpclient.InferInput("s", [3], "BYTES").set_data_from_numpy(words, binary_data=binary)
    t = httpclient.InferRequestedOutput("t", binary_data=binary)
    result = triton.infer("echo", [s], outputs=[t], headers=auth())
    assert [bytes(v) if binary else v for v in result.as_numpy("t")] == (
        [w.encode() for w in words] if binary else list(words)
    )


@pytest.mark.parametrize(
    ("framework", "prefer", "runtime"),
    [("onnx", "onnxruntime:CPU", "onnxruntime"), ("onnx", "openvino:CPU", "openvino"),
     ("openvino", "openvino:CPU", "openvino"), ("tflite", "litert:CPU", "litert")],
)
def test_every_runtime_serves_the_same_answers(
    served: ServeProcess, tmp_path: Path, framework: str, prefer: str, runtime: str
) -> None:
    onnx_path = make_onnx(tmp_path / "model.onnx")
    entrypoint = {
        "onnx": lambda: onnx_path,
        "openvino": lambda: make_openvino_ir(onnx_path, tmp_path / "ir"),
        "tflite": lambda: make_tflite(tmp_path / "tfl/model.tflite"),
    }[framework]()
    name = f"on-{runtime}-{framework}"
    loaded = served.deploy(name, {
        "version": "1", "model_dir": str(entrypoint.parent), "entrypoint": entrypoint.name,
        "framework": framework, "runtime": {"prefer": [prefer]},
    })
    assert loaded["deployment"]["primary"]["runtime"] == runtime
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                   "parameters": {"binary_data_size": X.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    with served.client() as client:
        as_json = client.post(f"/v2/models/{name}/infer", json=_x_request())
        as_binary = client.post(f"/v2/models/{name}/infer", content=head + X.tobytes(),
                                headers={"Inference-Header-Content-Length": str(len(head))})
    assert as_json.status_code == as_binary.status_code == 200, as_json.text + as_binary.text
    assert np.allclose(as_json.json()["outputs"][0]["data"], expected_linear(X).ravel(), atol=1e-5)
    length = int(as_binary.headers["inference-header-content-length"])
    values = np.frombuffer(as_binary.content[length:], dtype="<f4").reshape(2, 2)
    assert np.allclose(values, expected_linear(X), atol=1e-5)


# ---- plain JSON ------------------------------------------------------------------


def test_json_nested_and_flat_data_and_id_echo(client: httpx.Client) -> None:
    nested = client.post("/v2/models/linear/infer", json={
        "id": "n-1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.tolist()}],
    })
    flat = client.post("/v2/models/linear/versions/1/infer", json=_x_request())
    assert nested.status_code == flat.status_code == 200
    assert nested.headers["content-type"] == "application/json"
    body = nested.json()
    assert body["id"] == "n-1" and body["model_name"] == "linear" and body["model_version"] == "1"
    assert "id" not in flat.json()
    (y,) = body["outputs"]
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [2, 2]
    assert np.allclose(y["data"], expected_linear(X).ravel(), atol=1e-6)
    assert flat.json()["outputs"] == body["outputs"]


def test_requested_outputs_filter_and_choose_binary(client: httpx.Client) -> None:
    only_y = client.post("/v2/models/linear/infer", json=_x_request(
        outputs=[{"name": "y", "parameters": {"binary_data": True}}]
    ))
    assert only_y.status_code == 200
    assert only_y.headers["content-type"] == "application/octet-stream"
    length = int(only_y.headers["inference-header-content-length"])
    header = json.loads(only_y.content[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
    values = np.frombuffer(only_y.content[length:], dtype="<f4").reshape(2, 2)
    assert np.allclose(values, expected_linear(X), atol=1e-6)
    # the request-wide default, overridden per output
    as_json = client.post("/v2/models/linear/infer", json=_x_request(
        parameters={"binary_data_output": True},
        outputs=[{"name": "y", "parameters": {"binary_data": False}}],
    ))
    assert "data" in as_json.json()["outputs"][0]


def test_binary_input_by_hand(client: httpx.Client) -> None:
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                   "parameters": {"binary_data_size": X.nbytes}}]}).encode()
    answer = client.post("/v2/models/linear/infer", content=head + X.astype("<f4").tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(head))})
    assert answer.status_code == 200, answer.text
    assert np.allclose(answer.json()["outputs"][0]["data"], expected_linear(X).ravel(), atol=1e-6)


def test_sequential_requests_are_not_held_by_delayed_acks(client: httpx.Client) -> None:
    # Without TCP_NODELAY on accepted sockets each answer waited ~40 ms for an ACK.
    start = time.perf_counter()
    for _ in range(50):
        assert client.post("/v2/models/linear/infer", json=_x_request()).status_code == 200
    assert time.perf_counter() - start < 1.5


# ---- bad requests: 400 with exactly what is wrong --------------------------------

ONE = {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [{**ONE, "name": "z"}]},
         "unknown input 'z'; the model's inputs are: 'x' FP32 [-1, 3]"),
        ({"inputs": []}, "missing input 'x'; the model's inputs are: 'x' FP32 [-1, 3]"),
        ({}, "the request needs an 'inputs' list"),
        ({"inputs": [ONE, ONE]}, "input 'x' is given more than once"),
        ({"inputs": [{**ONE, "datatype": "FP64"}]},
         "input 'x': expected FP32 [-1, 3], got FP64 [1, 3]"),
        ({"inputs": [{**ONE, "shape": [3]}]}, "input 'x': expected FP32 [-1, 3], got FP32 [3]"),
        ({"inputs": [{**ONE, "shape": [2, 4], "data": [0] * 8}]},
         "input 'x': expected FP32 [-1, 3], got FP32 [2, 4]"),
        ({"inputs": [{**ONE, "shape": [2, 3], "data": [1, 2, 3, 4, 5]}]},
         "input 'x': shape [2, 3] needs 6 values, got 5"),
        ({"inputs": [{**ONE, "shape": [-1, 3]}]},
         "input 'x': 'shape' must be a list of non-negative integers, got [-1, 3]"),
        ({"inputs": [{**ONE, "data": [1, "two", 3]}]}, "input 'x': FP32 data must be numbers"),
        ({"inputs": [{**ONE, "data": [[1, 2], [3]]}]}, "input 'x': 'data' is a ragged nested list"),
        ({"inputs": [{**ONE, "data": [1, None, 3]}]}, "input 'x': FP32 data must be numbers"),
        ({"inputs": [{**ONE, "data": [1e300, 0, 0]}]},
         "input 'x': a value is out of range for FP32"),
        ({"inputs": [{k: v for k, v in ONE.items() if k != "data"}]},
         "input 'x' needs a 'data' list or parameters.binary_data_size"),
        ({"inputs": [ONE], "outputs": [{"name": "z"}]},
         "unknown output 'z'; the model's outputs are: 'y' FP32 [-1, 2]"),
        ({"inputs": [ONE], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
         "output 'y': the classification extension is not supported; request the raw output"),
        ({"inputs": [{**ONE, "parameters": {"shared_memory_region": "r"}}]},
         "input 'x': shared memory is not supported; send the data in the request"),
        ({"id": 7, "inputs": [ONE]}, "'id' must be a string"),
        ([ONE], "the inference request must be a JSON object"),
    ],
)
def test_bad_json_requests_are_400_with_the_reason(
    client: httpx.Client, body: Any, message: str
) -> None:
    answer = client.post("/v2/models/linear/infer", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": message}


def _binary(x_size: int, blob: bytes, *, length: str | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                   "parameters": {"binary_data_size": x_size}}]}).encode()
    return head + blob, {"Inference-Header-Content-Length": length or str(len(head))}


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_binary(20, bytes(20)), "input 'x': shape [2, 3] of FP32 needs 24 bytes, got 20"),
        (_binary(24, bytes(20)),
         "input 'x': binary_data_size 24 reaches past the end of the binary data (20 bytes left)"),
        (_binary(24, bytes(28)),
         "4 bytes of binary data follow the JSON header but no input's binary_data_size accounts"
         " for them"),
        (_binary(24, bytes(24), length="9999"),
         "Inference-Header-Content-Length is '9999'; it must be the size in bytes of the JSON"
         " header, between 0 and the body's"),
        ((b"{not json", {}), "malformed JSON in the inference request: "),
        ((b"\xff\xfe", {}), "malformed JSON in the inference request: "),
        ((json.dumps({"inputs": [ONE]}).encode(), {"Content-Encoding": "gzip"}),
         "Content-Encoding gzip is not supported; send the body uncompressed"),
    ],
)
def test_bad_binary_requests_are_400_with_the_reason(
    client: httpx.Client, request_: tuple[bytes, dict[str, str]], message: str
) -> None:
    body, headers = request_
    answer = client.post("/v2/models/linear/infer", content=body, headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(message)


def test_unknown_models_versions_and_paths_are_404_wrong_methods_405(client: httpx.Client) -> None:
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        missing = client.get(path)
        assert missing.status_code == 404
        assert missing.json()["error"].startswith("no model named 'nope'; loaded: echo, linear")
    wrong = client.post("/v2/models/linear/versions/9/infer", json=_x_request())
    assert wrong.status_code == 404
    assert wrong.json() == {"error": "model 'linear' has no version '9'; loaded: 1"}
    assert client.get("/v2/nothing-here").status_code == 404
    assert "error" in client.get("/v2/nothing-here").json()
    for path in ("/v2/models/linear/infer", "/v2/models/linear/versions/1/infer"):
        not_allowed = client.get(path)
        assert not_allowed.status_code == 405
        assert not_allowed.headers["allow"] == "POST"
        assert not_allowed.json() == {"error": f"Method Not Allowed: GET {path}"}


def test_api_key_required_except_for_health(served: ServeProcess) -> None:
    with httpx.Client(base_url=served.url) as anonymous:
        assert anonymous.get("/v2/health/live").json() == {"live": True}
        assert anonymous.get("/v2/health/ready").json() == {"ready": True}
        for method, path in [("GET", "/v2"), ("GET", "/v2/models/linear"), ("GET", "/metrics"),
                             ("POST", "/v2/models/linear/infer")]:
            denied = anonymous.request(method, path, json=_x_request())
            assert denied.status_code == 401, path
            assert denied.headers["www-authenticate"] == "Bearer"
            assert "missing API key" in denied.json()["error"]
        wrong = anonymous.get("/v2", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"error": "invalid API key"}
        assert anonymous.get("/v2", headers={"X-API-Key": API_KEY}).status_code == 200
        assert anonymous.get("/v2", headers=auth()).status_code == 200


# ---- /metrics ------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"{_NAME}(?:\{{[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}(?:,[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE})*\}})?"
    r" (?:[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf)|NaN)"
)
_COMMENT = re.compile(
    rf"# (?:HELP {_NAME} .*|TYPE {_NAME} (?:counter|gauge|histogram|summary|untyped))"
)


def test_metrics_parse_and_count_what_was_asked(served: ServeProcess, tmp_path: Path) -> None:
    served.deploy("counted", onnx_version(make_onnx(tmp_path / "m/model.onnx").parent, "3"))
    with served.client() as client:
        for _ in range(5):
            assert client.post("/v2/models/counted/infer", json=_x_request()).status_code == 200
        for _ in range(2):
            assert client.post("/v2/models/counted/infer", json={"inputs": []}).status_code == 400
        answer = client.get("/metrics")
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.text
    assert text.endswith("\n")
    for line in text.splitlines():
        assert _COMMENT.fullmatch(line) or _SAMPLE.fullmatch(line), (
            f"not exposition format: {line!r}"
        )
    labels = '{model="counted",version="3"}'
    assert served.metric(f"edgefleet_serving_requests_total{labels}") == 7
    assert served.metric(
        'edgefleet_serving_failures_total{model="counted",version="3",reason="bad_request"}'
    ) == 2
    assert served.metric(f"edgefleet_serving_request_duration_seconds_count{labels}") == 5
    assert served.metric(
        'edgefleet_serving_request_duration_seconds_bucket{model="counted",version="3",le="+Inf"}'
    ) == 5
    assert served.metric(f"edgefleet_serving_inference_duration_seconds_count{labels}") == 5
    assert served.metric(
        'edgefleet_serving_model_loaded{model="counted",version="3",role="primary",'
        'runtime="onnxruntime",device="CPU"}'
    ) == 1
    assert served.metric("edgefleet_serving_in_flight") == 0
    assert served.metric("edgefleet_serving_queue_depth") == 0
