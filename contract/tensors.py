"""The tensor types both sides of a package share: Open Inference Protocol (KServe V2)
datatypes, a model's input/output signature, and how numpy and runtime types map to them.

The packager writes signatures into serving.json and the agent's runtimes and
serving process read them, so they live here, apart from the model-file
readers (packager/modelfile.py), whose parsers (onnx, flatbuffers) no device needs.
A dynamic dimension is -1; a tensor of unknown rank has the empty shape. Stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The model formats a package can carry; contract.runtimes says which runtime reads which.
FRAMEWORKS = ("onnx", "openvino", "tflite")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["datatype"]), tuple(int(n) for n in d["shape"]))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Signature:
        return cls(
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


# The numpy dtype each V2 datatype travels as between the serving layer and a
# runtime; BYTES is an object array of bytes, as tritonclient builds it.
NUMPY_DTYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
_V2_OF_NUMPY = {numpy_name: v2 for v2, numpy_name in NUMPY_DTYPES.items()}


def v2_datatype_of_numpy(dtype_name: str) -> str | None:
    """The V2 datatype of a numpy dtype named DTYPE_NAME ("float32" -> "FP32"), None if V2 has none.

    Fixed-width byte and text strings ("bytes24", "str96") are BYTES, like object arrays.
    """
    if re.fullmatch(r"(bytes|str)\d*", dtype_name):
        return "BYTES"
    return _V2_OF_NUMPY.get(dtype_name)


def v2_datatype_of_openvino(type_name: str) -> str | None:
    """The V2 datatype of an OpenVINO element type ("f32" -> "FP32"), None if V2 has none."""
    return OPENVINO_TYPES.get(type_name)


# Parameters declare element_type ("f32"); ports declare precision ("FP32").
OPENVINO_TYPES = {
    ov_name: v2
    for element_type, precision, v2 in [
        ("boolean", "BOOL", "BOOL"),
        ("u8", "U8", "UINT8"),
        ("u16", "U16", "UINT16"),
        ("u32", "U32", "UINT32"),
        ("u64", "U64", "UINT64"),
        ("i8", "I8", "INT8"),
        ("i16", "I16", "INT16"),
        ("i32", "I32", "INT32"),
        ("i64", "I64", "INT64"),
        ("f16", "FP16", "FP16"),
        ("f32", "FP32", "FP32"),
        ("f64", "FP64", "FP64"),
        ("string", "STRING", "BYTES"),
    ]
    for ov_name in (element_type, precision)
}
