"""The agent -> serving control body (PUT /control/deployments/{name}), declared once.

The agent builds it (`build`, which reads its own output back so it can
never send what the serving process would refuse); the serving process
reads it (`read`, strict: unknown fields, wrong types and bad routing are
refused with one line naming the field). Standard library only: the agent
daemon imports this module and stays free of pydantic.

    {"version": "3", "model_dir": "/abs/dir", "entrypoint": "model.onnx",
     "framework": "onnx", "runtime": {"prefer": ["onnxruntime:CPU"], ...},
     "self_test": {...inference request...},            optional
     "batching": {"max_batch_size": 32, "max_delay_ms": 0},  optional (off)
     "upstream": "http://127.0.0.1:PORT/v2/models/NAME/versions/V",  optional
     "sketch": [...contract/sketch.py's SketchSpec...],  optional (no drift sketches)
     "candidate": {...the same fields...},              optional
     "traffic": 10, "shadow": false}

`traffic` is the candidate's share in percent: of the requests without a
version in their path that it answers (A/B split), or, with `shadow`, of
the primary's requests that it sees a copy of.

`upstream` (container mode) names a version served by another edgefleet
serving process on this host's loopback (a container's private port): it is
not loaded here but proxied to, with the same routing, self-test, metrics
and draining as a local version. Loopback only: containers never get traffic
from anywhere but this front.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from contract.settings import MAX_BATCH_DELAY_MS, MAX_BATCH_SIZE, Batching
from contract.sketch import SketchError, SketchSpec
from contract.tensors import FRAMEWORKS

# Names and versions appear in URL paths and metric labels.
NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
UPSTREAM_PATTERN: Final = (
    rf"http://127\.0\.0\.1:[1-9][0-9]{{0,4}}/v2/models/{NAME_PATTERN}/versions/{NAME_PATTERN}"
)


class BodyError(ValueError):
    """A control body that is not what this module declares; the message is one line."""


@dataclass(frozen=True)
class RuntimeSettings:
    prefer: tuple[str, ...] = ()      # "runtime:DEVICE", best first
    precision: str | None = None
    threads: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionBody:
    version: str
    model_dir: Path                   # absolute: the server's working directory is not the agent's
    entrypoint: str                   # the model file, relative to model_dir
    framework: str                    # onnx, openvino, tflite
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    self_test: Mapping[str, Any] | None = None  # an inference request run before it serves
    # contract/settings.py's, on (size 2 or more); None: every request is a runtime call
    batching: Batching | None = None
    upstream: str | None = None       # served elsewhere on loopback: proxied, not loaded
    sketch: SketchSpec | None = None  # drift bins its inputs and outputs are counted into


@dataclass(frozen=True)
class DeploymentBody:
    primary: VersionBody
    candidate: VersionBody | None = None
    traffic: int = 0                  # percent: answers (split) or copies (shadow)
    shadow: bool = False


# -- builder --------------------------------------------------------------------------


def _version_json(v: VersionBody) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": v.version,
        "model_dir": str(v.model_dir),
        "entrypoint": v.entrypoint,
        "framework": v.framework,
        "runtime": {"prefer": list(v.runtime.prefer), "precision": v.runtime.precision,
                    "threads": v.runtime.threads, "extra": dict(v.runtime.extra)},
    }
    if v.self_test is not None:
        out["self_test"] = dict(v.self_test)
    if v.batching is not None:
        out["batching"] = {"max_batch_size": v.batching.max_batch_size,
                           "max_delay_ms": v.batching.max_delay_ms}
    if v.upstream is not None:
        out["upstream"] = v.upstream
    if v.sketch is not None:
        out["sketch"] = v.sketch.to_json()
    return out


def build(body: DeploymentBody) -> dict[str, Any]:
    """BODY as the JSON object the serving process takes; BodyError if it would refuse it."""
    out = _version_json(body.primary)
    if body.candidate is not None:
        out["candidate"] = _version_json(body.candidate)
    out["traffic"] = body.traffic
    out["shadow"] = body.shadow
    if read(out) != body:
        raise BodyError("the control body does not read back as built")
    return out


# -- reader ---------------------------------------------------------------------------

_VERSION_FIELDS: Final = frozenset(
    {"version", "model_dir", "entrypoint", "framework", "runtime", "self_test", "batching",
     "upstream", "sketch"})
_BATCHING_FIELDS: Final = frozenset({"max_batch_size", "max_delay_ms"})
_DEPLOYMENT_FIELDS: Final = _VERSION_FIELDS | {"candidate", "traffic", "shadow"}
_RUNTIME_FIELDS: Final = frozenset({"prefer", "precision", "threads", "extra"})


def _object(value: Any, name: str, allowed: frozenset[str]) -> Mapping[str, Any]:
    """VALUE as the object NAME ("" for the body itself, else "candidate", ...)."""
    if not isinstance(value, dict):
        raise BodyError(f"{name or 'body'}: expected an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise BodyError(f"{name + '.' if name else ''}{unknown[0]}: unknown field")
    return value


def _text(data: Mapping[str, Any], key: str, where: str) -> str:
    if key not in data:
        raise BodyError(f"{where}{key}: required")
    value = data[key]
    if not isinstance(value, str) or not value:
        raise BodyError(f"{where}{key}: expected a non-empty string")
    return value


def _optional_int(value: Any, where: str, low: int, high: int | None = None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BodyError(f"{where}: expected an integer")
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BodyError(f"{where}: must be {span}, got {value}")
    return value


def _runtime(value: Any, name: str) -> RuntimeSettings:
    if value is None:
        return RuntimeSettings()
    data = _object(value, name, _RUNTIME_FIELDS)
    where = name + "."
    prefer = data.get("prefer", [])
    if not isinstance(prefer, list) or not all(isinstance(p, str) and p for p in prefer):
        raise BodyError(f"{where}prefer: expected a list of \"runtime:DEVICE\" strings")
    precision = data.get("precision")
    if precision is not None and (not isinstance(precision, str) or not precision):
        raise BodyError(f"{where}precision: expected a non-empty string or null")
    extra = data.get("extra", {})
    if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise BodyError(f"{where}extra: expected an object of strings")
    return RuntimeSettings(tuple(prefer), precision,
                           _optional_int(data.get("threads"), f"{where}threads", 1), dict(extra))


def _version(data: Mapping[str, Any], where: str) -> VersionBody:
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)  # registry versions are numbers; paths and labels carry text
    if not isinstance(version, str) or not re.fullmatch(NAME_PATTERN, version):
        raise BodyError(f"{where}version: must be text matching {NAME_PATTERN}")
    model_dir = Path(_text(data, "model_dir", where))
    if not model_dir.is_absolute():
        raise BodyError(f"{where}model_dir: must be an absolute path "
                        "(the server's working directory is not the agent's)")
    framework = _text(data, "framework", where)
    if framework not in FRAMEWORKS:
        raise BodyError(f"{where}framework: must be one of {', '.join(FRAMEWORKS)}")
    self_test = data.get("self_test")
    if self_test is not None and not isinstance(self_test, dict):
        raise BodyError(f"{where}self_test: expected an inference request object")
    upstream = data.get("upstream")
    if upstream is not None and (not isinstance(upstream, str)
                                 or not re.fullmatch(UPSTREAM_PATTERN, upstream)):
        raise BodyError(f"{where}upstream: must be http://127.0.0.1:PORT/v2/models/NAME/"
                        "versions/VERSION (a private port on loopback)")
    sketch = None
    if data.get("sketch") is not None:
        try:
            sketch = SketchSpec.from_json(data["sketch"])
        except SketchError as e:
            raise BodyError(f"{where}sketch: {e}") from None
    return VersionBody(version, model_dir, _text(data, "entrypoint", where), framework,
                       _runtime(data.get("runtime"), f"{where}runtime"), self_test,
                       _batching(data.get("batching"), f"{where}batching"), upstream, sketch)


def _batching(value: Any, name: str) -> Batching | None:
    if value is None:
        return None
    data = _object(value, name, _BATCHING_FIELDS)
    size = _optional_int(data.get("max_batch_size"), f"{name}.max_batch_size", 2, MAX_BATCH_SIZE)
    if size is None:
        raise BodyError(f"{name}.max_batch_size: required")
    delay = _optional_int(data.get("max_delay_ms"), f"{name}.max_delay_ms", 0,
                          MAX_BATCH_DELAY_MS)
    return Batching(size, delay or 0)  # in range: checked above, with this body's names


def read(value: Any) -> DeploymentBody:
    """The deployment VALUE (parsed JSON) describes; BodyError with the first problem."""
    data = _object(value, "", _DEPLOYMENT_FIELDS)
    primary = _version(data, "")
    candidate = None
    if data.get("candidate") is not None:
        candidate = _version(_object(data["candidate"], "candidate", _VERSION_FIELDS),
                             "candidate.")
    traffic = _optional_int(data.get("traffic"), "traffic", 0, 100) or 0
    shadow = data.get("shadow", False)
    if not isinstance(shadow, bool):
        raise BodyError("shadow: expected true or false")
    if candidate is None:
        if traffic or shadow:
            raise BodyError("traffic and shadow need a candidate")
    elif candidate.version == primary.version:
        raise BodyError(
            f"candidate.version: must differ from the primary's ({primary.version})")
    return DeploymentBody(primary, candidate, traffic, shadow)
