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
