"""An inference request's tensors, checked against the model's signature; the outputs back.

Everything a client can get wrong is caught here, before the runtime sees
it, and reported as BadRequest naming the tensor and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.serving import codec
from agent.serving.datatypes import BYTES, datatype_of, fixed_dtype
from agent.serving.errors import BadRequest, ModelFailed, Unprocessable
from contract.tensors import Signature, TensorSpec

# Extensions a client may ask for that this server does not implement; ignoring
# them would silently return something other than what was asked.
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported; send the data in the request",
    "classification": "the classification extension is not supported; request the raw output",
}


@dataclass(frozen=True)
class WantedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class Request:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[WantedOutput, ...] | None  # None: every output the model returns
    binary_outputs: bool  # the default for outputs not listed explicitly


def parse_request(
    header: Mapping[str, Any], binary: memoryview, signature: Signature
) -> Request:
    """Inputs as numpy arrays of the signature's types and shapes, and the outputs asked for."""
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _parameters(header, "the request")
    binary_outputs = parameters.get("binary_data_output", False)
    if not isinstance(binary_outputs, bool):
        raise BadRequest("parameters.binary_data_output must be true or false")
    return Request(
        request_id,
        _inputs(header, binary, signature),
        _outputs(header, signature, binary_outputs),
        binary_outputs,
    )


def encode_outputs(
    request: Request, results: Mapping[str, np.ndarray]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The response's output entries and, in the same order, the binary sections."""
    wanted = request.outputs or tuple(
        WantedOutput(name, request.binary_outputs) for name in results
    )
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in wanted:
        if out.name not in results:
            raise ModelFailed(f"the runtime returned no output '{out.name}'")
        array = np.asarray(results[out.name])
        try:
            datatype = datatype_of(array)
        except TypeError as e:
            raise ModelFailed(f"output '{out.name}': {e}") from None
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(array.shape)}
        if out.binary:
            raw = to_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _to_json(array, datatype, out.name)
        entries.append(entry)
    return entries, blobs


def describe(spec: TensorSpec) -> str:
    """'FP32 [-1, 3]': how error messages show what a tensor must be."""
    return f"{spec.datatype} {shape_text(spec.shape) if spec.shape else 'of any shape'}"


# ---- inputs ----------------------------------------------------------------


def _inputs(
    header: Mapping[str, Any], binary: memoryview, signature: Signature
) -> dict[str, np.ndarray]:
    specs = {spec.name: spec for spec in signature.inputs}
    listed = header.get("inputs")
    if not isinstance(listed, list):
        raise BadRequest("the request needs an 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in listed:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each entry of 'inputs' must be an object with a 'name'")
        name = item["name"]
        where = f"input '{name}'"
        if name not in specs:
            raise BadRequest(
                f"unknown {where}; the model's inputs are: {names_text(signature.inputs)}")
        if name in arrays:
            raise BadRequest(f"{where} is given more than once")
        shape = _request_shape(item, where)
        datatype = item.get("datatype")
        spec = specs[name]
        if datatype != spec.datatype or not fits(shape, spec.shape):
            raise BadRequest(
                f"{where}: expected {describe(spec)}, got {datatype} {shape_text(shape)}")
        size = _parameters(item, where).get("binary_data_size")
        if size is None:
            arrays[name] = _from_json(item, spec.datatype, shape, where)
            continue
        if "data" in item:
            raise BadRequest(f"{where} has both 'data' and parameters.binary_data_size; send one")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"{where}: parameters.binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise BadRequest(
                f"{where}: binary_data_size {size} reaches past the end of the binary data"
                f" ({len(binary) - offset} bytes left)"
            )
        arrays[name] = from_binary(binary[offset : offset + size], spec.datatype, shape, where)
        offset += size
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data follow the JSON header but no"
            " input's binary_data_size accounts for them"
        )
    missing = [spec.name for spec in signature.inputs if spec.name not in arrays]
    if missing:
        raise BadRequest(
            f"missing input {', '.join(repr(m) for m in missing)}; the model's inputs are:"
            f" {names_text(signature.inputs)}"
        )
    return arrays


def _request_shape(item: Mapping[str, Any], where: str) -> tuple[int, ...]:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def fits(shape: Sequence[int], expected: Sequence[int]) -> bool:
    # An empty expected shape is a tensor of unknown rank: any shape goes.
    if not expected:
        return True
    return len(shape) == len(expected) and all(
        e in (-1, n) for n, e in zip(shape, expected, strict=True)
    )


_JSON_KINDS = {"b": ("b", "true/false values"), "i": ("iu", "integers"), "u": ("iu", "integers")}


def _from_json(
    item: Mapping[str, Any], datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    data = item.get("data")
    if not isinstance(data, list):
        raise BadRequest(f"{where} needs a 'data' list or parameters.binary_data_size")
    count = math.prod(shape)
    dtype = fixed_dtype(datatype)
    if dtype is None:
        flat = _flatten_strings(data, where)
        _check_count(len(flat), count, shape, where)
        array = np.empty(count, dtype=object)
        array[:] = [s.encode() for s in flat]
        return array.reshape(shape)
    try:
        values = np.array(data)
    except ValueError:
        raise BadRequest(f"{where}: 'data' is a ragged nested list") from None
    if values.size:
        kinds, what = _JSON_KINDS.get(dtype.kind, ("iuf", "numbers"))
        if dtype.kind in "iu" and values.dtype.kind in "fO":
            # numpy turns integers beyond int64 (UINT64's top half) into float64 or
            # objects; look at the values themselves rather than lose precision.
            values = np.array(data, dtype=object)
            if all(type(v) is int for v in values.flat):
                kinds = "O"
        if values.dtype.kind not in kinds:
            raise BadRequest(f"{where}: {datatype} data must be {what}")
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            low, high = int(values.min()), int(values.max())
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise BadRequest(f"{where}: {bad} is out of range for {datatype}")
    _check_count(values.size, count, shape, where)
    with np.errstate(over="raise"):
        try:
            return values.astype(dtype).reshape(shape)
        except FloatingPointError:
            raise BadRequest(f"{where}: a value is out of range for {datatype}") from None


def _flatten_strings(data: list[Any], where: str) -> list[str]:
    flat: list[str] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise BadRequest(f"{where}: BYTES data in JSON must be strings, got {item!r}")
            flat.append(item)
        else:
            stack.pop()
    return flat


def from_binary(
    chunk: memoryview, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    count = math.prod(shape)
    dtype = fixed_dtype(datatype)
    if dtype is None:
        return codec.decode_bytes(chunk, count, where).reshape(shape)
    if len(chunk) != count * dtype.itemsize:
        raise BadRequest(
            f"{where}: shape {shape_text(shape)} of {datatype} needs"
            f" {count * dtype.itemsize} bytes, got {len(chunk)}"
        )
    if datatype == "BOOL" and count and np.frombuffer(chunk, dtype=np.uint8).max() > 1:
        raise BadRequest(f"{where}: BOOL bytes must be 0 or 1")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _check_count(got: int, count: int, shape: tuple[int, ...], where: str) -> None:
    if got != count:
        raise BadRequest(f"{where}: shape {shape_text(shape)} needs {count} values, got {got}")


# ---- outputs ---------------------------------------------------------------


def _outputs(
    header: Mapping[str, Any], signature: Signature, default_binary: bool
) -> tuple[WantedOutput, ...] | None:
    listed = header.get("outputs")
    if listed is None:
        return None
    if not isinstance(listed, list):
        raise BadRequest("'outputs' must be a list")
    known = {spec.name for spec in signature.outputs}
    wanted = []
    for item in listed:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each entry of 'outputs' must be an object with a 'name'")
        where = f"output '{item['name']}'"
        if item["name"] not in known:
            raise BadRequest(
                f"unknown {where}; the model's outputs are: {names_text(signature.outputs)}"
            )
        binary = _parameters(item, where).get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise BadRequest(f"{where}: parameters.binary_data must be true or false")
        wanted.append(WantedOutput(item["name"], binary))
    return tuple(wanted)


def to_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == BYTES:
        return codec.encode_bytes(array)
    dtype = fixed_dtype(datatype)
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _to_json(array: np.ndarray, datatype: str, name: str) -> list[Any]:
    flat = array.reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        raise Unprocessable(
            f"output '{name}' holds NaN or infinity, which JSON cannot carry;"
            " request it with parameters.binary_data true"
        )
    if datatype != BYTES:
        return flat.tolist()
    try:
        return [item if isinstance(item, str) else bytes(item).decode() for item in flat]
    except UnicodeDecodeError:
        raise BadRequest(
            f"output '{name}' holds bytes that are not UTF-8, which JSON cannot carry;"
            " request it with parameters.binary_data true"
        ) from None


# ---- shared ----------------------------------------------------------------


def _parameters(item: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    for key, why in _UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise BadRequest(f"{where}: {why}")
    return parameters


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def names_text(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"'{s.name}' {describe(s)}" for s in specs)
