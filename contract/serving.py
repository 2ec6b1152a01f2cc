"""serving.json: what the serving process needs to load and self-test a model.

    {"schema": "edgefleet.serving/v1", "model": "diabetes", "version": 2,
     "runtime": "onnxruntime", "framework": "onnx", "entrypoint": "model.onnx",
     "signature": {"inputs": [...], "outputs": [...]},
     "prefer": ["onnxruntime:CUDA", "onnxruntime:CPU"],
     "sample_request": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                    "data": [1.0, 1.0, 1.0]}]},
     "batching": {"max_batch_size": 32, "max_delay_ms": 0}}

`entrypoint` is relative to /opt/edgefleet/model/. `sample_request` is an
Open Inference Protocol (KServe V2) request the agent sends as its self-test,
or null when the model has no signature. `batching`, present only when the
packager measured that batching pays off for this model (packager/batching.py),
is the serving process's default for it: the agent uses it unless the
deployment says otherwise. A serving.json without it (every package built
before it existed) means no default: off. The packager builds it with
`serving_document`, which reads its own output back, and the agent reads it
with `read_serving`: one schema for both. Stdlib only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from contract import names
from contract.errors import FormatError, PackageError
from contract.runtimes import RUNTIMES
from contract.settings import (  # one home for the bounds and the check
    MAX_BATCH_DELAY_MS,
    MAX_BATCH_SIZE,
    unbatchable,
)
from contract.tensors import NUMPY_DTYPES, Signature

SCHEMA = "edgefleet.serving/v1"

BATCHING_FIELDS: Final = ("max_batch_size", "max_delay_ms")

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
    batching: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
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
    if batching is not None:  # absent otherwise: serving.json stays as it was before
        document["batching"] = dict(batching)
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
    if sorted(set(document) - {"batching"}) != sorted(_FIELDS):
        raise FormatError(f"serving.json has fields {sorted(document)}; expected"
                          f" {sorted(_FIELDS)} and optionally batching")
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
    if "batching" in document:
        check_batching(document["batching"])
        why = ("it has no signature" if document["signature"] is None
               else unbatchable(Signature.from_dict(document["signature"])))
        if why is not None:
            raise FormatError(f"serving.json: batching needs a model that can batch: {why}")
    return document


def check_batching(value: Any) -> dict[str, int]:
    """serving.json's batching default: exactly max_batch_size (2 to MAX_BATCH_SIZE rows
    per runtime call) and max_delay_ms (0 to MAX_BATCH_DELAY_MS); else FormatError."""
    if not isinstance(value, dict) or sorted(value) != sorted(BATCHING_FIELDS):
        raise FormatError(f"serving.json: batching must be an object with exactly"
                          f" {' and '.join(BATCHING_FIELDS)}, got {value!r}"[:200])
    for name, low, high in (("max_batch_size", 2, MAX_BATCH_SIZE),
                            ("max_delay_ms", 0, MAX_BATCH_DELAY_MS)):
        number = value[name]
        if not isinstance(number, int) or isinstance(number, bool) or not low <= number <= high:
            raise FormatError(f"serving.json: batching.{name} must be an integer from {low}"
                              f" to {high}, got {number!r}"[:200])
    return dict(value)


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
