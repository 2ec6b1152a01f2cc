"""A deployment's batching, end to end in native mode: a real hub, Mosquitto and agent.

`deploy --batch-size N --batch-delay-ms D` reaches the agent in the signed desired state
and turns adaptive batching on in its serving process: concurrent requests share runtime
calls (the edgefleet_serving_batch_rows histogram counts more than one row per call). A
batching-only change is an update of the same version; batching asked of a model without
a free batch dimension is refused with the reason in the reported state, while the
version before it serves on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from agentproc import AgentProcess, deploy, infer, publish_version, start_agent, wait_for
from hubproc import HubProcess, start_hub
from modelgen import expected_linear, make_fixed_batch_onnx, make_onnx
from mosquitto import Mosquitto, start_mosquitto

ROWS = [[1.0, 2.0, 3.0]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, AgentProcess]]:
    broker: Mosquitto = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    hub = start_hub(tmp_path_factory.mktemp("hub") / "data", extra_args=("--mqtt-url", broker.url))
    agent = start_agent(hub, tmp_path_factory.mktemp("agent") / "data")
    try:
        yield hub, agent
    finally:
        assert agent.stop() == 0, agent.log()
        assert hub.stop() == 0, hub.log()
        broker.stop()


def reported(hub: HubProcess, device_id: str, name: str) -> list[dict]:
    answer = httpx.get(f"{hub.url}/api/v1/devices/{device_id}/deployments",
                       headers={"Authorization": f"Bearer {hub.admin_token}"}).json()
    return [r for r in answer["reported"] if r["name"] == name]


def batch_rows(agent: AgentProcess, name: str) -> tuple[float, float]:
    """(runtime calls, rows) of NAME's batches, from the device's /metrics."""
    text = httpx.get(f"{agent.url}/metrics", timeout=10,
                     headers={"Authorization": f"Bearer {agent.api_key}"}).text
    found = {}
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.startswith("edgefleet_serving_batch_rows_") and f'model="{name}"' in sample:
            found[sample.split("{")[0].rsplit("_", 1)[1]] = float(value)
    return found.get("count", 0.0), found.get("sum", 0.0)


def concurrently(agent: AgentProcess, name: str, clients: int, each: int) -> None:
    failures: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(each):
                answer = infer(agent, name, ROWS)
                got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(1, 2)
                assert np.allclose(got, expected_linear(np.array(ROWS, dtype=np.float32)),
                                   atol=1e-5)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def test_a_deployment_with_batching_merges_concurrent_requests(
        fleet: tuple[HubProcess, AgentProcess], tmp_path: Path) -> None:
    hub, agent = fleet
    # Built with batching off: the build's own measurement would otherwise decide the start.
    version = publish_version(hub, "linear", make_onnx(tmp_path / "model.onnx"),
                              extra=("--batching", "off"))
    deploy(hub, agent.device_id, f"linear:{version}")
    wait_for(lambda: any(r["state"] == "serving" for r in reported(hub, agent.device_id,
                                                                   "linear")),
             timeout=60, what="linear serving")
    concurrently(agent, "linear", clients=8, each=5)
    assert batch_rows(agent, "linear") == (0.0, 0.0)  # no batching: no batches
    # A batching-only change: the same version, loaded again with batching on.
    deploy(hub, agent.device_id, f"linear:{version}", "--batch-size", "32",
           "--batch-delay-ms", "20")
    wait_for(lambda: _loaded_with_batching(agent), timeout=60, what="batching turned on")
    calls_before, rows_before = batch_rows(agent, "linear")
    concurrently(agent, "linear", clients=16, each=10)
    calls, rows = (after - before for after, before in zip(
        batch_rows(agent, "linear"), (calls_before, rows_before), strict=True))
    assert rows == 160 and calls < rows / 1.5, (calls, rows)  # runtime calls are shared
    print(f"batching: {rows:.0f} rows in {calls:.0f} runtime calls")


def _loaded_with_batching(agent: AgentProcess) -> bool:
    """One request through; batches appear in the histogram once batching is on."""
    infer(agent, "linear", ROWS)
    return batch_rows(agent, "linear")[0] > 0


def test_batching_a_model_that_cannot_is_refused_with_the_reason(
        fleet: tuple[HubProcess, AgentProcess], tmp_path: Path) -> None:
    hub, agent = fleet
    version = publish_version(hub, "fixed", make_fixed_batch_onnx(tmp_path / "model.onnx"))
    deploy(hub, agent.device_id, f"fixed:{version}")
    wait_for(lambda: any(r["state"] == "serving" for r in reported(hub, agent.device_id,
                                                                   "fixed")),
             timeout=60, what="fixed serving")
    deploy(hub, agent.device_id, f"fixed:{version}", "--batch-size", "8")

    def refused() -> bool:
        return any(r["state"] == "rolled_back" for r in reported(hub, agent.device_id, "fixed"))

    wait_for(refused, timeout=60, what="the batching refused")
    rows = reported(hub, agent.device_id, "fixed")
    error = next(r["error"] for r in rows if r["state"] == "rolled_back")
    assert "cannot batch: input 'x' has shape [1, 3], not a free first (batch) dimension" \
        in error
    # What served before serves on, unbatched.
    assert infer(agent, "fixed", ROWS)["model_version"] == str(version)
    assert agent.process.poll() is None
