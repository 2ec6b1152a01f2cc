"""The Open Inference Protocol over gRPC: tritonclient.grpc as is, typed contents, errors,
auth, shared metrics; and the compiled descriptor against oip.proto and against the V2
messages tritonclient was built with."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.serving.oip import compile as oip_compile
from agent.serving.oip import messages
from modelgen import expected_linear, make_onnx
from test_serving_process import API_KEY, SERVE, ServeProcess, onnx_version, start_serve
from test_serving_protocol import make_string_echo

X = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 4.0]], dtype=np.float32)
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("grpc")
    process = start_serve(tmp / "serve", "--grpc-port", "0")
    try:
        process.deploy("linear", onnx_version(make_onnx(tmp / "linear/model.onnx").parent, "1"))
        process.deploy("echo", onnx_version(make_string_echo(tmp / "echo/model.onnx").parent, "1"))
        yield process
    finally:
        assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


def grpc_address(served: ServeProcess) -> str:
    for line in served.log().splitlines():
        if line.startswith("gRPC API (Open Inference Protocol) on "):
            return line.split(" on ")[1].split()[0]
    raise AssertionError(f"no gRPC line in the log:\n{served.log()}")


@pytest.fixture
def triton(served: ServeProcess) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=grpc_address(served))
    yield client
    client.close()


@pytest.fixture
def channel(served: ServeProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_address(served)) as c:
        yield c


def call(channel: grpc.Channel, method: str, request: Any, key: str | None = API_KEY) -> Any:
    """One unary call with our own message classes."""
    _, response_class = messages.METHODS[method]
    stub = channel.unary_unary(f"/{messages.SERVICE}/{method}",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_class.FromString)
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return stub(request, metadata=metadata, timeout=30)


# ---- tritonclient.grpc unchanged ----------------------------------------------------


def test_tritonclient_grpc_health_metadata_and_infer(triton: Any, served: ServeProcess) -> None:
    import tritonclient.grpc as grpcclient

    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata(headers=AUTH).name == "edgefleet"
    assert triton.is_model_ready("linear", headers=AUTH)
    meta = triton.get_model_metadata("linear", headers=AUTH, as_json=True)
    assert meta["name"] == "linear" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]

    before = served.metric('edgefleet_serving_requests_total{model="linear",version="1"}')
    x = grpcclient.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    result = triton.infer("linear", [x], headers=AUTH, request_id="r1",
                          outputs=[grpcclient.InferRequestedOutput("y")])
    assert np.allclose(result.as_numpy("y"), expected_linear(X))
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r1", "linear", "1")
    # the same metrics as REST
    after = served.metric('edgefleet_serving_requests_total{model="linear",version="1"}')
    assert after == before + 1


def test_tritonclient_grpc_bytes(triton: Any) -> None:
    import tritonclient.grpc as grpcclient

    words = np.array([b"hello", "grüße".encode(), b""], dtype=object)
    s = grpcclient.InferInput("s", [3], "BYTES")
    s.set_data_from_numpy(words)
    result = triton.infer("echo", [s], headers=AUTH)
    assert list(result.as_numpy("t")) == list(words)


def test_tritonclient_grpc_errors_are_status_codes(triton: Any) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as bad:
        triton.infer("linear", [x], headers=AUTH)
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x': expected FP32 [-1, 3], got FP32 [1, 4]" in bad.value.message()
    with pytest.raises(InferenceServerException) as missing:
        triton.infer("nope", [x], headers=AUTH)
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    assert "no model named 'nope'" in missing.value.message()
    with pytest.raises(InferenceServerException) as denied:
        triton.infer("linear", [x])
    assert denied.value.status() == "StatusCode.UNAUTHENTICATED"


# ---- our own messages: typed contents, keys, checks ----------------------------------


def _typed(values: list[float], shape: list[int]) -> Any:
    request = messages.ModelInferRequest(model_name="linear")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values)
    return request


def test_typed_contents_and_the_x_api_key(channel: grpc.Channel) -> None:
    response = call(channel, "ModelInfer", _typed(X.ravel().tolist(), [2, 3]))
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("y", "FP32", [2, 2])
    y = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 2)
    assert np.allclose(y, expected_linear(X))
    _, response_class = messages.METHODS["ServerMetadata"]
    stub = channel.unary_unary(f"/{messages.SERVICE}/ServerMetadata",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_class.FromString)
    answer = stub(messages.ServerMetadataRequest(), metadata=(("x-api-key", API_KEY),))
    assert answer.name == "edgefleet"


@pytest.mark.parametrize(("request_of", "message"), [
    (lambda: _typed([1.0, 2.0], [1, 3]), "shape [1, 3] needs 3 values, got 2"),
    (lambda: _int_request(), "FP32 data goes in contents.fp32_contents, not int_contents"),
    (lambda: _raw_and_typed(), "has both contents and raw_input_contents"),
    (lambda: messages.ModelInferRequest(model_name="linear", raw_input_contents=[b"x"]),
     "raw_input_contents has 1 entries for 0 inputs"),
    (lambda: messages.ModelInferRequest(model_name="linear"), "missing input 'x'"),
])
def test_bad_requests_are_invalid_argument_with_the_reason(
    channel: grpc.Channel, request_of: Any, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call(channel, "ModelInfer", request_of())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def _int_request() -> Any:
    request = messages.ModelInferRequest(model_name="linear")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.int_contents.extend(
        [1, 2, 3])
    return request


def _raw_and_typed() -> Any:
    request = _typed([1.0, 2.0, 3.0], [1, 3])
    request.raw_input_contents.append(np.ones(3, np.float32).tobytes())
    return request


def test_a_wrong_key_is_unauthenticated_and_health_is_open(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call(channel, "ModelMetadata", messages.ModelMetadataRequest(name="linear"), key="wrong")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.value.details() == "invalid API key"
    assert call(channel, "ServerLive", messages.ServerLiveRequest(), key=None).live
    assert call(channel, "ServerReady", messages.ServerReadyRequest(), key=None).ready


def test_the_grpc_port_is_off_unless_asked_for(tmp_path: Path) -> None:
    served = start_serve(tmp_path)
    try:
        assert "gRPC" not in served.log()
    finally:
        assert served.stop() == 0


# ---- the descriptor ------------------------------------------------------------------


def test_descriptor_matches_oip_proto() -> None:
    assert oip_compile.main(["--check"]) == 0, "run python -m agent.serving.oip.compile"


def _fields(descriptor: Any) -> dict[str, Any]:
    return {
        f.name: (f.number, f.type, f.message_type.full_name if f.message_type else None,
                 f.is_repeated if hasattr(f, "is_repeated") else f.label)
        for f in descriptor.fields
    }


def test_messages_are_wire_compatible_with_tritonclients() -> None:
    """Every message and service method we declare is declared the same by tritonclient."""
    from tritonclient.grpc import service_pb2

    theirs = service_pb2.DESCRIPTOR
    ours = messages.ModelInferRequest.DESCRIPTOR.file
    for name, descriptor in ours.message_types_by_name.items():
        other = theirs.message_types_by_name[name]
        assert _fields(descriptor) == _fields(other), name
        for nested in descriptor.nested_types:
            if not nested.GetOptions().map_entry:
                assert _fields(nested) == _fields(other.nested_types_by_name[nested.name])
    service = theirs.services_by_name["GRPCInferenceService"]
    for method in ours.services_by_name["GRPCInferenceService"].methods:
        assert service.methods_by_name[method.name].input_type.name == method.input_type.name


def test_a_busy_grpc_port_fails_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*SERVE, "--port", "0", "--grpc-port", str(port), "--control-socket",
             str(tmp_path / "s.sock"), "--no-auth"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port} for gRPC" in done.stderr
    assert "choose another --grpc-port" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s.sock").exists()
