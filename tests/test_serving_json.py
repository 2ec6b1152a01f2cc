"""contract/serving.py: serving.json is built and read with one schema."""

from __future__ import annotations

import json
from typing import Any

import pytest

from contract.errors import FormatError
from contract.serving import read_serving, sample_request, serving_document

SIGNATURE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}


def document(**changes: Any) -> dict[str, Any]:
    return {**serving_document(
        model="diabetes", version=2, runtime="onnxruntime", framework="onnx",
        entrypoint="model.onnx", signature=SIGNATURE, prefer=["onnxruntime:CPU"],
        sample_request=sample_request(SIGNATURE)), **changes}


def test_what_the_packager_builds_the_agent_reads() -> None:
    built = document()
    assert read_serving(json.dumps(built).encode()) == built
    assert built["sample_request"]["inputs"][0]["shape"] == [1, 3]


@pytest.mark.parametrize(("changes", "words"), [
    ({"schema": "edgefleet.serving/v2"}, "schema"),
    ({"extra": 1}, "fields"),
    ({"model": "Diabetes\n"}, "invalid model name"),
    ({"entrypoint": "../model.onnx"}, "not a clean relative path"),
    ({"runtime": "litert"}, "cannot run framework"),
    ({"prefer": ["cuda"]}, "RUNTIME:DEVICE"),
    ({"signature": {"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}],
                    "outputs": []}}, "not a tensor"),
    ({"sample_request": {"data": []}}, "sample_request"),
])
def test_a_bad_serving_json_is_one_clear_error(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(FormatError, match=words):
        read_serving(json.dumps(document(**changes)).encode())


def test_the_builder_refuses_what_the_reader_would() -> None:
    with pytest.raises(FormatError, match="cannot run framework"):
        serving_document(model="m", version=1, runtime="litert", framework="onnx",
                         entrypoint="m.onnx", signature=None, prefer=[], sample_request=None)
    with pytest.raises(FormatError, match="not JSON"):
        read_serving(b"{")


def test_a_batching_default_is_read_back_and_its_absence_is_off() -> None:
    built = document(batching={"max_batch_size": 32, "max_delay_ms": 0})
    assert read_serving(json.dumps(built).encode())["batching"] == {
        "max_batch_size": 32, "max_delay_ms": 0}
    # Without one the document is what it was before the field existed (same bytes, digests).
    assert "batching" not in serving_document(
        model="m", version=1, runtime="onnxruntime", framework="onnx", entrypoint="m.onnx",
        signature=SIGNATURE, prefer=[], sample_request=None)


@pytest.mark.parametrize(("batching", "words"), [
    ({"max_batch_size": 32}, "exactly max_batch_size and max_delay_ms"),
    ({"max_batch_size": 32, "max_delay_ms": 0, "extra": 1}, "exactly"),
    ([32, 0], "exactly"),
    (None, "exactly"),
    ({"max_batch_size": 1, "max_delay_ms": 0}, "max_batch_size must be an integer from 2"),
    ({"max_batch_size": 5000, "max_delay_ms": 0}, "from 2 to 4096"),
    ({"max_batch_size": True, "max_delay_ms": 0}, "max_batch_size"),
    ({"max_batch_size": 32, "max_delay_ms": 1001}, "max_delay_ms must be an integer from 0"),
    ({"max_batch_size": 32, "max_delay_ms": 0.5}, "max_delay_ms"),
])
def test_a_bad_batching_default_is_one_clear_error(batching: Any, words: str) -> None:
    with pytest.raises(FormatError, match=words):
        read_serving(json.dumps(document(batching=batching)).encode())


def test_a_batching_default_needs_a_free_batch_dimension() -> None:
    fixed = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}
    for signature, why in ((fixed, "input 'x' has shape \\[1, 3\\], not a free first"),
                           (None, "it has no signature")):
        with pytest.raises(FormatError, match=f"batching needs a model that can batch: {why}"):
            read_serving(json.dumps(document(
                signature=signature, batching={"max_batch_size": 8, "max_delay_ms": 0})).encode())
