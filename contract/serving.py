"""serving.json: what the serving process needs to load and self-test a model.

    {"schema": "edgefleet.serving/v1", "model": "diabetes", "version": 2,
     "runtime": "onnxruntime", "framework": "onnx", "entrypoint": "model.onnx",
     "signature": {"inputs": [...], "outputs": [...]},
     "prefer": ["onnxruntime:CUDA", "onnxruntime:CPU"],
     "sample_request": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                    "data": [1.0, 1.0, 1.0]}]}}

`entrypoint` is relative to /opt/edgefleet/model/. `sample_request` is an
Open Inference Protocol (KServe V2) request the agent sends as its self-test,
or null when the model has no signature. The packager builds it with
`serving_document`, which reads its own output back, and the agent reads it
with `read_serving`: one schema for both. Stdlib only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from contract import names
from contract.errors import FormatError, PackageError
from contract.runtimes import RUNTIMES
from contract.tensors import NUMPY_DTYPES

SCHEMA = "edgefleet.serving/v1"

# Ones, not zeros: a zero input hits log/divide edge cases in common models and
# would fail the self-test for the wrong reason.
_ONE: dict[str, Any] = {
    "BOOL": True,
    "BYTES": "1",
    **{t: 1 for t in ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")},
    **{t: 1.0 for t in ("FP16", "FP32", "FP64")},
}


def sample_request(signature: Mapping[str, Any]) -> dict[str, Any]:
    """A V2 request with one tensor of ones per input; dynamic (-1) dimensions become 1."""
    inputs = []
    for tensor in signature["inputs"]:
        datatype = tensor["datatype"]
        if datatype not in _ONE:
            raise PackageError(
                f"input {tensor['name']!r} has datatype {datatype!r}, which is not a V2 datatype; "
                "pass a sample request explicitly"
            )
        shape = [1 if d == -1 else d for d in tensor["shape"]]
        inputs.append(
            {
                "name": tensor["name"],
                "datatype": datatype,
                "shape": shape,
                "data": [_ONE[datatype]] * math.prod(shape),
            }
        )
    return {"inputs": inputs}


def serving_document(
    *,
    model: str,
    version: int | str,
    runtime: str,
    framework: str,
    entrypoint: str,
    signature: Mapping[str, Any] | None,
    prefer: Sequence[str],
    sample_request: Mapping[str, Any] | None,
) -> dict[str, Any]:
    document = {
        "schema": SCHEMA,
        "model": model,
        "version": version,
        "runtime": runtime,
        "framework": framework,
        "entrypoint": entrypoint,
        "signature": None if signature is None else dict(signature),
        "prefer": list(prefer),
        "sample_request": None if sample_request is None else dict(sample_request),
    }
    return check_serving(document)


_FIELDS = ("schema", "model", "version", "runtime", "framework", "entrypoint", "signature",
           "prefer", "sample_request")


def read_serving(data: bytes) -> dict[str, Any]:
    """serving.json's bytes as its document, or FormatError saying which field is wrong."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise FormatError(f"serving.json is not JSON: {exc}") from None
    return check_serving(document)


def check_serving(document: Any) -> dict[str, Any]:
    """DOCUMENT if it is a serving.json this version understands, else FormatError."""
    if not isinstance(document, dict):
        raise FormatError("serving.json is not a JSON object")
    if document.get("schema") != SCHEMA:
        raise FormatError(f"serving.json has schema {document.get('schema')!r}, not {SCHEMA!r}")
    if sorted(document) != sorted(_FIELDS):
        raise FormatError(f"serving.json has fields {sorted(document)}; expected {sorted(_FIELDS)}")
    try:
        names.model_name(document["model"])
        names.relative_path(document["entrypoint"])
    except names.InvalidName as exc:
        raise FormatError(f"serving.json: {exc}") from None
    version = document["version"]
    if not isinstance(version, int | str) or isinstance(version, bool):
        raise FormatError(f"serving.json: version {version!r} is neither a number nor text")
    runtime = RUNTIMES.get(document["runtime"])
    if runtime is None or document["framework"] not in runtime.frameworks:
        raise FormatError(
            f"serving.json: runtime {document['runtime']!r} cannot run framework "
            f"{document['framework']!r}"
        )
    prefer = document["prefer"]
    if not isinstance(prefer, list) or not all(names.RUNTIME_CHOICE.matches(p) for p in prefer):
        raise FormatError(f"serving.json: prefer {prefer!r} is not a list of RUNTIME:DEVICE")
    if document["signature"] is not None:
        _check_signature(document["signature"])
    request = document["sample_request"]
    if request is not None and not (isinstance(request, dict)
                                    and isinstance(request.get("inputs"), list)):
        raise FormatError("serving.json: sample_request is not a V2 request with inputs")
    return document


def _check_signature(signature: Any) -> None:
    if not isinstance(signature, dict) or sorted(signature) != ["inputs", "outputs"]:
        raise FormatError("serving.json: signature must have exactly inputs and outputs")
    for side in ("inputs", "outputs"):
        tensors = signature[side]
        if not isinstance(tensors, list):
            raise FormatError(f"serving.json: signature.{side} is not a list")
        for tensor in tensors:
            if not (
                isinstance(tensor, dict)
                and isinstance(tensor.get("name"), str)
                and tensor.get("datatype") in NUMPY_DTYPES
                and isinstance(tensor.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in tensor["shape"])
            ):
                raise FormatError(
                    f"serving.json: signature.{side} has {tensor!r}, not a tensor "
                    "(name, V2 datatype, shape of integers)"
                )
