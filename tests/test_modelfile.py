"""packager.modelfile against real models: the test builders run in their runtimes, and
inspect_model reads the same framework, entrypoint and signature the runtimes see."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from contract.tensors import Signature, TensorSpec
from modelgen import expected_linear, make_onnx, make_openvino_ir, make_tflite
from packager.modelfile import ModelFileError, ModelInfo, inspect_model

LINEAR = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 3)),),
    outputs=(TensorSpec("y", "FP32", (-1, 2)),),
)
BATCH = np.arange(12, dtype=np.float32).reshape(4, 3) / 7 - 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    onnx_path = make_onnx(d / "linear.onnx")
    return {
        "onnx": onnx_path,
        "openvino": make_openvino_ir(onnx_path, d / "ir"),
        "tflite": make_tflite(d / "linear.tflite"),
    }


def blob(tmp_path: Path, data: bytes) -> Path:
    """Bytes stored under a name that says nothing, as the hub's blob store does."""
    path = tmp_path / f"blob-{len(list(tmp_path.iterdir()))}"
    path.write_bytes(data)
    return path


# ---- the builders make models that really run ---------------------------------


def test_onnx_runs_in_onnxruntime(models: dict[str, Path]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(models["onnx"], providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": BATCH})
    np.testing.assert_allclose(y, expected_linear(BATCH), atol=1e-5)


def test_onnx_with_fixed_batch(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = make_onnx(tmp_path / "fixed.onnx", batch=4)
    (y,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": BATCH})
    np.testing.assert_allclose(y, expected_linear(BATCH), atol=1e-5)
    assert inspect_model({"fixed.onnx": path}).signature == Signature(
        (TensorSpec("x", "FP32", (4, 3)),), (TensorSpec("y", "FP32", (4, 2)),)
    )


def test_onnx_bytes_are_deterministic(tmp_path: Path) -> None:
    first = make_onnx(tmp_path / "a.onnx").read_bytes()
    assert make_onnx(tmp_path / "b.onnx").read_bytes() == first


def test_openvino_ir_runs_in_openvino(models: dict[str, Path]) -> None:
    import openvino as ov

    # This CPU would otherwise run in bfloat16 and miss the 1e-5 tolerance.
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(models["openvino"], "CPU", config)
    y = compiled({"x": BATCH})[compiled.output("y")]
    np.testing.assert_allclose(y, expected_linear(BATCH), atol=1e-5)


def test_tflite_runs_in_litert(models: dict[str, Path]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(models["tflite"]))
    (x,) = interpreter.get_input_details()
    (y,) = interpreter.get_output_details()
    assert (x["name"], list(x["shape_signature"])) == ("x", [-1, 3])
    interpreter.resize_tensor_input(x["index"], list(BATCH.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(x["index"], BATCH)
    interpreter.invoke()
    got = interpreter.get_tensor(y["index"])
    np.testing.assert_allclose(got, expected_linear(BATCH), atol=1e-5)


def test_tflite_signature_runner(models: dict[str, Path]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(models["tflite"])).get_signature_runner("serving_default")
    np.testing.assert_allclose(runner(x=BATCH[:1])["y"], expected_linear(BATCH[:1]), atol=1e-5)


# ---- inspect_model on good models -------------------------------------------------


def test_inspect_onnx(models: dict[str, Path]) -> None:
    assert inspect_model({"model.onnx": models["onnx"]}) == ModelInfo("onnx", "model.onnx", LINEAR)


def test_inspect_tflite(models: dict[str, Path]) -> None:
    info = inspect_model({"m/linear.tflite": models["tflite"]})
    assert info == ModelInfo("tflite", "m/linear.tflite", LINEAR)


def test_inspect_openvino_ir_among_other_files(models: dict[str, Path], tmp_path: Path) -> None:
    xml = models["openvino"]
    files = {
        "ir/model.xml": xml,
        "ir/model.bin": xml.with_suffix(".bin"),
        "README.md": blob(tmp_path, b"# linear\n"),
    }
    assert inspect_model(files) == ModelInfo("openvino", "ir/model.xml", LINEAR)


def test_detection_uses_relative_names_not_disk_names(
    models: dict[str, Path], tmp_path: Path
) -> None:
    stored = blob(tmp_path, models["onnx"].read_bytes())
    assert inspect_model({"Model.ONNX": stored}).framework == "onnx"
    assert inspect_model({"model.bin": stored}) == ModelInfo(None, None, None)


def test_non_model_files_are_not_a_model(tmp_path: Path) -> None:
    files = {
        "model.pkl": blob(tmp_path, b"\x80\x04\x95\x00"),
        "README.md": blob(tmp_path, b"hello"),
        "pom.xml": blob(tmp_path, b"<project><version>1</version></project>"),
    }
    assert inspect_model(files) == ModelInfo(None, None, None)
    assert inspect_model({}) == ModelInfo(None, None, None)


def test_onnx_with_a_non_tensor_output_has_no_signature(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "seq.onnx"
    onnx.save(model, path)
    assert inspect_model({"seq.onnx": path}) == ModelInfo("onnx", "seq.onnx", None)


def test_openvino_ir_names_types_and_shapes_match_openvino(tmp_path: Path) -> None:
    import openvino as ov
    import openvino.opset13 as ops

    # Deliberately awkward: several names (one with a comma) on a tensor of
    # dynamic rank, an interval dimension, a scalar, an output with no name of
    # its own, and parameters not in name order.
    many = ops.parameter(ov.PartialShape.dynamic(), ov.Type.i64, name="zz_layer")
    many.output(0).get_tensor().set_names({"b_name", "a,name", "c_name"})
    interval = ops.parameter([ov.Dimension(1, 10), 3], ov.Type.f16, name="interval")
    flag = ops.parameter([], ov.Type.boolean, name="flag")
    raw = ops.parameter([2], ov.Type.u8, name="raw")
    outputs = [
        ops.result(ops.convert(interval, ov.Type.f32)),
        ops.result(ops.convert(many, ov.Type.i32)),
        ops.result(ops.logical_not(flag)),
        ops.result(raw),
    ]
    xml = tmp_path / "awkward.xml"
    ov.save_model(ov.Model(outputs, [many, interval, flag, raw], "awkward"), xml)

    info = inspect_model({"awkward.xml": xml, "awkward.bin": xml.with_suffix(".bin")})

    assert info.signature is not None
    assert info.signature.inputs == (
        TensorSpec("a,name", "INT64", ()),
        TensorSpec("interval", "FP16", (-1, 3)),
        TensorSpec("flag", "BOOL", ()),
        TensorSpec("raw", "UINT8", (2,)),
    )
    assert [o.datatype for o in info.signature.outputs] == ["FP32", "INT32", "BOOL", "UINT8"]
    model = ov.Core().read_model(xml)
    assert [t.name for t in info.signature.inputs] == [p.get_any_name() for p in model.inputs]
    assert [t.name for t in info.signature.outputs] == [r.get_any_name() for r in model.outputs]


def test_inspection_needs_no_runtime(models: dict[str, Path]) -> None:
    # The hub installs none of the runtimes; a fresh interpreter shows what gets imported.
    script = f"""
import sys
from pathlib import Path
from packager.modelfile import inspect_model
for name, path in [("m.onnx", {str(models["onnx"])!r}), ("m.tflite", {str(models["tflite"])!r}),
                   ("m.xml", {str(models["openvino"])!r})]:
    files = {{name: Path(path), "m.bin": Path(path).with_suffix(".bin")}}
    assert inspect_model(files).signature is not None, name
loaded = {{"onnxruntime", "openvino", "ai_edge_litert", "tensorflow"}} & set(sys.modules)
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True)


# ---- inspect_model on bad files --------------------------------------------------------


def test_corrupt_onnx(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"^model\.onnx is not a valid ONNX model: "):
        inspect_model({"model.onnx": blob(tmp_path, b"this is not protobuf at all \xff\xff")})


def test_empty_onnx(tmp_path: Path) -> None:
    # Protobuf happily parses zero bytes into an empty ModelProto.
    with pytest.raises(ModelFileError, match=r"model\.onnx is not a valid ONNX model"):
        inspect_model({"model.onnx": blob(tmp_path, b"")})


@pytest.mark.parametrize("keep", [0.5, 0.9, -1])
def test_truncated_tflite(models: dict[str, Path], tmp_path: Path, keep: float) -> None:
    data = models["tflite"].read_bytes()
    cut = data[: int(len(data) * keep)] if keep > 0 else data[:keep]
    with pytest.raises(ModelFileError, match=r"^m\.tflite is not a valid TFLite model .*truncated"):
        inspect_model({"m.tflite": blob(tmp_path, cut)})


def test_tflite_without_identifier(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"m\.tflite .*no TFL3 identifier"):
        inspect_model({"m.tflite": blob(tmp_path, b"\x00" * 64)})
    with pytest.raises(ModelFileError, match=r"m\.tflite .*only 3 bytes"):
        inspect_model({"m.tflite": blob(tmp_path, b"abc")})


def test_openvino_ir_without_bin(models: dict[str, Path]) -> None:
    with pytest.raises(ModelFileError, match=r"ir/model\.xml .*weights ir/model\.bin are missing"):
        inspect_model({"ir/model.xml": models["openvino"], "model.bin": models["openvino"]})


def test_malformed_xml(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"model\.xml is not valid XML"):
        inspect_model({"model.xml": blob(tmp_path, b"<<not xml")})


def test_broken_openvino_ir(tmp_path: Path) -> None:
    ir = b'<net><layers><layer id="0" name="x" type="Parameter"/></layers></net>'
    with pytest.raises(ModelFileError, match=r"m\.xml is not a valid OpenVINO IR: .*<data>"):
        inspect_model({"m.xml": blob(tmp_path, ir), "m.bin": blob(tmp_path, b"")})


def test_two_models(models: dict[str, Path]) -> None:
    files = {"a.onnx": models["onnx"], "b.tflite": models["tflite"]}
    listed = r"a\.onnx \(onnx\), b\.tflite \(tflite\)"
    with pytest.raises(ModelFileError, match=rf"more than one model.*{listed}"):
        inspect_model(files)


# ---- serialisation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "info",
    [
        ModelInfo("onnx", "model.onnx", LINEAR),
        ModelInfo("onnx", "seq.onnx", None),
        ModelInfo(None, None, None),
    ],
)
def test_model_info_round_trips_through_json(info: ModelInfo) -> None:
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_signature_dict_shape() -> None:
    assert LINEAR.to_dict() == {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
    assert Signature.from_dict(LINEAR.to_dict()) == LINEAR
