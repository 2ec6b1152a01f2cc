"""The front proxying to upstream versions: container mode's one scoring address, no engine.

Two real serving processes stand in for containers (each is what runs in
one), a third is the front; the front routes to them by `upstream` URL with
the same key, self-tests through them, splits between them, and switches
from one to the other under load without a failed request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from agent.serving.body import BodyError, read
from modelgen import expected_linear, make_onnx
from test_serving_process import API_KEY, ServeProcess, onnx_version, start_serve

REQUEST = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}


@pytest.fixture(scope="module")
def containers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServeProcess]]:
    """Version 1 and 2 of `tiny`, each in its own serving process (as in a container)."""
    tmp = tmp_path_factory.mktemp("upstreams")
    served = {}
    for version in ("1", "2"):
        model = make_onnx(tmp / f"m{version}" / "model.onnx").parent
        served[version] = start_serve(tmp / f"s{version}")
        served[version].deploy("tiny", onnx_version(model, version))
    yield served
    for process in served.values():
        assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = start_serve(tmp_path_factory.mktemp("front"), "--max-concurrency", "4",
                          "--max-queue", "64")
    yield process
    assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log()


def upstream(containers: dict[str, ServeProcess], version: str, **extra: object) -> dict:
    url = f"{containers[version].url}/v2/models/tiny/versions/{version}"
    return onnx_version(Path("/opt/edgefleet/model"), version, upstream=url, **extra)


def test_an_upstream_version_is_scored_through_the_front(
        front: ServeProcess, containers: dict[str, ServeProcess]) -> None:
    loaded = front.deploy("tiny", upstream(containers, "1", self_test=REQUEST))
    assert loaded["self_test"]["1"]["outputs"][0]["shape"] == [1, 2]
    assert loaded["deployment"]["primary"]["runtime"] == "onnxruntime"
    rows = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=np.float32)
    client = triton.InferenceServerClient(front.url.removeprefix("http://"))
    x = triton.InferInput("x", [2, 3], "FP32")
    x.set_data_from_numpy(rows, binary_data=True)
    result = client.infer("tiny", [x], headers={"Authorization": f"Bearer {API_KEY}"})
    assert np.allclose(result.as_numpy("y"), expected_linear(rows), atol=1e-5)
    client.close()
    with front.client() as c:
        bad = c.post("/v2/models/tiny/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})
        assert bad.status_code == 400  # checked by the front, against the container's signature
        assert c.post("/v2/models/tiny/infer", json=REQUEST,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_switching_containers_under_load_drops_no_request(
        front: ServeProcess, containers: dict[str, ServeProcess]) -> None:
    front.deploy("tiny", upstream(containers, "1"))
    stop, failures, seen = threading.Event(), [], set()

    def score() -> None:
        with front.client() as c:
            while not stop.is_set():
                answer = c.post("/v2/models/tiny/infer", json=REQUEST)
                if answer.status_code != 200:
                    failures.append(answer.text)
                else:
                    seen.add(answer.json()["model_version"])

    clients = [threading.Thread(target=score) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        for _ in range(3):
            front.deploy("tiny", {**upstream(containers, "1"),
                                  "candidate": upstream(containers, "2")})
            front.deploy("tiny", upstream(containers, "2"))
            front.deploy("tiny", upstream(containers, "1"))
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    assert "1" in seen


def test_a_split_between_containers_reaches_both(
        front: ServeProcess, containers: dict[str, ServeProcess]) -> None:
    front.deploy("tiny", {**upstream(containers, "1"), "candidate": upstream(containers, "2"),
                          "traffic": 50})
    with front.client() as c:
        seen = {c.post("/v2/models/tiny/infer", json=REQUEST).json()["model_version"]
                for _ in range(60)}
    assert seen == {"1", "2"}


def test_an_upstream_that_is_gone_fails_the_load_with_the_reason(
        front: ServeProcess, containers: dict[str, ServeProcess]) -> None:
    body = onnx_version(Path("/opt/edgefleet/model"), "9",
                        upstream="http://127.0.0.1:1/v2/models/tiny/versions/9")
    with front.control() as control:
        answer = control.put("/control/deployments/gone", json=body)
    assert answer.status_code == 422 and "cannot reach" in answer.json()["error"]


@pytest.mark.parametrize("url", ["http://10.0.0.1:80/v2/models/a/versions/1",
                                 "https://127.0.0.1:80/v2/models/a/versions/1",
                                 "http://127.0.0.1:80/v2/models/a/versions/1/infer",
                                 "http://127.0.0.1:0/v2/models/a/versions/1"])
def test_an_upstream_off_loopback_or_malformed_is_refused(url: str) -> None:
    with pytest.raises(BodyError, match="upstream: must be"):
        read(onnx_version(Path("/m"), "1", upstream=url))
