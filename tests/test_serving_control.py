"""The agent's control socket: load, replace, unload, self-test; version switches, A/B, shadow."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.serving.body import DeploymentBody, RuntimeSettings, VersionBody, build
from modelgen import LINEAR_B, LINEAR_W, expected_linear, make_onnx
from test_serving_process import ServeProcess, onnx_version, start_serve

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
REQUEST = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}


def linear_variant(path: Path, *, w_scale: float = 1.0, input_name: str = "x") -> Path:
    """The linear model with W scaled and/or its input renamed, to tell versions apart."""
    model = onnx.load(make_onnx(path))
    for init in model.graph.initializer:
        if init.name == "W":
            init.CopyFrom(numpy_helper.from_array(LINEAR_W * np.float32(w_scale), "W"))
    model.graph.input[0].name = input_name
    model.graph.node[0].input[0] = input_name
    onnx.save(model, path)
    return path.parent


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = start_serve(tmp_path_factory.mktemp("control"), "--max-concurrency", "2",
                          "--max-queue", "64")
    yield process
    assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("models")
    return {
        "a": make_onnx(tmp / "a/model.onnx").parent,
        "b": make_onnx(tmp / "b/model.onnx").parent,
        "double": linear_variant(tmp / "double/model.onnx", w_scale=2.0),
        "renamed": linear_variant(tmp / "renamed/model.onnx", input_name="z"),
    }


def _wait_for(check: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# ---- load, state, self-test, unload ------------------------------------------------


def test_load_state_self_test_unload(served: ServeProcess, models: dict[str, Path]) -> None:
    loaded = served.deploy("life", onnx_version(models["a"], 1, self_test=REQUEST))
    assert loaded["loaded"] == ["1"] and loaded["retired"] == []
    primary = loaded["deployment"]["primary"]
    assert primary["version"] == "1" and primary["runtime"] == "onnxruntime"
    assert primary["device"] == "CPU"
    check = loaded["self_test"]["1"]
    assert np.allclose(check["outputs"][0]["data"], expected_linear(X).ravel(), atol=1e-6)
    assert check["milliseconds"]["infer"] > 0

    with served.control() as control:
        state = control.get("/control/state").json()
        assert state["ready"] is True
        (life,) = [d for d in state["deployments"] if d["name"] == "life"]
        assert life["primary"]["model_dir"] == str(models["a"]) and life["candidate"] is None
        assert life["primary"]["signature"]["inputs"] == [
            {"name": "x", "datatype": "FP32", "shape": [-1, 3]}
        ]

        tested = control.post("/control/deployments/life/versions/1/self-test", json=REQUEST)
        assert tested.status_code == 200
        assert tested.json()["model_version"] == "1" and tested.json()["device"] == "CPU"
        bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
        failed = control.post("/control/deployments/life/versions/1/self-test", json=bad)
        assert failed.status_code == 422
        assert failed.json() == {
            "error": "self-test of 'life:1' failed: input 'x': expected FP32 [-1, 3], "
                     "got FP32 [1, 2]"
        }
        missing = control.post("/control/deployments/life/versions/4/self-test", json=REQUEST)
        assert missing.status_code == 404

        # the same settings again: nothing reloads
        again = control.put("/control/deployments/life", json=onnx_version(models["a"], 1))
        assert again.json()["loaded"] == [] and again.json()["retired"] == []

        gone = control.delete("/control/deployments/life")
        assert gone.json() == {"name": "life", "retired": ["1"]}
        assert control.delete("/control/deployments/life").status_code == 404
        _wait_for(lambda: not control.get("/control/state").json()["draining"])
    with served.client() as client:
        assert client.post("/v2/models/life/infer", json=REQUEST).status_code == 404
    assert "closed life:1" in served.log()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_dir": None}, "model_dir: required"),
        ({"model_dir": "relative/dir"}, "model_dir: must be an absolute path"),
        ({"framework": "pytorch"}, "framework: must be one of onnx, openvino, tflite"),
        ({"version": "a/b"}, "version: must be text matching"),
        ({"traffic": 10}, "traffic and shadow need a candidate"),
        ({"traffic": True}, "traffic: expected an integer"),
        ({"colour": "blue"}, "colour: unknown field"),
        ({"runtime": {"threads": 0}}, "runtime.threads: must be at least 1, got 0"),
    ],
)
def test_bad_control_bodies_are_400(
    served: ServeProcess, models: dict[str, Path], change: dict[str, Any], message: str
) -> None:
    body = {**onnx_version(models["a"], "1"), **change}
    body = {k: v for k, v in body.items() if v is not None}  # None: leave the field out
    with served.control() as control:
        answer = control.put("/control/deployments/bad", json=body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_bad_routing_is_400(served: ServeProcess, models: dict[str, Path]) -> None:
    candidate = onnx_version(models["b"], "2")
    with served.control() as control:
        over = control.put("/control/deployments/bad", json={
            **onnx_version(models["a"], "1"), "candidate": candidate, "traffic": 101,
        })
        assert over.status_code == 400
        assert "traffic: must be between 0 and 100, got 101" in over.text
        same = control.put("/control/deployments/bad", json={
            **onnx_version(models["a"], "1"), "candidate": onnx_version(models["b"], "1"),
        })
        assert same.status_code == 400 and "must differ from the primary's (1)" in same.text
        name = control.put("/control/deployments/b%20d", json=onnx_version(models["a"], "1"))
        assert name.status_code == 400 and "deployment name 'b d' must match" in name.text


def test_failed_load_or_self_test_leaves_the_old_version_serving(
    served: ServeProcess, models: dict[str, Path], tmp_path: Path
) -> None:
    served.deploy("keep", onnx_version(models["a"], "1"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    bad_sample = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
    with served.control() as control:
        absent = control.put("/control/deployments/keep", json=onnx_version(tmp_path / "nope", "2"))
        assert absent.status_code == 422
        assert absent.json()["error"] == (
            f"version '2': model file {tmp_path / 'nope' / 'model.onnx'} does not exist"
        )
        corrupt = control.put("/control/deployments/keep", json=onnx_version(broken, "2"))
        assert corrupt.status_code == 422
        assert corrupt.json()["error"].startswith("version '2' did not load: ")
        failing = control.put("/control/deployments/keep", json=onnx_version(
            models["b"], "2", self_test=bad_sample))
        assert failing.status_code == 422
        assert failing.json()["error"].startswith("self-test of 'keep:2' failed: input 'x'")
        (keep,) = [d for d in control.get("/control/state").json()["deployments"]
                   if d["name"] == "keep"]
        assert keep["primary"]["version"] == "1"
    with served.client() as client:
        assert client.post("/v2/models/keep/infer", json=REQUEST).json()["model_version"] == "1"
    _wait_for(lambda: "closed keep:2" in served.log())


# ---- switching versions under load ---------------------------------------------


def test_switching_versions_drops_no_request(served: ServeProcess, models: dict[str, Path]) -> None:
    served.deploy("switch", onnx_version(models["a"], "1"))
    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []

    def score() -> None:
        with served.client() as client:
            while not stop.is_set():
                answer = client.post("/v2/models/switch/infer", json=REQUEST)
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text}")
                    continue
                body = answer.json()
                if not np.allclose(body["outputs"][0]["data"], expected_linear(X).ravel(),
                                   atol=1e-6):
                    failures.append(f"wrong answer {body}")
                answered.append(body["model_version"])

    clients = [threading.Thread(target=score) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        for i in range(10):
            time.sleep(0.1)
            version, model = ("2", models["b"]) if i % 2 == 0 else ("1", models["a"])
            switched = served.deploy("switch", onnx_version(model, version))
            assert switched["loaded"] == [version] and switched["retired"] == [
                "1" if version == "2" else "2"
            ]
        time.sleep(0.1)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    assert len(answered) > 100 and set(answered) == {"1", "2"}
    with served.control() as control:
        _wait_for(lambda: not control.get("/control/state").json()["draining"])
    # every replaced version was closed once its requests were done
    assert served.log().count("closed switch:") == 10


# ---- A/B split ---------------------------------------------------------------------


def test_ab_split_follows_the_weight(served: ServeProcess, models: dict[str, Path]) -> None:
    served.deploy("ab", {
        **onnx_version(models["a"], "1"), "candidate": onnx_version(models["double"], "2"),
        "traffic": 30,
    })
    versions: Counter[str] = Counter()
    with served.client() as client:
        for _ in range(1000):
            body = client.post("/v2/models/ab/infer", json=REQUEST).json()
            versions[body["model_version"]] += 1
            scale = 2.0 if body["model_version"] == "2" else 1.0
            expected = X @ (LINEAR_W * np.float32(scale)) + LINEAR_B
            assert np.allclose(body["outputs"][0]["data"], expected.ravel(), atol=1e-5)
        # 300 expected; the bound is over 5 standard deviations (14.5) wide
        assert 225 <= versions["2"] <= 375, versions
        pinned = {client.post("/v2/models/ab/versions/1/infer",
                              json=REQUEST).json()["model_version"]
                  for _ in range(20)}
        assert pinned == {"1"}
        metadata = client.get("/v2/models/ab").json()
        assert metadata["versions"] == ["1", "2"]
    assert served.metric(
        'edgefleet_serving_requests_total{model="ab",version="2"}') == versions["2"]
    assert served.metric('edgefleet_serving_requests_total{model="ab",version="1"}') == (
        versions["1"] + 20
    )
    # moving the weight reloads nothing
    everything = served.deploy("ab", {
        **onnx_version(models["a"], "1"), "candidate": onnx_version(models["double"], "2"),
        "traffic": 100,
    })
    assert everything["loaded"] == [] and everything["retired"] == []
    with served.client() as client:
        assert {client.post("/v2/models/ab/infer", json=REQUEST).json()["model_version"]
                for _ in range(20)} == {"2"}


# ---- shadow ----------------------------------------------------------------------


def _shadow_counts(served: ServeProcess, version: str) -> dict[str, float]:
    labels = f'model="shadow",version="{version}"'
    return {
        "requests": served.metric(f"edgefleet_serving_shadow_requests_total{{{labels}}}"),
        "dropped": served.metric(f"edgefleet_serving_shadow_dropped_total{{{labels}}}"),
        "failures": served.metric(f"edgefleet_serving_shadow_failures_total{{{labels}}}"),
        "agree": served.metric(
            f'edgefleet_serving_shadow_agreement_total{{{labels},result="agree"}}'),
        "disagree": served.metric(
            f'edgefleet_serving_shadow_agreement_total{{{labels},result="disagree"}}'),
        "timed": served.metric(f"edgefleet_serving_shadow_duration_seconds_count{{{labels}}}"),
    }


@pytest.mark.parametrize(
    ("candidate", "outcome"), [("b", "agree"), ("double", "disagree"), ("renamed", "failures")]
)
def test_shadow_records_the_candidate_and_never_changes_answers(
    served: ServeProcess, models: dict[str, Path], candidate: str, outcome: str
) -> None:
    version = {"b": "2", "double": "3", "renamed": "4"}[candidate]
    served.deploy("shadow", {
        **onnx_version(models["a"], "1"), "candidate": onnx_version(models[candidate], version),
        "shadow": True, "traffic": 100,
    })
    with served.client() as client:
        for _ in range(30):
            body = client.post("/v2/models/shadow/infer", json=REQUEST).json()
            assert body["model_version"] == "1"
            assert np.allclose(body["outputs"][0]["data"], expected_linear(X).ravel(), atol=1e-6)
    _wait_for(lambda: sum(_shadow_counts(served, version)[k]
                          for k in ("requests", "dropped")) == 30)
    counts = _shadow_counts(served, version)
    # a copy is run when the shadow pool is free, else dropped; sequential requests leave it free
    assert counts["requests"] >= 1
    _wait_for(lambda: _shadow_counts(served, version)[outcome] == counts["requests"])
    others = {"agree", "disagree", "failures"} - {outcome}
    assert all(_shadow_counts(served, version)[k] == 0 for k in others)
    if outcome != "failures":
        assert _shadow_counts(served, version)["timed"] == counts["requests"]
    # the candidate is only ever counted as a shadow, never as serving traffic
    assert served.metric(
        f'edgefleet_serving_requests_total{{model="shadow",version="{version}"}}') == 0


def test_a_shadow_at_10_percent_sees_about_10_percent_of_requests(
    models: dict[str, Path], tmp_path: Path
) -> None:
    # The body as the agent builds it (agent/serving/body.py), to a server whose sampling is seeded.
    served = start_serve(tmp_path, "--seed", "10")
    try:
        def version(model: str, number: str) -> VersionBody:
            return VersionBody(number, models[model], "model.onnx", "onnx",
                               RuntimeSettings(prefer=("onnxruntime:CPU",)))

        served.deploy("tenth", build(DeploymentBody(version("a", "1"), version("b", "2"),
                                                    traffic=10, shadow=True)))
        with served.client() as client:
            for _ in range(400):
                assert client.post("/v2/models/tenth/infer", json=REQUEST).json()[
                    "model_version"] == "1"
        labels = '{model="tenth",version="2"}'
        copies = (served.metric(f"edgefleet_serving_shadow_requests_total{labels}")
                  + served.metric(f"edgefleet_serving_shadow_dropped_total{labels}"))
        # 40 expected; the bound is 2.5 standard deviations (6) either side
        assert 25 <= copies <= 55, copies
        assert served.metric(f"edgefleet_serving_requests_total{labels}") == 0
        assert served.metric('edgefleet_serving_requests_total{model="tenth",version="1"}') == 400
    finally:
        assert served.stop() == 0, served.log()


# ---- drift sketches ------------------------------------------------------------------


def test_a_version_with_bins_counts_its_inputs_and_outputs(
        served: ServeProcess, models: dict[str, Path]) -> None:
    """What the agent sends as drift sketches: every row of every request, batched or not,
    counted into the bins of its control body (agent/sketches.py), as numpy would count."""
    edges = [-1.0, 0.0, 1.0]
    spec = [{"side": "input", "tensor": "x", "column": c, "edges": edges} for c in (0, 2)]
    spec.append({"side": "output", "tensor": "y", "column": 1, "edges": [0.0]})
    served.deploy("sketched", onnx_version(models["a"], "1", sketch=spec))
    rows = np.random.default_rng(3).normal(size=(40, 3)).astype(np.float32)
    with served.client() as client:
        for batch in np.split(rows, [1, 5, 25]):  # requests of 1, 4, 20 and 15 rows
            answer = client.post("/v2/models/sketched/infer", json={"inputs": [{
                "name": "x", "datatype": "FP32", "shape": list(batch.shape),
                "data": batch.ravel().tolist()}]})
            assert answer.status_code == 200, answer.text
    with served.control() as control:
        (stats,) = [r for r in control.get("/control/stats").json() if r["model"] == "sketched"]

    def counted(values: np.ndarray, bins: list[float]) -> list[int]:
        return np.histogram(values, [-np.inf, *bins, np.inf])[0].tolist()

    assert stats["sketches"] == {
        "x[0]": counted(rows[:, 0], edges), "x[2]": counted(rows[:, 2], edges),
        "y[1]": counted(expected_linear(rows)[:, 1], [0.0])}


@pytest.mark.parametrize("shadow", [False, True])
def test_a_candidate_with_bins_counts_what_it_answers_or_shadows(
        served: ServeProcess, models: dict[str, Path], shadow: bool) -> None:
    """A split candidate counts the requests it answers; a shadow candidate the copies it
    runs (listed in the stats by its sketches alone: it answers no request of its own)."""
    spec = [{"side": "input", "tensor": "x", "column": 0, "edges": [0.0]}]
    name = "shadowbins" if shadow else "splitbins"
    served.deploy(name, {**onnx_version(models["a"], "1"),
                         "candidate": onnx_version(models["b"], "2", sketch=spec),
                         "traffic": 100 if shadow else 50, "shadow": shadow})
    with served.client() as client:
        for _ in range(20):
            assert client.post(f"/v2/models/{name}/infer", json=REQUEST).status_code == 200

    def candidate() -> dict[str, Any]:
        with served.control() as control:
            rows = control.get("/control/stats").json()
        return next((r for r in rows if (r["model"], r["version"]) == (name, "2")), {})

    def answered() -> float:
        metric = "shadow_requests" if shadow else "requests"
        return served.metric(f'edgefleet_serving_{metric}_total{{model="{name}",version="2"}}')

    _wait_for(lambda: sum(candidate().get("sketches", {}).get("x[0]", [])) == answered() * len(X)
              and answered() > 0)
    assert candidate()["requests"] == (0 if shadow else answered())
