"""A gRPC ModelInferRequest as a scoring Call: its tensors checked against the signature
exactly as REST's are (tensors.py), and the answer as a serialized ModelInferResponse.

Inputs come as raw_input_contents (one entry per input, what tritonclient
sends) or typed contents; outputs always go back as raw_output_contents,
which every V2 gRPC client reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from agent.serving import tensors
from agent.serving.datatypes import BYTES, datatype_of, fixed_dtype
from agent.serving.errors import BadRequest, ModelFailed
from agent.serving.oip import messages
from agent.serving.table import ModelVersion
from contract.tensors import Signature

# The typed-contents field each datatype travels in; FP16 and BF16 have none.
CONTENTS: Final = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
_UNSUPPORTED: Final = {
    "shared_memory_region": "shared memory is not supported; send the data in the request",
    "classification": "the classification extension is not supported; request the raw output",
}


@dataclass(frozen=True)
class GrpcCall:
    request: Any  # messages.ModelInferRequest
    size: int

    def decode(self, signature: Signature) -> tensors.Request:
        message = self.request
        _check_parameters(message.parameters, "the request")
        raw = message.raw_input_contents
        if raw and len(raw) != len(message.inputs):
            raise BadRequest(
                f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs;"
                " give one per input, in order, or none"
            )
        specs = {spec.name: spec for spec in signature.inputs}
        arrays: dict[str, np.ndarray] = {}
        for index, tensor in enumerate(message.inputs):
            name = tensor.name
            where = f"input '{name}'"
            if name not in specs:
                raise BadRequest(f"unknown {where}; the model's inputs are:"
                                 f" {tensors.names_text(signature.inputs)}")
            if name in arrays:
                raise BadRequest(f"{where} is given more than once")
            _check_parameters(tensor.parameters, where)
            shape = tuple(tensor.shape)
            spec = specs[name]
            if (any(n < 0 for n in shape) or tensor.datatype != spec.datatype
                    or not tensors.fits(shape, spec.shape)):
                raise BadRequest(f"{where}: expected {tensors.describe(spec)},"
                                 f" got {tensor.datatype} {tensors.shape_text(shape)}")
            if raw:
                if tensor.HasField("contents"):
                    raise BadRequest(f"{where} has both contents and raw_input_contents; send one")
                arrays[name] = tensors.from_binary(memoryview(raw[index]), spec.datatype, shape,
                                                   where)
            else:
                arrays[name] = _from_contents(tensor.contents, spec.datatype, shape, where)
        missing = [spec.name for spec in signature.inputs if spec.name not in arrays]
        if missing:
            raise BadRequest(
                f"missing input {', '.join(repr(m) for m in missing)}; the model's inputs are:"
                f" {tensors.names_text(signature.inputs)}"
            )
        known = {spec.name for spec in signature.outputs}
        wanted = []
        for out in message.outputs:
            if out.name not in known:
                raise BadRequest(f"unknown output '{out.name}'; the model's outputs are:"
                                 f" {tensors.names_text(signature.outputs)}")
            _check_parameters(out.parameters, f"output '{out.name}'")
            wanted.append(tensors.WantedOutput(out.name, binary=True))
        return tensors.Request(message.id or None, arrays, tuple(wanted) or None, True)

    def encode(
        self, version: ModelVersion, request: tensors.Request, outputs: Mapping[str, np.ndarray]
    ) -> tuple[bytes, dict[str, str]]:
        response = messages.ModelInferResponse(
            model_name=version.deployment, model_version=version.version, id=request.id or "")
        names = [w.name for w in request.outputs] if request.outputs else list(outputs)
        for name in names:
            if name not in outputs:
                raise ModelFailed(f"the runtime returned no output '{name}'")
            array = np.asarray(outputs[name])
            try:
                datatype = datatype_of(array)
            except TypeError as e:
                raise ModelFailed(f"output '{name}': {e}") from None
            response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            response.raw_output_contents.append(tensors.to_bytes(array, datatype))
        return response.SerializeToString(), {}


def _check_parameters(parameters: Mapping[str, Any], where: str) -> None:
    for key, why in _UNSUPPORTED.items():
        if key in parameters:
            raise BadRequest(f"{where}: {why}")


def _from_contents(contents: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    field = CONTENTS.get(datatype)
    if field is None:
        raise BadRequest(f"{where}: {datatype} has no typed contents; send raw_input_contents")
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise BadRequest(f"{where}: {datatype} data goes in contents.{field}, not {others[0]}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(f"{where}: shape {tensors.shape_text(shape)} needs {count} values,"
                         f" got {len(values)}")
    dtype = fixed_dtype(datatype)
    if dtype is None:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.array(values)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        low, high = int(wide.min()), int(wide.max())
        if low < info.min or high > info.max:
            raise BadRequest(f"{where}: {low if low < info.min else high} is out of range"
                             f" for {datatype}")
    return wide.astype(dtype).reshape(shape)
