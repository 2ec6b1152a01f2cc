"""Tiny real models of one function, y = x @ LINEAR_W + LINEAR_B, in ONNX and TFLite.

The smallest models edgefleet can register, package and serve: for trying it
without a trained model (examples/litert-tiny), for the tests (tests/modelgen.py)
and the benchmarks. Each builder writes a file its runtime really loads; check
answers against expected_linear. The builders import what they write with
lazily: ONNX needs the `onnx` extra, TFLite `ai-edge-litert` (the `tflite` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LINEAR_W = np.array([[0.5, -1.0], [2.0, 0.25], [-1.5, 3.0]], dtype=np.float32)
LINEAR_B = np.array([0.1, -0.2], dtype=np.float32)

ONNX_OPSET = 17
# IR 8 is what opset 17 shipped with; every onnxruntime we support (>= 1.17) loads it.
ONNX_IR_VERSION = 8


def expected_linear(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) @ LINEAR_W + LINEAR_B


def make_onnx(path: Path, *, batch: int | None = None, padding_mb: int = 0) -> Path:
    """Input "x" FP32 [N,3], output "y" FP32 [N,2]; N is dynamic ("batch") unless BATCH is given.

    PADDING_MB adds an unused initializer of that many MB of random (incompressible)
    weights, for a model that is big on disk but computes the same.
    """
    import onnx
    from onnx import helper, numpy_helper

    n: int | str = "batch" if batch is None else batch
    weights = [numpy_helper.from_array(LINEAR_W, "W"), numpy_helper.from_array(LINEAR_B, "b")]
    if padding_mb:
        padding = np.random.default_rng(0).random(padding_mb * 2**18, dtype=np.float32)
        weights.append(numpy_helper.from_array(padding, "padding"))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xW"]),
            helper.make_node("Add", ["xW", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [n, 2])],
        weights,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="edgefleet-samples",
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def make_tflite(path: Path) -> Path:
    """The linear model as a FULLY_CONNECTED .tflite, written without TensorFlow.

    Input "x" FP32 [1,3] (shape_signature [-1,3], so it can be resized), output "y".
    """
    import flatbuffers  # type: ignore[import-untyped]
    from ai_edge_litert import schema_py_generated as tfl  # type: ignore[import-untyped]

    def tensor(
        name: str, shape: list[int], buffer: int, signature: list[int] | None = None
    ) -> tfl.TensorT:
        return tfl.TensorT(
            name=name,
            shape=shape,
            shapeSignature=signature,
            type=tfl.TensorType.FLOAT32,
            buffer=buffer,
        )

    def constant(array: np.ndarray) -> tfl.BufferT:
        return tfl.BufferT(data=np.frombuffer(array.tobytes(), dtype=np.uint8))

    fully_connected = tfl.BuiltinOperator.FULLY_CONNECTED
    model = tfl.ModelT(
        version=3,
        description="edgefleet test model: y = x @ W + b",
        operatorCodes=[
            # Codes below 127 must also be in the deprecated field, which old runtimes read.
            tfl.OperatorCodeT(
                deprecatedBuiltinCode=fully_connected, builtinCode=fully_connected, version=1
            )
        ],
        # Buffer 0 is the empty sentinel that tensors without constant data point to.
        buffers=[tfl.BufferT(), constant(LINEAR_W.T), constant(LINEAR_B)],
        subgraphs=[
            tfl.SubGraphT(
                name="main",
                tensors=[
                    tensor("x", [1, 3], 0, [-1, 3]),
                    # FULLY_CONNECTED wants weights as [out, in].
                    tensor("W", [2, 3], 1),
                    tensor("b", [2], 2),
                    tensor("y", [1, 2], 0, [-1, 2]),
                ],
                inputs=[0],
                outputs=[3],
                operators=[
                    tfl.OperatorT(
                        opcodeIndex=0,
                        inputs=[0, 1, 2],
                        outputs=[3],
                        builtinOptionsType=tfl.BuiltinOptions.FullyConnectedOptions,
                        builtinOptions=tfl.FullyConnectedOptionsT(),
                    )
                ],
            )
        ],
        signatureDefs=[
            tfl.SignatureDefT(
                signatureKey="serving_default",
                subgraphIndex=0,
                inputs=[tfl.TensorMapT(name="x", tensorIndex=0)],
                outputs=[tfl.TensorMapT(name="y", tensorIndex=3)],
            )
        ],
    )
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(builder.Output()))
    return path
