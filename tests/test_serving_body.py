"""The agent -> serving control body (agent/serving/body.py): built, read back, refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.serving.body import (
    Batching,
    BodyError,
    DeploymentBody,
    RuntimeSettings,
    VersionBody,
    build,
    read,
)

SAMPLE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}


def version(number: str, **extra: Any) -> VersionBody:
    return VersionBody(number, Path(f"/data/versions/d/{number}/model"), "model.onnx", "onnx",
                       RuntimeSettings(("openvino:GPU", "onnxruntime:CPU"), "f32", 2,
                                       {"CACHE_DIR": "/tmp/ov"}), **extra)


@pytest.mark.parametrize("body", [
    DeploymentBody(version("1")),
    DeploymentBody(version("1", self_test=SAMPLE)),
    DeploymentBody(version("1"), version("2"), traffic=30),
    DeploymentBody(version("1"), version("2", self_test=SAMPLE), traffic=10, shadow=True),
    DeploymentBody(version("1", batching=Batching(32)), version("2", batching=Batching(8, 5)),
                   traffic=10),
])
def test_what_is_built_reads_back_the_same(body: DeploymentBody) -> None:
    assert read(build(body)) == body


def test_the_wire_form_is_flat_with_the_primary_at_the_top() -> None:
    sent = build(DeploymentBody(version("1"), version("2"), traffic=10, shadow=True))
    assert sent["version"] == "1" and sent["candidate"]["version"] == "2"
    assert (sent["traffic"], sent["shadow"]) == (10, True)
    assert sent["model_dir"] == "/data/versions/d/1/model"


@pytest.mark.parametrize(("body", "message"), [
    (DeploymentBody(version("a/b")), "version: must be text matching"),
    (DeploymentBody(version("1"), version("1")), "candidate.version: must differ"),
    (DeploymentBody(version("1"), traffic=10), "traffic and shadow need a candidate"),
    (DeploymentBody(version("1"), version("2"), traffic=101), "traffic: must be between 0 and 100"),
    (DeploymentBody(VersionBody("1", Path("relative"), "model.onnx", "onnx")),
     "model_dir: must be an absolute path"),
])
def test_the_builder_refuses_what_the_reader_would(body: DeploymentBody, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        build(body)


def test_a_body_that_does_not_read_back_as_built_is_refused() -> None:
    listed = VersionBody("1", Path("/m"), "model.onnx", "onnx",
                         RuntimeSettings(["onnxruntime:CPU"]))  # type: ignore[arg-type]
    with pytest.raises(BodyError, match="does not read back as built"):
        build(DeploymentBody(listed))


BASE = {"version": "1", "model_dir": "/m", "entrypoint": "model.onnx", "framework": "onnx"}


@pytest.mark.parametrize(("value", "message"), [
    ([], "body: expected an object"),
    ({**BASE, "candidate": {**BASE, "version": "2", "colour": "red"}},
     "candidate.colour: unknown field"),
    ({**BASE, "candidate": "2"}, "candidate: expected an object"),
    ({**BASE, "entrypoint": ""}, "entrypoint: expected a non-empty string"),
    ({**BASE, "version": True}, "version: must be text matching"),
    ({**BASE, "shadow": "yes"}, "shadow: expected true or false"),
    ({**BASE, "runtime": {"prefer": "onnxruntime:CPU"}}, "runtime.prefer: expected a list"),
    ({**BASE, "runtime": {"extra": {"threads": 4}}}, "runtime.extra: expected an object of str"),
    ({**BASE, "self_test": [1]}, "self_test: expected an inference request object"),
    ({**BASE, "batching": {"max_delay_ms": 1}}, "batching.max_batch_size: required"),
    ({**BASE, "batching": {"max_batch_size": 1}},
     "batching.max_batch_size: must be between 2 and 4096, got 1"),
    ({**BASE, "batching": {"max_batch_size": 8, "max_delay_ms": -1}},
     "batching.max_delay_ms: must be between 0 and 1000, got -1"),
    ({**BASE, "batching": {"max_batch_size": 8, "preferred": [4]}},
     "batching.preferred: unknown field"),
    ({**BASE, "candidate": {**BASE, "version": "2", "batching": 8}},
     "candidate.batching: expected an object"),
])
def test_the_reader_is_strict(value: Any, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        read(value)


def test_a_registry_version_number_is_read_as_text() -> None:
    assert read({**BASE, "version": 3}).primary.version == "3"
