"""prepare_model: conversion, fp16/int8 and the accuracy check, on real models and runtimes.

Models: the tiny linear ones from modelgen (ONNX, IR, TFLite), an MLP with 1.7k seeded
random weights and two outputs (logits and their softmax), and scikit-learn's diabetes
Ridge exported by skl2onnx, whose answers are in the hundreds.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.runtimes import run_on_cpu
from modelgen import ONNX_IR_VERSION, ONNX_OPSET, make_onnx, make_openvino_ir, make_tflite
from packager.modelfile import ModelInfo, inspect_model
from packager.prepare import (
    DEFAULT_TOLERANCE,
    AccuracyError,
    PreparedModel,
    PrepareError,
    prepare_model,
)
from packager_fixtures import build

MLP_SIZES = (16, 32, 32, 4)


def make_mlp(path: Path) -> Path:
    """x FP32 [N,16] -> two ReLU layers of 32 -> logits [N,4] and probs = softmax(logits).

    MatMul + Add rather than Gemm, as onnxruntime's dynamic quantisation only takes MatMul.
    """
    rng = np.random.default_rng(7)
    nodes, weights, layer_input = [], [], "x"
    layers = list(itertools.pairwise(MLP_SIZES))
    for number, (fan_in, fan_out) in enumerate(layers):
        w = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        b = rng.standard_normal(fan_out) * 0.1
        weights += [
            numpy_helper.from_array(w.astype(np.float32), f"w{number}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{number}"),
        ]
        last = number == len(layers) - 1
        added = "logits" if last else f"added{number}"
        nodes += [
            helper.make_node("MatMul", [layer_input, f"w{number}"], [f"product{number}"]),
            helper.make_node("Add", [f"product{number}", f"b{number}"], [added]),
        ]
        if not last:
            layer_input = f"hidden{number}"
            nodes.append(helper.make_node("Relu", [added], [layer_input]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", MLP_SIZES[-1]])
        for name in ("logits", "probs")
    ]
    return _save_onnx(
        path,
        helper.make_graph(
            nodes,
            "mlp",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_SIZES[0]])],
            outputs,
            weights,
        ),
    )


def make_sqrt(path: Path) -> Path:
    """y = sqrt(x): NaN for the negative half of random inputs, in every runtime."""
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"])],
        "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    return _save_onnx(path, graph)


def _save_onnx(path: Path, graph: onnx.GraphProto) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def make_ridge(path: Path) -> Path:
    """The diabetes Ridge regression as MatMul + Add (black_op keeps skl2onnx off the
    ai.onnx.ml LinearRegressor, which OpenVINO cannot read)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    x, y = load_diabetes(return_X_y=True)
    model = to_onnx(
        Ridge(alpha=0.1).fit(x, y),
        x[:1].astype(np.float32),
        black_op={"LinearRegressor"},
        target_opset=ONNX_OPSET,
    )
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Model name -> its files: the model and assets/labels.txt, which is not a model."""
    root = tmp_path_factory.mktemp("models")
    labels = root / "labels.txt"
    labels.write_text("low\nhigh\n")
    tiny = make_onnx(root / "tiny" / "model.onnx")
    ir = make_openvino_ir(tiny, root / "ir")
    models = {
        "tiny": {"model.onnx": tiny},
        "tiny-ir": {"model.xml": ir, "model.bin": ir.with_suffix(".bin")},
        "tiny-tflite": {"model.tflite": make_tflite(root / "tflite" / "model.tflite")},
        "mlp": {"nets/mlp.onnx": make_mlp(root / "mlp.onnx")},
        "ridge": {"ridge.onnx": make_ridge(root / "ridge.onnx")},
        "sqrt": {"sqrt.onnx": make_sqrt(root / "sqrt.onnx")},
    }
    return {name: {**files, "assets/labels.txt": labels} for name, files in models.items()}


def prepare(
    files: dict[str, Path],
    work_dir: Path,
    *,
    runtime: str,
    optimize: str | None = None,
    max_abs_diff: float | None = None,
    samples: int = 16,
    progress: Callable[[str], None] | None = None,
) -> PreparedModel:
    """prepare_model with the signature inspect_model finds in FILES."""
    return prepare_model(
        files,
        inspect_model(files),
        runtime=runtime,
        optimize=optimize,
        work_dir=work_dir,
        run=run_on_cpu,
        max_abs_diff=max_abs_diff,
        samples=samples,
        progress=progress,
    )


def model_bytes(prepared: PreparedModel) -> dict[str, bytes]:
    return {
        name: path.read_bytes()
        for name, path in prepared.files.items()
        if not name.startswith("assets/")
    }


def size(files: dict[str, Path], *names: str) -> int:
    return sum(files[name].stat().st_size for name in names)


# ---- conversion ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "entrypoint", "xml"),
    [
        ("tiny", "model.onnx", "model.xml"),
        ("tiny-tflite", "model.tflite", "model.xml"),
        ("mlp", "nets/mlp.onnx", "nets/mlp.xml"),
        ("ridge", "ridge.onnx", "ridge.xml"),
    ],
)
def test_conversion_to_openvino_ir_is_near_exact(
    models: dict[str, dict[str, Path]], tmp_path: Path, model: str, entrypoint: str, xml: str
) -> None:
    files = models[model]
    prepared = prepare(files, tmp_path, runtime="openvino")

    bin_ = xml.removesuffix(".xml") + ".bin"
    assert set(prepared.files) == {xml, bin_, "assets/labels.txt"}
    assert prepared.info.framework == "openvino" and prepared.info.entrypoint == xml
    signature = prepared.info.signature
    assert signature is not None and signature == inspect_model(files).signature
    accuracy = prepared.accuracy
    assert accuracy is not None and accuracy.ok
    assert accuracy.samples == 17  # the sample request and 16 random inputs
    assert accuracy.max_abs < 1e-5, accuracy.describe()
    assert set(accuracy.outputs) == {t.name for t in signature.outputs}
    print(f"{model} -> IR: {accuracy.describe()}")


def test_conversion_to_openvino_ir_is_deterministic(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    # OpenVINO numbers the nodes it creates from a counter shared by the whole process, so
    # the second conversion here would name them differently unless they are renumbered.
    runs = [
        model_bytes(prepare(models["mlp"], tmp_path / str(n), runtime="openvino")) for n in range(2)
    ]
    assert runs[0] == runs[1]
    xml = runs[0]["nets/mlp.xml"].decode()
    assert "<layer id=" in xml and str(tmp_path) not in xml


def test_models_a_runtime_runs_as_they_are_pass_through(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    for model, runtime in [
        ("tiny", "onnxruntime"),
        ("tiny-ir", "openvino"),
        ("tiny-tflite", "litert"),
    ]:
        files = models[model]
        info = inspect_model(files)
        prepared = prepare_model(
            files, info, runtime=runtime, optimize=None, work_dir=tmp_path / model,
            run=run_on_cpu,
        )
        assert prepared.files == files and prepared.info == info
        assert prepared.accuracy is None
        assert "as it is" in prepared.notes[0]
        assert not (tmp_path / model).exists()


def test_files_besides_the_model_are_carried_along(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    files = models["mlp"]
    prepared = prepare(files, tmp_path, runtime="onnxruntime", optimize="fp16")
    assert prepared.files["assets/labels.txt"] == files["assets/labels.txt"]
    assert prepared.files["nets/mlp.onnx"].is_relative_to(tmp_path)
    assert files["nets/mlp.onnx"].read_bytes() != prepared.files["nets/mlp.onnx"].read_bytes()


def test_prepared_files_feed_build_package(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    prepared = prepare(models["tiny"], tmp_path / "work", runtime="openvino")
    result = build(tmp_path / "layout", prepared.files, info=prepared.info, runtime="openvino")
    assert result.digest.startswith("sha256:")


# ---- optimisation ------------------------------------------------------------


@pytest.mark.parametrize("optimize", ["fp16", "int8"])
def test_onnx_optimisations_shrink_the_mlp_within_the_default_threshold(
    models: dict[str, dict[str, Path]], tmp_path: Path, optimize: str
) -> None:
    files = models["mlp"]
    prepared = prepare(files, tmp_path, runtime="onnxruntime", optimize=optimize)

    assert prepared.info.signature == inspect_model(files).signature  # I/O stays FP32
    before, after = size(files, "nets/mlp.onnx"), size(prepared.files, "nets/mlp.onnx")
    accuracy = prepared.accuracy
    assert accuracy is not None and accuracy.ok
    print(
        f"mlp {optimize}: {before} -> {after} bytes ({after / before:.0%}); {accuracy.describe()}"
    )
    assert after < 0.65 * before
    # Nonzero (it did change the model) and within the default threshold. The margin below
    # it is the quantiser's: onnxruntime 1.32's dynamic int8 lands at ~0.7 of it on this MLP.
    assert 0 < accuracy.max_abs < accuracy.threshold


def test_int8_quantises_the_matmuls(models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    prepared = prepare(models["mlp"], tmp_path, runtime="onnxruntime", optimize="int8")
    model = onnx.load(prepared.files["nets/mlp.onnx"])
    kinds = [node.op_type for node in model.graph.node]
    assert kinds.count("MatMulInteger") == 3 and "MatMul" not in kinds
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")} == {
        TensorProto.INT8
    }
    # Only the standard domain: an older onnxruntime on a device must load it too.
    assert [(o.domain, o.version) for o in model.opset_import] == [("", ONNX_OPSET)]


def test_fp16_keeps_fp32_inputs_and_outputs_with_fp16_weights(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    prepared = prepare(models["mlp"], tmp_path, runtime="onnxruntime", optimize="fp16")
    model = onnx.load(prepared.files["nets/mlp.onnx"])
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}
    assert [n.op_type for n in model.graph.node].count("Cast") == 3  # x in; logits, probs out


def test_openvino_fp16_halves_the_weights(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    f32 = prepare(models["mlp"], tmp_path / "f32", runtime="openvino")
    f16 = prepare(models["mlp"], tmp_path / "f16", runtime="openvino", optimize="fp16")
    weights_f32, weights_f16 = size(f32.files, "nets/mlp.bin"), size(f16.files, "nets/mlp.bin")
    assert weights_f16 == weights_f32 // 2
    assert f16.accuracy is not None and 0 < f16.accuracy.max_abs < 1e-2
    assert f16.info.signature == f32.info.signature
    print(f"mlp IR fp16: .bin {weights_f32} -> {weights_f16} bytes; {f16.accuracy.describe()}")


def test_an_ir_gets_fp16_weights_in_place(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    files = models["tiny-ir"]
    prepared = prepare(files, tmp_path, runtime="openvino", optimize="fp16")
    assert set(prepared.files) == set(files)
    assert size(prepared.files, "model.bin") == size(files, "model.bin") // 2
    assert prepared.accuracy is not None and prepared.accuracy.ok


@pytest.mark.parametrize(
    ("runtime", "optimize"),
    [("onnxruntime", "fp16"), ("onnxruntime", "int8"), ("openvino", "fp16")],
)
def test_optimised_models_are_deterministic(
    models: dict[str, dict[str, Path]], tmp_path: Path, runtime: str, optimize: str
) -> None:
    runs = [
        model_bytes(prepare(models["mlp"], tmp_path / str(n), runtime=runtime, optimize=optimize))
        for n in range(2)
    ]
    assert runs[0] == runs[1]
    print(runtime, optimize, {k: hashlib.sha256(v).hexdigest()[:12] for k, v in runs[0].items()})


# ---- the accuracy check ------------------------------------------------------


def test_an_absurd_threshold_fails_with_the_numbers(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    with pytest.raises(AccuracyError) as caught:
        prepare(
            models["mlp"],
            tmp_path,
            runtime="onnxruntime",
            optimize="int8",
            max_abs_diff=1e-12,
        )
    report = caught.value.report
    message = str(caught.value)
    assert not report.ok and report.threshold == 1e-12
    assert f"max abs diff {report.max_abs:.3g}, mean {report.mean_abs:.3g}" in message
    for name, (top, mean) in report.outputs.items():
        assert f"{name} {top:.3g} / {mean:.3g}" in message
    assert "--max-abs-diff" in message and "--optimize fp16" in message


def test_the_default_threshold_follows_the_size_of_the_answers(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    # The Ridge answers in the thousands on random inputs: fp16 moves it by a fraction of
    # one, fine by default, while the same absolute bound as the MLP's would refuse it.
    files = models["ridge"]
    prepared = prepare(files, tmp_path / "default", runtime="onnxruntime", optimize="fp16")
    accuracy = prepared.accuracy
    assert accuracy is not None and accuracy.max_abs > 1e-2
    assert accuracy.threshold > 100 * DEFAULT_TOLERANCE["fp16"]
    print(f"ridge fp16: {accuracy.describe()}")
    with pytest.raises(AccuracyError):
        prepare(
            files, tmp_path / "strict", runtime="onnxruntime", optimize="fp16", max_abs_diff=1e-2
        )


def test_nan_in_both_models_counts_as_equal(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    prepared = prepare(models["sqrt"], tmp_path, runtime="openvino")
    assert prepared.accuracy is not None and prepared.accuracy.max_abs == 0


def test_progress_names_each_step(models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    steps: list[str] = []
    prepare(
        models["tiny"],
        tmp_path,
        runtime="openvino",
        optimize="fp16",
        samples=3,
        progress=steps.append,
    )
    assert steps == [
        "convert model.onnx to OpenVINO IR model.xml with fp16 weights",
        "check the prepared model on 4 inputs",
    ]


# ---- refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "runtime", "optimize", "message"),
    [
        (
            "tiny-tflite",
            "onnxruntime",
            None,
            "runtime onnxruntime cannot run tflite models; use openvino or litert",
        ),
        ("tiny", "litert", "fp16", "runtime litert cannot run onnx models"),
        (
            "tiny",
            "openvino",
            "int8",
            "int8 is not supported for the openvino runtime yet; it offers fp16, "
            "or package for onnxruntime",
        ),
        (
            "tiny-tflite",
            "litert",
            "fp16",
            "fp16 is not supported for the litert runtime yet; package without --optimize, "
            "or package for openvino",
        ),
        ("tiny", "onnxruntime", "int4", "unknown optimisation 'int4'; choose fp16 or int8"),
        ("tiny", "tensorrt", None, "unknown runtime 'tensorrt'"),
    ],
)
def test_what_cannot_work_is_refused_before_any_work(
    models: dict[str, dict[str, Path]],
    tmp_path: Path,
    model: str,
    runtime: str,
    optimize: str | None,
    message: str,
) -> None:
    with pytest.raises(PrepareError, match=re.escape(message)):
        prepare(models[model], tmp_path / "work", runtime=runtime, optimize=optimize)
    assert not (tmp_path / "work").exists()


def test_bad_options_are_refused(models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    files = models["tiny"]
    with pytest.raises(PrepareError, match="max_abs_diff must be a number >= 0"):
        prepare(files, tmp_path / "a", runtime="openvino", max_abs_diff=float("nan"))
    with pytest.raises(PrepareError, match="samples must be >= 0"):
        prepare(files, tmp_path / "b", runtime="openvino", samples=-1)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old").write_text("")
    with pytest.raises(PrepareError, match="is not empty"):
        prepare(files, tmp_path / "used", runtime="openvino")


def test_a_model_without_a_signature_cannot_be_checked(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    files = models["tiny"]
    info = ModelInfo("onnx", "model.onnx", None)
    with pytest.raises(PrepareError, match="no signature to check the result with"):
        prepare_model(
            files, info, runtime="openvino", optimize=None, work_dir=tmp_path, run=run_on_cpu
        )


def test_a_prepared_file_may_not_replace_another(
    models: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    files = {**models["tiny"], "model.bin": models["tiny"]["assets/labels.txt"]}
    with pytest.raises(PrepareError, match=r"model\.bin would replace a file"):
        prepare(files, tmp_path, runtime="openvino")
