"""Prepare a model for the runtime its package targets: convert it, optionally shrink it, and
check that it still answers like the original.

`prepare_model` runs before `packager.build.build_package`, and what it returns (files and
ModelInfo) feeds that directly. Conversion and optimisation live together here because for
OpenVINO they are one step: fp16 weights are an option of saving the IR.

What a package carries, by runtime:

- openvino: OpenVINO IR. ONNX and TFLite models are converted (`openvino.convert_model`), so
  devices load the IR without converting it at every start; an IR passes through.
- onnxruntime: the ONNX model; litert: the TFLite model. Any other pair is refused by
  `contract.runtimes.choose_runtime`.

Optimisations:

- fp16, ONNX: `onnxruntime.transformers.float16` with keep_io_types, which converts float
  weights and tensors to float16 and casts at the inputs and outputs, so the signature (and
  every client) stays FP32. OpenVINO: weights stored as f16 (`compress_to_fp16`), widened to
  f32 when the model is loaded.
- int8, ONNX: dynamic quantisation (int8 weights, activations quantised on each call), after
  the shape inference step of `quant_pre_process`. Its onnxruntime graph optimisation is left
  out: it writes the opset of every domain the building onnxruntime knows into the model,
  which an older onnxruntime on a device may refuse. Not offered for OpenVINO or TFLite yet.

Accuracy: the original runs on its framework's own runtime and the prepared model on the
package's runtime, both on CPU at f32 through the runner the caller passes in: the agent's
`agent.runtimes.run_on_cpu`, the code a device runs (the packager does not import the agent;
f32 keeps OpenVINO off bfloat16, which would blur the comparison). Inputs are the package's
sample request plus SAMPLES seeded random ones. Unless max_abs_diff is given, the allowed
difference is DEFAULT_TOLERANCE[optimisation] times the largest reference output (at least
1), since a fixed number would be strict for a regressor answering in the hundreds and loose
for probabilities.

Determinism: the same model gives the same bytes. OpenVINO names the nodes it creates (by
constant folding, for instance) "<type>_<n>" from a counter shared by the whole process, so
the IR of one model used to depend on what the process had converted before; such names are
renumbered by their position in the graph before saving. The IR records the OpenVINO
version, so another OpenVINO release may write other bytes.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from contract.errors import PackageError
from contract.runtimes import DEFAULT_RUNTIME, RUNTIMES, choose_runtime
from contract.serving import sample_request
from contract.tensors import NUMPY_DTYPES, Signature, TensorSpec
from packager.modelfile import ModelInfo, inspect_model
from packager.tarball import check_relative_path

if TYPE_CHECKING:
    import numpy as np

    Tensors = dict[str, np.ndarray]

OPTIMIZATIONS = ("fp16", "int8")
# The allowed max abs diff, as a fraction of the largest reference output (at least 1).
# Conversion: only kernels differ, which moves deep f32 models by ~1e-6 relative; 1e-4 still
# catches a lost bias or a transposed weight. fp16 keeps ~3 significant digits per value and
# errors add up over layers. int8 moved a 3-layer MLP by ~1.5%; the check is a guard against
# broken quantisation, not a verdict on quality, which needs the model's own validation data.
DEFAULT_TOLERANCE: dict[str | None, float] = {None: 1e-4, "fp16": 1e-2, "int8": 5e-2}
# The optimisations each packaged model format supports.
_OPTIMIZATIONS_OF = {"onnx": ("fp16", "int8"), "openvino": ("fp16",), "tflite": ()}
# What to install for a library a step imports.
_INSTALL = {
    "onnx": "edgefleet[packager]",
    "onnxruntime": f"edgefleet[{RUNTIMES['onnxruntime'].extra}]",
    "openvino": f"edgefleet[{RUNTIMES['openvino'].extra}]",
}
# OpenVINO's names for the nodes it creates: type, underscore, a process-wide counter.
_GENERATED_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*_\d+")
# Random inputs give every dynamic dimension one size in this range, so that inputs which
# share a dimension (a batch) agree.
_DYNAMIC_SIZES = (1, 4)


# What a runtime answers, as a device runs it: (runtime, model directory, entrypoint,
# inputs) -> one answer per input, on CPU at f32. The caller passes the agent's; whatever it
# raises fails the accuracy check with its message.
ModelRunner = Callable[[str, Path, str, "list[Tensors]"], "list[Tensors]"]


class PrepareError(PackageError):
    """A model could not be prepared for its package; the message says what to do instead."""


@dataclass(frozen=True)
class AccuracyReport:
    """How far the prepared model's outputs are from the original's, over SAMPLES inputs."""

    outputs: Mapping[str, tuple[float, float]]  # output name -> (max abs diff, mean abs diff)
    max_abs: float
    mean_abs: float
    samples: int
    threshold: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.threshold

    def describe(self) -> str:
        each = "; ".join(
            f"{name} {top:.3g} / {mean:.3g}" for name, (top, mean) in self.outputs.items()
        )
        return (
            f"max abs diff {self.max_abs:.3g}, mean {self.mean_abs:.3g} over {self.samples} "
            f"inputs (allowed {self.threshold:.3g}); per output, max / mean: {each}"
        )


class AccuracyError(PrepareError):
    """The prepared model's outputs differ from the original's by more than allowed."""

    def __init__(self, message: str, report: AccuracyReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class PreparedModel:
    files: dict[str, Path]  # relative name -> file, for build_package
    info: ModelInfo
    accuracy: AccuracyReport | None  # None: the model passed through unchanged
    notes: list[str]  # what was done, for the user


@dataclass(frozen=True)
class _Plan:
    action: str  # what the step does, e.g. "convert model.onnx to fp16"
    step: Callable[[Path, Path], None]  # (original entrypoint, prepared entrypoint)
    format: str  # the prepared model's framework
    entrypoint: str
    advice: str  # what to try when the result is not accurate enough


def prepare_model(
    files: Mapping[str, Path],
    info: ModelInfo,
    *,
    runtime: str,
    optimize: str | None,
    work_dir: Path,
    run: ModelRunner,
    max_abs_diff: float | None = None,
    samples: int = 16,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> PreparedModel:
    """The model in FILES (described by INFO) as RUNTIME's package should carry it.

    OPTIMIZE is None, "fp16" or "int8". Converted or optimised models are written under
    WORK_DIR (new or empty; it must outlive the build) and checked against the original on
    the sample request and SAMPLES random inputs drawn with SEED, both run by RUN (see
    ModelRunner): AccuracyError when the
    outputs differ by more than MAX_ABS_DIFF (default: see DEFAULT_TOLERANCE). Files that
    are not the model are carried along unchanged. PROGRESS is told each step as it starts.
    """
    plan = _plan(info, runtime, optimize)
    if max_abs_diff is not None and not max_abs_diff >= 0:
        raise PrepareError(f"max_abs_diff must be a number >= 0, not {max_abs_diff}")
    if samples < 0:
        raise PrepareError(f"samples must be >= 0, not {samples}")
    if plan is None:
        note = f"{info.entrypoint} goes into the package as it is: {runtime} runs it directly"
        return PreparedModel(dict(files), info, None, [note])
    assert info.framework is not None and info.entrypoint is not None  # checked by _plan
    if info.signature is None:
        raise PrepareError(
            f"cannot {plan.action}: the model has tensors the Open Inference Protocol cannot "
            "carry, so there is no signature to check the result with; package it without "
            f"optimisation for {DEFAULT_RUNTIME[info.framework]}"
        )
    new_names = _model_names(plan.format, plan.entrypoint)
    kept = _other_files(files, info.framework, info.entrypoint, new_names)
    report = progress or (lambda _: None)
    original_dir, prepared_dir = _work_dirs(Path(work_dir))
    stage_files(files, original_dir)

    report(plan.action)
    _run_step(plan, original_dir / info.entrypoint, prepared_dir / plan.entrypoint)
    prepared = {**kept, **{name: prepared_dir / name for name in new_names}}
    prepared_info = inspect_model(prepared)
    _check_signature(info.signature, prepared_info.signature, plan.action)

    report(f"check the prepared model on {samples + 1} inputs")
    inputs = sample_inputs(info.signature, samples, seed)
    reference = _run(run, DEFAULT_RUNTIME[info.framework], original_dir, info.entrypoint, inputs)
    answers = _run(run, runtime, prepared_dir, plan.entrypoint, inputs)
    accuracy = _compare(reference, answers, max_abs_diff, DEFAULT_TOLERANCE[optimize])
    if not accuracy.ok:
        raise AccuracyError(
            f"after the step to {plan.action}, the model answers differently: "
            f"{accuracy.describe()}. If that is acceptable, allow it with max_abs_diff "
            f"(--max-abs-diff); otherwise {plan.advice}",
            accuracy,
        )
    before = sum(Path(path).stat().st_size for name, path in files.items() if name not in kept)
    after = sum(prepared[name].stat().st_size for name in new_names)
    notes = [
        f"{plan.action}: {', '.join(new_names)}, {after} bytes ({before} before, "
        f"{after / before:.0%})",
        accuracy.describe(),
    ]
    return PreparedModel(prepared, prepared_info, accuracy, notes)


# ---- what to do ------------------------------------------------------------


def _plan(info: ModelInfo, runtime: str, optimize: str | None) -> _Plan | None:
    """The step that makes INFO's model into what RUNTIME's package carries; None: no step."""
    try:
        choose_runtime(info.framework, runtime)
    except PackageError as e:
        raise PrepareError(str(e)) from None
    framework, entrypoint = info.framework, info.entrypoint
    assert framework is not None and entrypoint is not None  # choose_runtime checked
    if optimize is not None and optimize not in OPTIMIZATIONS:
        raise PrepareError(
            f"unknown optimisation {optimize!r}; choose {' or '.join(OPTIMIZATIONS)}"
        )
    target = _packaged_format(framework, runtime)
    if optimize is not None and optimize not in _OPTIMIZATIONS_OF[target]:
        raise PrepareError(
            f"{optimize} is not supported for the {runtime} runtime yet; "
            + _alternatives(framework, runtime, optimize)
        )
    if target == "openvino" and framework != "openvino":
        xml = PurePosixPath(entrypoint).with_suffix(".xml").as_posix()
        fp16 = optimize == "fp16"
        return _Plan(
            f"convert {entrypoint} to OpenVINO IR {xml}" + (" with fp16 weights" if fp16 else ""),
            partial(_save_openvino, fp16=fp16),
            "openvino",
            xml,
            "package it without --optimize"
            if fp16
            else f"package it for {DEFAULT_RUNTIME[framework]}",
        )
    if optimize is None:
        return None
    if target == "openvino":
        return _Plan(
            f"store the weights of {entrypoint} as fp16",
            partial(_save_openvino, fp16=True),
            "openvino",
            entrypoint,
            "package it without --optimize",
        )
    if optimize == "fp16":
        return _Plan(
            f"convert {entrypoint} to fp16",
            _onnx_fp16,
            "onnx",
            entrypoint,
            "package it without --optimize",
        )
    return _Plan(
        f"quantise {entrypoint} to int8 (dynamic)",
        _onnx_int8,
        "onnx",
        entrypoint,
        "try --optimize fp16",
    )


def _packaged_format(framework: str, runtime: str) -> str:
    """The format RUNTIME's package carries a FRAMEWORK model in (RUNTIME runs FRAMEWORK)."""
    return "openvino" if runtime == "openvino" else framework


def _alternatives(framework: str, runtime: str, optimize: str) -> str:
    """What to do instead of OPTIMIZE for RUNTIME: other optimisations, or other runtimes."""
    offered = _OPTIMIZATIONS_OF[_packaged_format(framework, runtime)]
    choices = [f"it offers {' and '.join(offered)}" if offered else "package without --optimize"]
    choices += [
        f"package for {other.name}"
        for other in RUNTIMES.values()
        if other.name != runtime
        and framework in other.frameworks
        and optimize in _OPTIMIZATIONS_OF[_packaged_format(framework, other.name)]
    ]
    return ", or ".join(choices)


def _model_names(framework: str, entrypoint: str) -> list[str]:
    """The files that make up a model: an IR's .bin goes with its .xml (as in modelfile)."""
    if framework == "openvino":
        return [entrypoint, PurePosixPath(entrypoint).with_suffix(".bin").as_posix()]
    return [entrypoint]


def _other_files(
    files: Mapping[str, Path], framework: str, entrypoint: str, new_names: Sequence[str]
) -> dict[str, Path]:
    """FILES other than the model's own, which the prepared model's NEW_NAMES must not hit."""
    old_names = _model_names(framework, entrypoint)
    kept = {name: Path(path) for name, path in files.items() if name not in old_names}
    if clash := sorted(set(kept) & set(new_names)):
        raise PrepareError(
            f"the prepared model's {', '.join(clash)} would replace a file of the same name "
            "among the model's files; rename that file"
        )
    return kept


def _work_dirs(work_dir: Path) -> tuple[Path, Path]:
    if work_dir.exists() and any(work_dir.iterdir()):
        raise PrepareError(f"work directory {work_dir} is not empty; give a new or empty one")
    original, prepared = work_dir / "original", work_dir / "prepared"
    original.mkdir(parents=True)
    prepared.mkdir()
    return original, prepared


def stage_files(files: Mapping[str, Path], directory: Path) -> None:
    """FILES under their relative names in DIRECTORY: converters and runtimes read a model
    from a directory (an IR's .bin beside its .xml), and FILES may be anywhere."""
    for name, path in files.items():
        staged = directory / check_relative_path(name)
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, staged)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(path, staged)


def _run_step(plan: _Plan, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        plan.step(source, target)
    except PrepareError:
        raise
    except Exception as e:  # converters raise anything; the message is what helps
        raise PrepareError(f"could not {plan.action}: {e}") from e


def _check_signature(before: Signature, after: Signature | None, action: str) -> None:
    def by_name(signature: Signature | None) -> tuple[dict[str, TensorSpec], ...]:
        if signature is None:
            return ({}, {})
        return ({t.name: t for t in signature.inputs}, {t.name: t for t in signature.outputs})

    if by_name(before) != by_name(after):
        found = "none" if after is None else after.to_dict()
        raise PrepareError(
            f"the step to {action} changed the model's signature from {before.to_dict()} to "
            f"{found}, which clients of the model would no longer fit; package it for its "
            "own runtime or without --optimize"
        )


# ---- the steps -------------------------------------------------------------


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        library = module.partition(".")[0]
        raise PrepareError(
            f"preparing this model needs {library}, which is not installed here: "
            f"pip install '{_INSTALL[library]}'"
        ) from None


def _save_openvino(source: Path, target: Path, *, fp16: bool) -> None:
    ov = _import("openvino")
    if source.suffix.lower() == ".xml":
        model = ov.Core().read_model(source)
    else:
        model = ov.convert_model(source)
    _renumber_generated_names(model)
    ov.save_model(model, target, compress_to_fp16=fp16)


def _renumber_generated_names(model: Any) -> None:
    """Name nodes OpenVINO named from its process-wide counter by their place in the graph.

    Inputs and outputs keep their names; a node its exporter happened to name in that
    style ("Conv_12") is renamed too, which changes nothing but profiling labels.
    """
    for position, node in enumerate(model.get_ordered_ops()):
        kind = node.get_type_name()
        if kind not in ("Parameter", "Result") and _GENERATED_NAME.fullmatch(
            node.get_friendly_name()
        ):
            node.set_friendly_name(f"{kind}_{position}")


def _onnx_fp16(source: Path, target: Path) -> None:
    onnx = _import("onnx")
    float16 = _import("onnxruntime.transformers.float16")
    model = float16.convert_float_to_float16(onnx.load_model(source), keep_io_types=True)
    target.write_bytes(model.SerializeToString(deterministic=True))


def _onnx_int8(source: Path, target: Path) -> None:
    _import("onnx")
    quantization = _import("onnxruntime.quantization")
    shape_inference = _import("onnxruntime.quantization.shape_inference")
    # quantize_dynamic asks for this step (and logs a warning without it); see the module doc.
    inferred = target.with_name(f"{target.name}.shapes")
    shape_inference.quant_pre_process(
        source, inferred, skip_optimization=True, skip_symbolic_shape=True
    )
    try:
        quantization.quantize_dynamic(inferred, target, weight_type=quantization.QuantType.QInt8)
    finally:
        inferred.unlink()


# ---- the accuracy check ----------------------------------------------------


def sample_inputs(signature: Signature, count: int, seed: int) -> list[Tensors]:
    """The package's sample request, then COUNT random inputs shaped by SIGNATURE."""
    import numpy as np

    request = sample_request(signature.to_dict())
    first = {
        t["name"]: np.array(t["data"], dtype=NUMPY_DTYPES[t["datatype"]]).reshape(t["shape"])
        for t in request["inputs"]
    }
    rng = np.random.default_rng(seed)
    randoms = []
    for _ in range(count):
        size = int(rng.integers(_DYNAMIC_SIZES[0], _DYNAMIC_SIZES[1] + 1))
        randoms.append(
            {
                spec.name: _random_tensor(
                    rng, spec.datatype, tuple(size if d == -1 else d for d in spec.shape)
                )
                for spec in signature.inputs
            }
        )
    return [first, *randoms]


def _random_tensor(rng: np.random.Generator, datatype: str, shape: Sequence[int]) -> np.ndarray:
    dtype = NUMPY_DTYPES[datatype]
    if datatype in ("FP16", "FP32", "FP64"):
        return rng.standard_normal(shape).astype(dtype)
    if datatype == "BOOL":
        return rng.random(shape) < 0.5
    # Integer inputs are mostly indices or counts, so small ones are the safe kind; strings
    # get the same numbers as text.
    digits = rng.integers(0, 10, shape)
    return digits.astype(str).astype(object) if datatype == "BYTES" else digits.astype(dtype)


def _run(
    run: ModelRunner, runtime: str, model_dir: Path, entrypoint: str, inputs: list[Tensors]
) -> list[Tensors]:
    try:
        return run(runtime, model_dir, entrypoint, inputs)
    except Exception as e:  # the runner is the caller's; its message is what helps
        raise PrepareError(f"could not run {entrypoint} on {runtime} to check it: {e}") from e


def _compare(
    reference: list[Tensors], answers: list[Tensors], max_abs_diff: float | None, tolerance: float
) -> AccuracyReport:
    import numpy as np

    outputs: dict[str, tuple[float, float]] = {}
    total, count, scale = 0.0, 0, 1.0
    for name in reference[0]:
        diffs = []
        for number, (want, got) in enumerate(zip(reference, answers, strict=True)):
            if want[name].shape != got[name].shape:
                raise PrepareError(
                    f"output {name!r} has shape {list(got[name].shape)} from the prepared "
                    f"model but {list(want[name].shape)} from the original (input {number})"
                )
            diffs.append(_abs_diff(want[name], got[name]).ravel())
            scale = max(scale, _largest(want[name]))
        diff = np.concatenate(diffs)
        outputs[name] = (float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0)
        total += float(diff.sum())
        count += diff.size
    return AccuracyReport(
        outputs,
        max((top for top, _ in outputs.values()), default=0.0),
        total / count if count else 0.0,
        len(reference),
        tolerance * scale if max_abs_diff is None else max_abs_diff,
    )


def _abs_diff(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """|WANT - GOT| as float64; equal values (NaN and NaN too) differ by 0, and a NaN or an
    infinity against anything else by infinity, so that it fails every threshold."""
    import numpy as np

    if want.dtype == object or got.dtype == object:
        return np.where(want == got, 0.0, np.inf)
    a, b = want.astype(np.float64), got.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):  # inf - inf
        return np.where(same, 0.0, np.nan_to_num(np.abs(a - b), nan=np.inf))


def _largest(values: np.ndarray) -> float:
    import numpy as np

    if values.dtype == object:
        return 0.0
    magnitudes = np.abs(values.astype(np.float64))
    return float(magnitudes[np.isfinite(magnitudes)].max(initial=0.0))
