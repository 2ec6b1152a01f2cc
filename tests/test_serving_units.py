"""The serving modules on their own: exposition format, BYTES framing, tensor checks the
linear model cannot reach, the limiter, and the table's reference counting."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from agent.runtimes import load_best
from agent.serving import codec, tensors
from agent.serving.datatypes import datatype_of
from agent.serving.errors import BadRequest, Overloaded
from agent.serving.limits import Limiter
from agent.serving.loading import VersionSpec
from agent.serving.metrics import Counter, Gauge, Histogram, Registry
from agent.serving.table import Deployment, ModelTable, ModelVersion
from contract.tensors import Signature, TensorSpec
from modelgen import make_onnx

# ---- metrics ----------------------------------------------------------------------


def test_exposition_format() -> None:
    registry = Registry()
    requests = registry.add(Counter("demo_requests_total", "Requests.\nAll of them.", ["model"]))
    latency = registry.add(Histogram("demo_seconds", "Latency.", [0.1, 1.0], ["model"]))
    registry.add(Gauge("demo_up", "Up.", lambda: [((), 1.0)]))
    requests.inc('we"ird\\name\n')
    requests.inc("a", amount=2)
    for value in (0.05, 0.1, 0.5, 3.0):
        latency.observe(value, "a")
    assert registry.render() == (
        "# HELP demo_requests_total Requests.\\nAll of them.\n"
        "# TYPE demo_requests_total counter\n"
        'demo_requests_total{model="a"} 2\n'
        'demo_requests_total{model="we\\"ird\\\\name\\n"} 1\n'
        "# HELP demo_seconds Latency.\n"
        "# TYPE demo_seconds histogram\n"
        'demo_seconds_bucket{model="a",le="0.1"} 2\n'  # a value equal to a bound is in it
        'demo_seconds_bucket{model="a",le="1"} 3\n'
        'demo_seconds_bucket{model="a",le="+Inf"} 4\n'
        'demo_seconds_sum{model="a"} 3.65\n'
        'demo_seconds_count{model="a"} 4\n'
        "# HELP demo_up Up.\n"
        "# TYPE demo_up gauge\n"
        "demo_up 1\n"
    )


def test_metric_definitions_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="must end in _total"):
        Counter("requests", "x")
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h", "x", [1.0, 0.5])
    with pytest.raises(ValueError, match="takes labels"):
        Counter("c_total", "x", ["model"]).inc()
    registry = Registry()
    registry.add(Counter("c_total", "x"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(Counter("c_total", "x"))


# ---- BYTES framing -----------------------------------------------------------------


def test_bytes_round_trip_and_framing_errors() -> None:
    words = np.array([b"", b"\xff\x00", "wörld"], dtype=object)
    raw = codec.encode_bytes(words)
    assert raw == b"\0\0\0\0" + b"\2\0\0\0\xff\0" + b"\6\0\0\0" + "wörld".encode()
    assert list(codec.decode_bytes(memoryview(raw), 3, "input 's'")) == [
        b"", b"\xff\x00", "wörld".encode()
    ]
    with pytest.raises(BadRequest, match=r"^input 's': BYTES data ends after 3 of 4 elements$"):
        codec.decode_bytes(memoryview(raw), 4, "input 's'")
    with pytest.raises(BadRequest, match="element 1 claims 2 bytes but only 1 remain"):
        codec.decode_bytes(memoryview(raw[:9]), 3, "input 's'")
    with pytest.raises(BadRequest, match="6 bytes left over after 2 BYTES elements"):
        codec.decode_bytes(memoryview(raw[:-4]), 2, "input 's'")


# ---- tensor checks beyond FP32 ---------------------------------------------------------


def _signature(datatype: str, shape: tuple[int, ...] = (-1,)) -> Signature:
    return Signature((TensorSpec("a", datatype, shape),), (TensorSpec("b", datatype, shape),))


def _parse(
    datatype: str, data: object, shape: list[int], spec_shape: tuple[int, ...] = (-1,)
) -> np.ndarray:
    header = {"inputs": [{"name": "a", "datatype": datatype, "shape": shape, "data": data}]}
    return tensors.parse_request(
        header, memoryview(b""), _signature(datatype, spec_shape)
    ).inputs["a"]


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT64", [1, 2.5], "input 'a': INT64 data must be integers"),
        ("INT64", [True, False], "input 'a': INT64 data must be integers"),
        ("UINT8", [1, 300], "input 'a': 300 is out of range for UINT8"),
        ("INT8", [-129, 0], "input 'a': -129 is out of range for INT8"),
        ("UINT64", [-1, 0], "input 'a': -1 is out of range for UINT64"),
        ("INT64", [2**70, 0], "input 'a': 1180591620717411303424 is out of range for INT64"),
        ("BOOL", [1, 0], "input 'a': BOOL data must be true/false values"),
        ("FP16", [70000.0, 0], "input 'a': a value is out of range for FP16"),
        ("BYTES", ["a", 1], "input 'a': BYTES data in JSON must be strings, got 1"),
    ],
)
def test_json_values_must_fit_the_datatype(datatype: str, data: list[object], message: str) -> None:
    with pytest.raises(BadRequest) as raised:
        _parse(datatype, data, [2])
    assert raised.value.message == message


def test_json_values_are_converted_exactly() -> None:
    assert _parse("UINT64", [2**64 - 1, 0], [2]).tolist() == [2**64 - 1, 0]
    assert _parse("FP64", [1, 2.5], [2]).dtype == np.float64  # integers are fine as numbers
    assert _parse("BOOL", [True, False], [2]).tolist() == [True, False]
    strings = _parse("BYTES", [["a", "b"], ["c", "ü"]], [2, 2], (-1, 2))
    assert strings.shape == (2, 2) and strings[1, 1] == "ü".encode()
    # an empty expected shape is a tensor of unknown rank: any shape goes
    assert _parse("INT32", [[[1]]], [1, 1, 1], ()).shape == (1, 1, 1)


def test_binary_bool_must_be_0_or_1() -> None:
    header = {"inputs": [{"name": "a", "datatype": "BOOL", "shape": [2],
                          "parameters": {"binary_data_size": 2}}]}
    with pytest.raises(BadRequest, match="BOOL bytes must be 0 or 1"):
        tensors.parse_request(header, memoryview(b"\x01\x02"), _signature("BOOL"))


def test_outputs_are_encoded_by_their_numpy_type() -> None:
    request = tensors.Request(None, {}, None, binary_outputs=False)
    entries, blobs = tensors.encode_outputs(request, {
        "i": np.array([[1, 2]], dtype=np.int64),
        "s": np.array(["x", "ÿ"], dtype=object),
    })
    assert entries == [
        {"name": "i", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
        {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["x", "ÿ"]},
    ]
    assert blobs == []
    raw = np.array([b"\xff"], dtype=object)
    with pytest.raises(BadRequest, match="not UTF-8.*binary_data true"):
        tensors.encode_outputs(request, {"raw": raw})
    binary = tensors.Request(None, {}, None, binary_outputs=True)
    entries, blobs = tensors.encode_outputs(binary, {"raw": raw})
    assert entries[0]["parameters"] == {"binary_data_size": 5} and blobs == [b"\1\0\0\0\xff"]


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [("bool", "BOOL"), ("uint16", "UINT16"), ("int32", "INT32"), ("float16", "FP16"),
     (">f8", "FP64"), ("U3", "BYTES"), ("S3", "BYTES"), ("object", "BYTES")],
)
def test_datatype_of_numpy_arrays(dtype: str, datatype: str) -> None:
    assert datatype_of(np.zeros(1, dtype=dtype)) == datatype


def test_datatype_of_refuses_what_v2_cannot_carry() -> None:
    with pytest.raises(TypeError, match="complex128"):
        datatype_of(np.zeros(1, dtype=np.complex128))


# ---- limiter -----------------------------------------------------------------------


def test_limiter_runs_n_queues_q_and_turns_away_the_rest() -> None:
    async def scenario() -> None:
        limiter = Limiter(max_concurrency=1, max_queue=1)
        await limiter.acquire()
        waiting = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        assert (limiter.running, limiter.waiting, limiter.busy) == (1, 1, True)
        with pytest.raises(Overloaded) as raised:
            await limiter.acquire()
        assert raised.value.headers() == {"Retry-After": "1"}
        limiter.release()
        await waiting
        assert (limiter.running, limiter.waiting) == (1, 0)
        limiter.release()
        assert not limiter.busy

    asyncio.run(scenario())


def test_limiter_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrency must be at least 1"):
        Limiter(max_concurrency=0, max_queue=0)
    with pytest.raises(ValueError, match="max_queue must be 0 or more"):
        Limiter(max_concurrency=1, max_queue=-1)


# ---- table: references and retirement --------------------------------------------------


@pytest.fixture
def versions(tmp_path: Path) -> list[ModelVersion]:
    model_dir = make_onnx(tmp_path / "model.onnx").parent
    specs = [VersionSpec(str(v), model_dir, "model.onnx", "onnx") for v in (1, 2)]
    return [ModelVersion("m", spec, load_best(model_dir, "model.onnx", "onnx")) for spec in specs]


def test_a_replaced_version_closes_only_after_its_last_request(
    versions: list[ModelVersion],
) -> None:
    one, two = versions
    table = ModelTable()
    table.install(Deployment("m", one))
    leased = table.lease("m", None)
    assert leased is one
    assert table.install(Deployment("m", two)) == [one]
    assert table.lease("m", None) is two  # new requests go to the new version at once
    assert not one.closed.wait(0.2)  # the running request keeps the old one open
    assert table.draining() == [one]
    one.release()
    assert one.closed.wait(5)
    assert table.draining() == []
    two.release()
    table.close_all(timeout=5)
    assert two.closed.is_set()


def test_ab_choice_follows_the_weight_with_a_seeded_rng(versions: list[ModelVersion]) -> None:
    one, two = versions
    table = ModelTable(random.Random(7))
    table.install(Deployment("m", one, two, traffic=25))
    chosen = []
    for _ in range(4000):
        version = table.lease("m", None)
        chosen.append(version.version)
        version.release()
    assert 900 <= chosen.count("2") <= 1100
    table.close_all(timeout=5)
