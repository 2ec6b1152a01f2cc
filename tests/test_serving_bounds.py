"""Hostile input to a real scoring process: bodies past the limit (413 while they
stream, after the key), deep JSON (400, not RecursionError), NaN in and out, and the
connection still usable after each refusal."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from agent.serving import codec
from agent.serving.errors import PayloadTooLarge
from modelgen import make_onnx
from test_serving_process import API_KEY, ServeProcess, onnx_version, start_serve

LIMIT = 64 << 10
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ONE = {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}
INFER = "/v2/models/linear/infer"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("bounds")
    process = start_serve(tmp / "serve", "--max-body-bytes", str(LIMIT))
    try:
        process.deploy("linear", onnx_version(make_onnx(tmp / "linear/model.onnx").parent, "1"))
        yield process
    finally:
        assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


@pytest.fixture
def client(served: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=30) as c:
        yield c


def still_answers(client: httpx.Client) -> None:
    """The next request on the same kept-alive connection is answered."""
    answer = client.post(INFER, json={"inputs": [ONE]})
    assert answer.status_code == 200, answer.text


def chunks(count: int, size: int = 16 << 10) -> Iterator[bytes]:
    yield b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ['
    for _ in range(count):
        yield b"1.0, " * (size // 5)


def test_a_declared_body_past_the_limit_is_413(client: httpx.Client) -> None:
    answer = client.post(INFER, content=b" " * (LIMIT + 1))
    assert answer.status_code == 413
    assert answer.json() == {"error": f"the request body is larger than this server reads"
                             f" ({LIMIT} bytes); send smaller batches, or start it with a"
                             f" larger --max-body-bytes"}
    still_answers(client)


def test_a_streamed_body_is_cut_off_where_it_passes_the_limit(client: httpx.Client) -> None:
    answer = client.post(INFER, content=chunks(64))  # chunked, 1 MiB, no Content-Length
    assert answer.status_code == 413 and "larger than this server reads" in answer.text
    still_answers(client)


def test_the_key_is_checked_before_the_body_is_read(served: ServeProcess) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as anonymous:
        answer = anonymous.post(INFER, content=b" " * (LIMIT * 4))
        assert answer.status_code == 401


@pytest.mark.parametrize("depth", [41, 30_000])
def test_deep_json_is_400(client: httpx.Client, depth: int) -> None:
    body = '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ' + \
        "[" * depth + "]" * depth + "}]}"
    answer = client.post(INFER, content=body)
    assert answer.status_code == 400
    assert answer.json() == {"error": "the inference request nests deeper than 40 levels"}
    still_answers(client)


def test_nan_in_is_400_and_a_non_finite_output_is_422_unless_binary(
        client: httpx.Client) -> None:
    answer = client.post(INFER, content='{"inputs": [{"name": "x", "datatype": "FP32",'
                         ' "shape": [1, 3], "data": [NaN, 1, 2]}]}')
    assert answer.status_code == 400
    assert answer.json()["error"].endswith("NaN is not JSON; send non-finite numbers as binary"
                                           " tensor data")
    huge = {**ONE, "data": [3e38, 3e38, 3e38]}  # finite in, overflows FP32 in the model
    answer = client.post(INFER, json={"inputs": [huge]})
    assert answer.status_code == 422, answer.text
    assert answer.json() == {"error": "output 'y' holds NaN or infinity, which JSON cannot"
                             " carry; request it with parameters.binary_data true"}
    assert "NaN" not in answer.text.replace("holds NaN", "")
    binary = client.post(INFER, json={"inputs": [huge], "outputs": [
        {"name": "y", "parameters": {"binary_data": True}}]})
    assert binary.status_code == 200
    header = json.loads(binary.content[:int(binary.headers["Inference-Header-Content-Length"])])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8


def test_the_log_has_no_traceback(served: ServeProcess) -> None:
    assert "Traceback" not in served.log() and "RecursionError" not in served.log()


def test_the_json_part_has_a_limit_of_its_own() -> None:
    json_part = b'{"inputs": [' + b" " * codec.MAX_JSON_BYTES + b"]}"
    with pytest.raises(PayloadTooLarge, match="send large tensors as binary data"):
        codec.split_body(json_part, None)
    header, binary = codec.split_body(b'{"inputs": []}' + bytes(codec.MAX_JSON_BYTES), "14")
    assert header == {"inputs": []} and len(binary) == codec.MAX_JSON_BYTES
