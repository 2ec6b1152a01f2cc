"""Tell what a model is from its files alone: framework, main file, input/output signature.

The hub calls this when a model is registered and the packager when it writes
serving.json, so it must work without any inference runtime installed: ONNX is
read with the `onnx` package, OpenVINO IR as plain XML, and TFLite with a small
reader of the few flatbuffer tables it needs. Datatypes use the KServe V2 /
Open Inference Protocol names (contract/tensors.py); a dynamic dimension is -1
and a tensor of unknown rank gets the empty shape.
"""

from __future__ import annotations

import mmap
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from flatbuffers import number_types as fbtypes
from flatbuffers.table import Table

from contract.tensors import OPENVINO_TYPES, Signature, TensorSpec


class ModelFileError(ValueError):
    """A model file is corrupt or incomplete, or a model's files are ambiguous."""


@dataclass(frozen=True)
class ModelInfo:
    framework: str | None
    entrypoint: str | None
    signature: Signature | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "entrypoint": self.entrypoint,
            "signature": None if self.signature is None else self.signature.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        signature = d.get("signature")
        return cls(
            d.get("framework"),
            d.get("entrypoint"),
            None if signature is None else Signature.from_dict(signature),
        )


class _NoV2Datatype(Exception):
    """A tensor (or a non-tensor value) that the V2 protocol has no datatype for."""


def inspect_model(files: Mapping[str, Path]) -> ModelInfo:
    """Find the one model among FILES (relative posix name -> bytes on disk) and describe it.

    Files that are not models are allowed and ignored. A model whose tensors
    include a type V2 cannot carry (a sequence, a map, bfloat16...) is still
    recognised, with no signature.
    """
    found = [(name, fw) for name in sorted(files) if (fw := _framework_of(name, files))]
    if not found:
        return ModelInfo(None, None, None)
    if len(found) > 1:
        listed = ", ".join(f"{name} ({fw})" for name, fw in found)
        raise ModelFileError(f"more than one model among the files: {listed}; register each alone")
    name, framework = found[0]
    reader = {"onnx": _read_onnx, "openvino": _read_openvino, "tflite": _read_tflite}[framework]
    try:
        signature: Signature | None = reader(name, files[name])
    except _NoV2Datatype:
        signature = None
    return ModelInfo(framework, name, signature)


def _framework_of(name: str, files: Mapping[str, Path]) -> str | None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        return "tflite"
    if suffix == ".xml" and _is_openvino_ir(name, files[name]):
        weights = PurePosixPath(name).with_suffix(".bin").as_posix()
        if weights not in files:
            raise ModelFileError(f"{name} is an OpenVINO IR but its weights {weights} are missing")
        return "openvino"
    return None


def _is_openvino_ir(name: str, path: Path) -> bool:
    # Only the root element decides; any other XML file is just a file.
    with open(path, "rb") as f:
        try:
            _, root = next(ET.iterparse(f, events=("start",)))
        except ET.ParseError as e:
            raise ModelFileError(f"{name} is not valid XML: {e}") from e
    return root.tag == "net"


def _v2_datatype(types: Mapping[Any, str], key: Any, framework: str) -> str:
    try:
        return types[key]
    except KeyError:
        raise _NoV2Datatype(f"{framework} type {key!r}") from None


# ---- ONNX ------------------------------------------------------------------

# TensorProto.DataType values, fixed by the ONNX spec.
_ONNX_TYPES = {
    1: "FP32",  # FLOAT
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",  # STRING
    9: "BOOL",
    10: "FP16",  # FLOAT16
    11: "FP64",  # DOUBLE
    12: "UINT32",
    13: "UINT64",
}


def _read_onnx(name: str, path: Path) -> Signature:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        # format is explicit: onnx guesses it from the file name, and blob names have no suffix.
        model = onnx.load_model(path, format="protobuf", load_external_data=False)
    except DecodeError as e:
        raise ModelFileError(f"{name} is not a valid ONNX model: {e}") from e
    # Protobuf parses an empty file, and a file cut at a field boundary, without
    # complaint; every real model has these three.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelFileError(
            f"{name} is not a valid ONNX model: it lacks an IR version, a graph or an opset import"
        )
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    return Signature(
        tuple(_onnx_tensor(v) for v in graph.input if v.name not in weights),
        tuple(_onnx_tensor(v) for v in graph.output),
    )


def _onnx_tensor(value: Any) -> TensorSpec:
    if value.type.WhichOneof("value") != "tensor_type":
        raise _NoV2Datatype(f"ONNX {value.type.WhichOneof('value')} value {value.name!r}")
    tensor = value.type.tensor_type
    datatype = _v2_datatype(_ONNX_TYPES, tensor.elem_type, "ONNX")
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value.name, datatype, shape)


# ---- OpenVINO IR -----------------------------------------------------------

def _read_openvino(name: str, path: Path) -> Signature:
    try:
        root = ET.parse(path).getroot()
        layers = {layer.get("id"): layer for layer in root.iterfind("layers/layer")}
        producers = {
            (e.get("to-layer"), e.get("to-port")): (e.get("from-layer"), e.get("from-port"))
            for e in root.iterfind("edges/edge")
        }
        of_type = [(layer, layer.get("type")) for layer in layers.values()]
        return Signature(
            tuple(_ov_parameter(layer) for layer, t in of_type if t == "Parameter"),
            tuple(_ov_result(layer, layers, producers) for layer, t in of_type if t == "Result"),
        )
    except (ET.ParseError, ValueError) as e:
        raise ModelFileError(f"{name} is not a valid OpenVINO IR: {e}") from e


def _ov_parameter(layer: ET.Element) -> TensorSpec:
    data = _child(layer, "data")
    port = _child(layer, "output/port")
    datatype = _v2_datatype(OPENVINO_TYPES, _attr(data, "element_type"), "OpenVINO")
    return TensorSpec(
        _ov_tensor_name(port) or _attr(layer, "name"), datatype, _ov_shape(_attr(data, "shape"))
    )


def _ov_result(
    layer: ET.Element,
    layers: Mapping[str | None, ET.Element],
    producers: Mapping[tuple[str | None, str | None], tuple[str | None, str | None]],
) -> TensorSpec:
    port = _child(layer, "input/port")
    source_id, source_port_id = producers.get((layer.get("id"), port.get("id")), (None, None))
    source = layers.get(source_id)
    if source is None:
        raise ValueError(f"nothing feeds Result layer {layer.get('name')!r}")
    source_port = _child(source, f"output/port[@id='{source_port_id}']")
    # A Result layer's own name is synthetic ("y/sink_port_0"); the tensor it
    # returns is named on the port that produces it, or by the producing layer in old IRs.
    name = _ov_tensor_name(source_port) or _attr(source, "name")
    datatype = _v2_datatype(OPENVINO_TYPES, _attr(port, "precision"), "OpenVINO")
    return TensorSpec(name, datatype, tuple(_ov_dim(d.text or "") for d in port.iterfind("dim")))


def _child(element: ET.Element, path: str) -> ET.Element:
    found = element.find(path)
    if found is None:
        raise ValueError(f"layer {element.get('name')!r} has no <{path}>")
    return found


def _attr(element: ET.Element, attr: str) -> str:
    value = element.get(attr)
    if value is None:
        raise ValueError(f"<{element.tag} name={element.get('name')!r}> has no {attr}")
    return value


def _ov_tensor_name(port: ET.Element) -> str | None:
    # A tensor may have several names, comma separated and sorted; OpenVINO's
    # get_any_name() is the first. A comma inside a name is escaped as "\,".
    names = port.get("names")
    if not names:
        return None
    return re.split(r"(?<!\\),", names)[0].replace("\\,", ",")


def _ov_shape(text: str) -> tuple[int, ...]:
    if text.strip() in ("", "..."):  # a scalar, or a dynamic rank
        return ()
    return tuple(_ov_dim(d) for d in text.split(","))


def _ov_dim(text: str) -> int:
    text = text.strip()
    if text == "?" or ".." in text:  # fully dynamic, or an interval such as 1..10
        return -1
    return max(int(text), -1)


# ---- TFLite ----------------------------------------------------------------

# TensorType values in the TFLite schema.
_TFLITE_TYPES = {
    0: "FP32",  # FLOAT32
    1: "FP16",  # FLOAT16
    2: "INT32",
    3: "UINT8",
    4: "INT64",
    5: "BYTES",  # STRING
    6: "BOOL",
    7: "INT16",
    9: "INT8",
    10: "FP64",  # FLOAT64
    12: "UINT64",
    15: "UINT32",
    16: "UINT16",
}

# Field numbers in the TFLite schema (schema.fbs), i.e. flatbuffer vtable slots.
_MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS, _MODEL_BUFFERS = 1, 2, 4
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 0, 1, 2
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_SHAPE_SIGNATURE = 0, 1, 3, 7
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2


def _read_tflite(name: str, path: Path) -> Signature:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            raise ModelFileError(f"{name} is not a valid TFLite model: it is only {size} bytes")
        # Mapped, not read: the weights are inside the flatbuffer and may be large.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[4:8] != b"TFL3":
                raise ModelFileError(
                    f"{name} is not a valid TFLite model: no TFL3 identifier at bytes 4..8"
                )
            try:
                return _tflite_signature(buf)
            except (ValueError, struct.error) as e:
                raise ModelFileError(
                    f"{name} is not a valid TFLite model (truncated or corrupt): {e}"
                ) from e


def _tflite_signature(buf: mmap.mmap) -> Signature:
    model = _FlatTable(buf, _FlatTable.uoffset(buf, 0))
    # A truncated upload can leave the few tables we read intact, so also check
    # that the weights (the bulk of the file) and the operator codes lie inside it.
    for buffer in model.tables(_MODEL_BUFFERS):
        buffer.vector(_BUFFER_DATA, 1)
        # Models over 2 GB keep weights after the flatbuffer, at offset/size.
        offset, size = buffer.uint64(_BUFFER_OFFSET), buffer.uint64(_BUFFER_SIZE)
        if offset > 1 and offset + size > len(buf):
            raise ValueError(f"a buffer ends at byte {offset + size}, past the end ({len(buf)})")
    model.tables(_MODEL_OPERATOR_CODES)
    subgraphs = model.tables(_MODEL_SUBGRAPHS)
    if not subgraphs:
        raise ValueError("the model has no subgraph")
    main = subgraphs[0]
    tensors = main.tables(_SUBGRAPH_TENSORS)

    def spec(index: int) -> TensorSpec:
        if not 0 <= index < len(tensors):
            raise ValueError(f"tensor index {index} out of range (0..{len(tensors) - 1})")
        tensor = tensors[index]
        datatype = _v2_datatype(_TFLITE_TYPES, tensor.int8(_TENSOR_TYPE), "TFLite")
        shape = tensor.int32s(_TENSOR_SHAPE_SIGNATURE) or tensor.int32s(_TENSOR_SHAPE)
        return TensorSpec(tensor.string(_TENSOR_NAME), datatype, tuple(max(d, -1) for d in shape))

    return Signature(
        tuple(spec(i) for i in main.int32s(_SUBGRAPH_INPUTS)),
        tuple(spec(i) for i in main.int32s(_SUBGRAPH_OUTPUTS)),
    )


class _FlatTable:
    """One flatbuffer table; every read is checked to stay inside the buffer.

    flatbuffers' Table trusts its input, and a truncated file would otherwise
    read past the end or silently return short strings.
    """

    def __init__(self, buf: mmap.mmap, pos: int) -> None:
        self._buf = buf
        self._need(pos, 4)
        self._table = Table(buf, pos)
        vtable = pos - self._table.Get(fbtypes.SOffsetTFlags, pos)
        self._need(vtable, 4)
        self._need(vtable, self._table.Get(fbtypes.VOffsetTFlags, vtable))
        self._need(pos, self._table.Get(fbtypes.VOffsetTFlags, vtable + 2))

    @staticmethod
    def uoffset(buf: mmap.mmap, pos: int) -> int:
        return pos + struct.unpack_from("<I", buf, pos)[0]

    def _need(self, start: int, length: int) -> None:
        if start < 0 or start + length > len(self._buf):
            raise ValueError(
                f"{length} bytes at offset {start} lie outside the file ({len(self._buf)} bytes)"
            )

    def _field(self, slot: int, width: int) -> int | None:
        offset = self._table.Offset(4 + 2 * slot)
        if offset == 0:
            return None
        pos = self._table.Pos + offset
        self._need(pos, width)
        return pos

    def int8(self, slot: int) -> int:
        pos = self._field(slot, 1)
        return 0 if pos is None else struct.unpack_from("<b", self._buf, pos)[0]

    def uint64(self, slot: int) -> int:
        pos = self._field(slot, 8)
        return 0 if pos is None else struct.unpack_from("<Q", self._buf, pos)[0]

    def vector(self, slot: int, width: int) -> tuple[int, int]:
        """(start, length) of the vector in SLOT, whose elements are WIDTH bytes wide."""
        pos = self._field(slot, 4)
        if pos is None:
            return 0, 0
        header = self.uoffset(self._buf, pos)
        self._need(header, 4)
        length = struct.unpack_from("<I", self._buf, header)[0]
        self._need(header + 4, length * width)
        return header + 4, length

    def tables(self, slot: int) -> list[_FlatTable]:
        start, n = self.vector(slot, 4)
        return [_FlatTable(self._buf, self.uoffset(self._buf, start + 4 * i)) for i in range(n)]

    def int32s(self, slot: int) -> tuple[int, ...]:
        start, length = self.vector(slot, 4)
        return struct.unpack_from(f"<{length}i", self._buf, start)

    def string(self, slot: int) -> str:
        start, length = self.vector(slot, 1)
        return self._buf[start : start + length].decode("utf-8")
