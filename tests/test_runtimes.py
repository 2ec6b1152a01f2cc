"""The agent's runtimes on real tiny models: answers, fallbacks, threads, bad input, bad files.

This machine has no GPU, NPU or Edge TPU. Tests that need one say "mocked" in
their name: they pretend the hardware is listed, to check what a runtime does
when it then cannot use it.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from agent.runtimes import get_runtime, load_best, runtime_for_framework
from agent.runtimes.base import LoadedModel, LoadOptions, ModelRuntimeError
from modelgen import expected_linear, make_onnx, make_openvino_ir, make_tflite
from packager.modelfile import inspect_model

BATCH = np.arange(12, dtype=np.float32).reshape(4, 3) / 7 - 0.5
# (runtime, file) pairs: every way this agent runs the linear model.
CASES = [
    ("onnxruntime", "linear.onnx"),
    ("openvino", "ir/linear.xml"),
    ("openvino", "linear.onnx"),
    ("openvino", "linear.tflite"),
    ("litert", "linear.tflite"),
]
IDS = [f"{runtime}-{Path(file).suffix[1:]}" for runtime, file in CASES]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    make_openvino_ir(make_onnx(d / "linear.onnx"), d / "ir")
    make_tflite(d / "linear.tflite")
    return d


@pytest.fixture(params=CASES, ids=IDS)
def loaded(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[LoadedModel]:
    runtime, file = request.param
    model = get_runtime(runtime).load(model_dir, file, LoadOptions())
    yield model
    model.close()


def load(model_dir: Path, runtime: str, file: str, **options: Any) -> LoadedModel:
    return get_runtime(runtime).load(model_dir, file, LoadOptions(**options))


# ---- answers ------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
def test_each_runtime_computes_the_linear_model(loaded: LoadedModel, batch: int) -> None:
    x = BATCH[:batch]
    (y,) = loaded.infer({"x": x}).values()
    assert y.shape == (batch, 2)
    np.testing.assert_allclose(y, expected_linear(x), atol=1e-5)
    assert (loaded.device, loaded.fallback_reason) == ("CPU", None)


def test_runtimes_agree_with_each_other(model_dir: Path) -> None:
    answers = {}
    for (runtime, file), case in zip(CASES, IDS, strict=True):
        model = load(model_dir, runtime, file)
        answers[case] = [model.infer({"x": BATCH[:n]})["y"] for n in (1, 4, 1)]
    first = answers[IDS[0]]
    for case, answer in answers.items():
        for got, want in zip(answer, first, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=case)


@pytest.mark.parametrize(("runtime", "file"), CASES, ids=IDS)
def test_signature_matches_what_modelfile_reads(model_dir: Path, runtime: str, file: str) -> None:
    names = [file, Path(file).with_suffix(".bin").as_posix()] if file.endswith(".xml") else [file]
    files = {name: model_dir / name for name in names}
    assert load(model_dir, runtime, file).signature == inspect_model(files).signature


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "litert"])
def test_threads_option_is_accepted(model_dir: Path, runtime: str) -> None:
    file = {"onnxruntime": "linear.onnx", "openvino": "linear.onnx", "litert": "linear.tflite"}
    model = load(model_dir, runtime, file[runtime], threads=1)
    np.testing.assert_allclose(model.infer({"x": BATCH})["y"], expected_linear(BATCH), atol=1e-5)


def test_openvino_defaults_to_f32_on_cpu_and_auto(model_dir: Path) -> None:
    """This CPU has bfloat16, OpenVINO's default precision for it; edgefleet asks for f32."""
    x = BATCH * 3.3
    for device in ["CPU", "AUTO"]:
        model = load(model_dir, "openvino", "ir/linear.xml", prefer=[f"openvino:{device}"])
        assert model.device == "CPU"  # what AUTO picked, read back
        np.testing.assert_allclose(model.infer({"x": x})["y"], expected_linear(x), atol=1e-5)


def test_openvino_precision_option_reaches_the_device(model_dir: Path) -> None:
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16, so bf16 and f32 give the same answers")
    x = BATCH * 3.3
    model = load(model_dir, "openvino", "ir/linear.xml", precision="bf16")
    error = np.abs(model.infer({"x": x})["y"] - expected_linear(x)).max()
    assert 1e-4 < error < 0.1


# ---- preferences and fallback -----------------------------------------------------


@pytest.mark.parametrize(
    ("runtime", "file", "prefer", "reason"),
    [
        ("onnxruntime", "linear.onnx", "onnxruntime:CUDA", "CUDA: not in this onnxruntime build"),
        ("onnxruntime", "linear.onnx", "onnxruntime:TensorRT", "TensorRT: not in this"),
        (
            "openvino",
            "ir/linear.xml",
            "openvino:GPU",
            "GPU: not among OpenVINO's devices here (CPU)",
        ),
        ("openvino", "linear.onnx", "openvino:NPU", "NPU: not among OpenVINO's devices here (CPU)"),
        ("litert", "linear.tflite", "litert:EdgeTPU", "EdgeTPU: libedgetpu.so.1 cannot be opened"),
        (
            "litert",
            "linear.tflite",
            "litert:GPU",
            "GPU: libtensorflowlite_gpu_delegate.so cannot be",
        ),
        ("litert", "linear.tflite", "litert:Hexagon", "Hexagon: no such LiteRT delegate"),
    ],
)
def test_unavailable_device_falls_back_to_cpu_and_says_why(
    model_dir: Path, runtime: str, file: str, prefer: str, reason: str
) -> None:
    model = load(model_dir, runtime, file, prefer=[prefer, f"{runtime}:CPU"])
    assert model.device == "CPU"
    assert model.fallback_reason is not None and reason in model.fallback_reason
    np.testing.assert_allclose(model.infer({"x": BATCH})["y"], expected_linear(BATCH), atol=1e-5)


@pytest.mark.parametrize(
    ("runtime", "file", "prefer"),
    [
        ("onnxruntime", "linear.onnx", "onnxruntime:CUDA"),
        ("openvino", "linear.onnx", "openvino:GPU"),
        ("litert", "linear.tflite", "litert:EdgeTPU"),
    ],
)
def test_without_fallback_an_unavailable_device_is_an_error(
    model_dir: Path, runtime: str, file: str, prefer: str
) -> None:
    with pytest.raises(ModelRuntimeError, match=f"^{prefer}: "):
        load(model_dir, runtime, file, prefer=[prefer], fallback=False)


def test_preferences_of_other_runtimes_are_ignored(model_dir: Path) -> None:
    model = load(model_dir, "onnxruntime", "linear.onnx", prefer=["openvino:NPU", "litert:GPU"])
    assert (model.device, model.fallback_reason) == ("CPU", None)


def test_onnxruntime_reads_back_cpu_when_mocked_cuda_provider_is_dropped(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mock of a CUDA build on a machine without a usable GPU (none here): the agent sees
    CUDAExecutionProvider offered, asks for it, and the session silently runs on CPU."""
    import onnxruntime as ort

    offered = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *offered])
    assert "onnxruntime:CUDA" in get_runtime("onnxruntime").accelerators()
    # The session itself knows this build has no CUDA, warns, and drops it: the silent
    # fallback a CUDA build does when the driver or GPU is missing.
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        model = load(model_dir, "onnxruntime", "linear.onnx", prefer=["onnxruntime:CUDA"])
    assert model.device == "CPU"
    assert model.fallback_reason == "CUDA: onnxruntime could not use it and fell back (see its log)"
    with pytest.warns(UserWarning), pytest.raises(ModelRuntimeError, match="onnxruntime:CUDA: "):
        load(model_dir, "onnxruntime", "linear.onnx", prefer=["onnxruntime:CUDA"], fallback=False)


def test_openvino_falls_back_when_mocked_gpu_fails_to_compile(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mock of a listed GPU (none here): OpenVINO's GPU plugin then fails to start
    (no OpenCL on this machine), and the model compiles on CPU instead."""
    import openvino as ov

    monkeypatch.setattr(ov.Core, "available_devices", property(lambda self: ["CPU", "GPU"]))
    model = load(model_dir, "openvino", "ir/linear.xml", prefer=["openvino:GPU"])
    assert model.device == "CPU"
    assert model.fallback_reason is not None and model.fallback_reason.startswith("GPU: ")
    np.testing.assert_allclose(model.infer({"x": BATCH})["y"], expected_linear(BATCH), atol=1e-5)


def test_litert_falls_back_when_mocked_edgetpu_library_is_not_a_delegate(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mock of an installed Edge TPU library (none here): libm stands in, a library that
    opens but is no delegate, which must not crash or leak LiteRT's half-built Delegate."""
    from agent.runtimes import litert

    monkeypatch.setitem(litert.DELEGATES, "EdgeTPU", "libm.so.6")
    model = load(model_dir, "litert", "linear.tflite", prefer=["litert:EdgeTPU"])
    assert model.device == "CPU"
    assert model.fallback_reason == "EdgeTPU: libm.so.6 is not a TFLite delegate plugin"
    assert get_runtime("litert").accelerators() == ["litert:CPU"]


def test_litert_uses_tflite_runtime_when_ai_edge_litert_is_missing(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mock of a device with only tflite_runtime: ai_edge_litert's interpreter stands in."""
    from ai_edge_litert import interpreter

    tflite_runtime = ModuleType("tflite_runtime")
    tflite_runtime.__version__ = "2.14.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", tflite_runtime)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", interpreter)
    runtime = get_runtime("litert")
    assert runtime.version() == "tflite_runtime 2.14.0"
    model = runtime.load(model_dir, "linear.tflite", LoadOptions())
    np.testing.assert_allclose(model.infer({"x": BATCH})["y"], expected_linear(BATCH), atol=1e-5)


# ---- threads --------------------------------------------------------------------


def test_concurrent_infer_gives_every_caller_its_own_answer(loaded: LoadedModel) -> None:
    """8 threads x 200 calls, each with its own values and batch size (1 to 4), so a
    request pool or a LiteRT resize that mixed calls up would show."""
    errors: list[str] = []
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        start.wait()
        for i in range(200):
            x = BATCH[: 1 + (worker + i) % 4] + worker * 10 + i
            y = loaded.infer({"x": x})["y"]
            if y.shape != (len(x), 2) or not np.allclose(y, expected_linear(x), atol=1e-3):
                errors.append(f"worker {worker} call {i}: got {y.tolist()}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"z": BATCH},
            "unknown input 'z'; missing input 'x'; the model's inputs are: x (FP32 [-1, 3])",
        ),
        ({}, "missing input 'x'"),
        ({"x": BATCH, "z": BATCH}, "unknown input 'z'"),
        (
            {"x": BATCH.astype(np.float64)},
            "input 'x' is float64, but the model wants FP32 (float32)",
        ),
        ({"x": BATCH.astype(np.int64)}, "input 'x' is int64, but the model wants FP32"),
        (
            {"x": np.zeros((2, 4), np.float32)},
            "input 'x' has shape [2, 4], but the model wants [-1, 3]",
        ),
        ({"x": np.zeros(3, np.float32)}, "input 'x' has shape [3], but the model wants [-1, 3]"),
        ({"x": BATCH.tolist()}, "input 'x' is a list, not a numpy array"),
    ],
    ids=["wrong-name", "none", "extra", "float64", "int64", "wrong-width", "wrong-rank", "list"],
)
def test_bad_inputs_are_refused_clearly(
    loaded: LoadedModel, inputs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelRuntimeError) as caught:
        loaded.infer(inputs)
    assert message in str(caught.value)
    # and the model still works
    np.testing.assert_allclose(loaded.infer({"x": BATCH})["y"], expected_linear(BATCH), atol=1e-5)


def test_closed_model_refuses_calls(loaded: LoadedModel) -> None:
    loaded.close()
    with pytest.raises(ModelRuntimeError, match="closed"):
        loaded.infer({"x": BATCH})


def test_tensor_types_v2_cannot_carry_are_refused_at_load(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "bf16.onnx").write_bytes(model.SerializeToString())
    for runtime, native in [("onnxruntime", "tensor(bfloat16)"), ("openvino", "bf16")]:
        with pytest.raises(
            ModelRuntimeError, match=rf"tensor 'x' has type {re.escape(native)}, which"
        ):
            load(tmp_path, runtime, "bf16.onnx")


# ---- bad files ------------------------------------------------------------------


def corrupt(model_dir: Path, tmp_path: Path, file: str, how: str) -> Path:
    """A copy of MODEL_DIR with FILE damaged: "garbage" bytes, "truncated" to half, or "missing"."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    path = copy / file
    if how == "garbage":
        path.write_bytes(b"this is not a model " * 10)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    return copy


@pytest.mark.parametrize("how", ["garbage", "truncated", "missing"])
@pytest.mark.parametrize(("runtime", "file"), CASES, ids=IDS)
def test_corrupt_model_file_is_a_model_runtime_error(
    model_dir: Path, tmp_path: Path, runtime: str, file: str, how: str
) -> None:
    damaged = corrupt(model_dir, tmp_path, file, how)
    with pytest.raises(ModelRuntimeError):
        load(damaged, runtime, file)


def test_openvino_ir_without_its_weights_is_a_model_runtime_error(
    model_dir: Path, tmp_path: Path
) -> None:
    damaged = corrupt(model_dir, tmp_path, "ir/linear.bin", "missing")
    with pytest.raises(ModelRuntimeError, match=r"openvino cannot read ir/linear\.xml"):
        load(damaged, "openvino", "ir/linear.xml")


def test_entrypoint_outside_the_model_directory_is_refused(model_dir: Path) -> None:
    with pytest.raises(ModelRuntimeError, match="outside the model directory"):
        load(model_dir / "ir", "onnxruntime", "../linear.onnx")


# ---- registry -------------------------------------------------------------------


def test_missing_runtime_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails
    with pytest.raises(ModelRuntimeError) as caught:
        get_runtime("openvino")
    assert (
        str(caught.value)
        == "openvino is not installed on this device: pip install 'edgefleet[openvino]'"
    )


def test_unknown_runtime_and_framework() -> None:
    with pytest.raises(
        ModelRuntimeError, match="unknown runtime 'tensorrt'; known: onnxruntime, openvino, litert"
    ):
        get_runtime("tensorrt")
    with pytest.raises(ModelRuntimeError, match="no runtime for 'pytorch' models"):
        runtime_for_framework("pytorch")
    assert [runtime_for_framework(f) for f in ["onnx", "openvino", "tflite"]] == [
        "onnxruntime",
        "openvino",
        "litert",
    ]


def test_bad_preference_fails_when_options_are_built() -> None:
    with pytest.raises(ValueError, match="'CUDA' is not of the form runtime:DEVICE"):
        LoadOptions(prefer=["CUDA"])


def test_load_best_walks_preferences_across_runtimes(model_dir: Path) -> None:
    model = load_best(
        model_dir,
        "linear.onnx",
        "onnx",
        LoadOptions(
            prefer=[
                "openvino:NPU",
                "litert:GPU",
                "onnxruntime:CUDA",
                "openvino:CPU",
                "onnxruntime:CPU",
            ]
        ),
    )
    # OpenVINO runs the .onnx: openvino:CPU comes before onnxruntime:CPU.
    assert (model.runtime, model.device) == ("openvino", "CPU")
    assert model.fallback_reason == (
        "openvino:NPU: not among OpenVINO's devices here (CPU); "
        "litert cannot load onnx models; "
        "onnxruntime:CUDA: not in this onnxruntime build (it offers CPU)"
    )
    np.testing.assert_allclose(model.infer({"x": BATCH})["y"], expected_linear(BATCH), atol=1e-5)


def test_load_best_uses_openvino_auto_for_an_onnx_model(model_dir: Path) -> None:
    model = load_best(model_dir, "linear.onnx", "onnx", LoadOptions(prefer=["openvino:AUTO"]))
    assert (model.runtime, model.device, model.fallback_reason) == ("openvino", "CPU", None)


@pytest.mark.parametrize(
    ("file", "framework", "runtime"),
    [
        ("linear.onnx", "onnx", "onnxruntime"),
        ("ir/linear.xml", "openvino", "openvino"),
        ("linear.tflite", "tflite", "litert"),
    ],
)
def test_load_best_without_preferences_uses_the_frameworks_runtime(
    model_dir: Path, file: str, framework: str, runtime: str
) -> None:
    model = load_best(model_dir, file, framework)
    assert (model.runtime, model.device, model.fallback_reason) == (runtime, "CPU", None)


def test_load_best_falls_back_to_cpu_when_no_preference_works(model_dir: Path) -> None:
    model = load_best(model_dir, "linear.tflite", "tflite", LoadOptions(prefer=["litert:EdgeTPU"]))
    assert (model.runtime, model.device) == ("litert", "CPU")
    assert model.fallback_reason is not None and model.fallback_reason.startswith(
        "litert:EdgeTPU: libedgetpu.so.1 cannot be opened"
    )
    with pytest.raises(ModelRuntimeError, match="litert:EdgeTPU"):
        load_best(
            model_dir,
            "linear.tflite",
            "tflite",
            LoadOptions(prefer=["litert:EdgeTPU"], fallback=False),
        )


def test_load_best_uses_another_reader_when_the_frameworks_runtime_is_missing(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model = load_best(model_dir, "linear.onnx", "onnx")
    assert (model.runtime, model.device) == ("openvino", "CPU")
    assert (
        model.fallback_reason
        == "onnxruntime is not installed on this device: pip install 'edgefleet[onnx]'"
    )


def test_load_best_reports_every_failure_of_a_corrupt_model(
    model_dir: Path, tmp_path: Path
) -> None:
    damaged = corrupt(model_dir, tmp_path, "linear.onnx", "garbage")
    with pytest.raises(ModelRuntimeError) as caught:
        load_best(damaged, "linear.onnx", "onnx", LoadOptions(prefer=["onnxruntime:CPU"]))
    message = str(caught.value)
    assert message.startswith(
        "no runtime could load linear.onnx: onnxruntime cannot load linear.onnx"
    )
    assert "openvino cannot read linear.onnx" in message
    assert message.count("onnxruntime cannot load") == 1  # onnxruntime:CPU is not tried twice
