"""serving.json: what the serving process needs to load and self-test a model.

    {"schema": "edgefleet.serving/v1", "model": "diabetes", "version": 2,
     "runtime": "onnxruntime", "framework": "onnx", "entrypoint": "model.onnx",
     "signature": {"inputs": [...], "outputs": [...]},
     "prefer": ["onnxruntime:CUDA", "onnxruntime:CPU"],
     "sample_request": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                    "data": [1.0, 1.0, 1.0]}]}}

`entrypoint` is relative to /opt/edgefleet/model/. `sample_request` is an
Open Inference Protocol (KServe V2) request the agent sends as its self-test,
or null when the model has no signature. Stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from contract.errors import PackageError

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
    return {
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
