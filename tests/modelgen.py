"""Tiny real models for the tests: packager/samples.py's linear model in every framework
(ONNX, OpenVINO IR, TFLite), an ONNX model that fails every request, and one whose
batch dimension is fixed (it cannot batch).

Runtimes are imported lazily: a test that only needs the ONNX file does not
need OpenVINO or LiteRT installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from packager.samples import (
    LINEAR_B,
    LINEAR_W,
    ONNX_IR_VERSION,
    ONNX_OPSET,
    expected_linear,
    make_onnx,
    make_tflite,
)

__all__ = ["LINEAR_B", "LINEAR_W", "ONNX_IR_VERSION", "ONNX_OPSET", "expected_linear",
           "make_failing_onnx", "make_fixed_batch_onnx", "make_onnx", "make_openvino_ir",
           "make_tflite"]


def make_openvino_ir(onnx_path: Path, out_dir: Path) -> Path:
    """Convert ONNX_PATH to OpenVINO IR in OUT_DIR (fp32 weights kept); returns the .xml."""
    import openvino as ov

    xml = out_dir / f"{onnx_path.stem}.xml"
    ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
    return xml


def make_failing_onnx(path: Path) -> Path:
    """A model that loads but fails on every request: it reshapes [N, 3] into [7].

    Its signature looks like make_onnx's, so packaging and loading succeed and
    only the agent's self-test (or a real request) finds the problem.
    """
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "seven"], ["y"])],
        "failing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])],
        initializer=[numpy_helper.from_array(np.array([7], dtype=np.int64), "seven")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def make_fixed_batch_onnx(path: Path) -> Path:
    """The linear model with its batch fixed at 1: x [1, 3] -> y [1, 2]; it cannot batch."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xW"]), helper.make_node("Add", ["xW", "b"],
                                                                          ["y"])],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[numpy_helper.from_array(LINEAR_W, "W"),
                     numpy_helper.from_array(LINEAR_B, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              ir_version=ONNX_IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
