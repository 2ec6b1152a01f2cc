"""Container mode end to end, on real podman and real dockerd (tests/engines.py).

A real hub with TLS (as by default) and its managed Mosquitto, on this
machine's own address so that both engines check the hub's certificate, and
`edgefleet agent run --mode container`, which installs the CA it pinned at
enrollment where the engine reads it (agent/container/trust.py):
deploy a runnable package image (Debian base + wheels, cached in
~/.cache/edgefleet), self-test and score through the agent's one address
with tritonclient, switch versions under load without a failed request,
roll back an image that fails its self-test, refuse a tampered image,
survive a kill -9 of the agent mid-update with a good version serving and
no orphan container, and report the engine (and the hub's derived tag).

The images are built once per module (four `package build --image`, warm:
seconds each); the engines pull them from the hub's registry with the
device's own credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from agent.container.engine import MANAGED, OWNER
from agent.container.trust import RegistryTrust
from agentproc import AgentProcess, deploy, infer, start_agent, wait_for
from engines import SCRIPT, Engine, engine, engine_address, forget_ca  # noqa: F401  (fixture)
from hubproc import EDGEFLEET, HubProcess, start_hub
from modelgen import expected_linear, make_failing_onnx, make_onnx

pytestmark = pytest.mark.slow
ROWS = [[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]]
PLATFORM = "linux/amd64"


@pytest.fixture(scope="module")
def fleet_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = start_hub(tmp_path_factory.mktemp("hub") / "data", address=engine_address())
    yield hub
    forget_ca(registry(hub))
    assert hub.stop() == 0, hub.log()


def registry(hub: HubProcess) -> str:
    return f"{hub.address}:{hub.port}"


def publish_image(hub: HubProcess, name: str, model: Path) -> int:
    """Register MODEL as the next version of NAME and push its signed runnable image."""
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers, timeout=60) as c:
        digest = c.post("/api/v1/blobs", content=model.read_bytes()).json()["digest"]
        answer = c.post(f"/api/v1/models/{name}/versions",
                        json={"files": [{"path": model.name, "digest": digest}]})
        answer.raise_for_status()
    version = int(answer.json()["version"])
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token}
    done = subprocess.run([*EDGEFLEET, "package", "build", f"{name}:{version}", "--image",
                           "--platform", PLATFORM, "--quiet"], env=env, capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"package build --image failed:\n{done.stderr}")
    return version


@pytest.fixture(scope="module")
def versions(fleet_hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """tiny:1 and tiny:2 (same function, other bytes), tiny:3 failing every request, and
    tiny:4 (other bytes again) for tampering."""
    work = tmp_path_factory.mktemp("models")
    for sub in ("v1", "v2", "v3", "v4"):
        (work / sub).mkdir()
    made = {
        "v1": make_onnx(work / "v1" / "model.onnx"),
        "v2": make_onnx(work / "v2" / "model.onnx"),
        "broken": make_failing_onnx(work / "v3" / "model.onnx"),
        "tamper": make_onnx(work / "v4" / "model.onnx", batch=4),
    }
    return {key: publish_image(fleet_hub, "tiny", path) for key, path in made.items()}


def start_container_agent(hub: HubProcess, engine: Engine, data: Path,  # noqa: F811
                          **kwargs: Any) -> AgentProcess:
    return start_agent(hub, data, extra_args=(
        "--mode", "container", "--docker-host", engine.docker_host,
        "--container-memory-mb", "512"), **kwargs)


@pytest.fixture(scope="module")
def device(fleet_hub: HubProcess, versions: dict[str, int], engine: Engine,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = start_container_agent(fleet_hub, engine, tmp_path_factory.mktemp("agent") / "data")
    yield agent
    assert agent.stop() == 0, agent.log()


def reported(hub: HubProcess, device_id: str) -> dict:
    return httpx.get(f"{hub.url}/api/v1/devices/{device_id}/deployments",
                     headers={"Authorization": f"Bearer {hub.admin_token}"}).json()


def serving_version(hub: HubProcess, device_id: str) -> int | None:
    rows = [r for r in reported(hub, device_id)["reported"]
            if r["name"] == "tiny" and r["state"] == "serving"]
    return max((r["version"] for r in rows), default=None)


def wait_serving(hub: HubProcess, agent: AgentProcess, version: int) -> None:
    wait_for(lambda: serving_version(hub, agent.device_id) == version
             and infer(agent, "tiny", ROWS)["model_version"] == str(version),
             timeout=240, what=f"tiny:{version} serving on {agent.device_id}")


def containers(engine: Engine, agent: AgentProcess) -> list[dict]:  # noqa: F811
    """The agent's containers, as the engine lists them (name, state, version label)."""
    # The list call alone: inspecting each would race with the agent removing them.
    found = engine.client.api.containers(
        all=True, filters={"label": [f"{MANAGED}=1", f"{OWNER}={agent.device_id}"]})
    return sorted(({"name": c["Names"][0].lstrip("/"), "state": c["State"],
                    "version": c["Labels"].get("dev.edgefleet.version")} for c in found),
                  key=lambda c: c["name"])


def wait_containers(engine: Engine, agent: AgentProcess,  # noqa: F811
                    versions: list[int]) -> None:
    wait_for(lambda: [c["version"] for c in containers(engine, agent)]
             == [str(v) for v in versions] and all(c["state"] == "running"
                                                   for c in containers(engine, agent)),
             timeout=60, what=f"only the containers of {versions}")


def test_deploy_self_test_and_score_through_the_agent(
        fleet_hub: HubProcess, device: AgentProcess, versions: dict[str, int],
        engine: Engine) -> None:  # noqa: F811
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v1']}")
    wait_serving(fleet_hub, device, versions["v1"])
    wait_containers(engine, device, [versions["v1"]])
    # The engine pulled over TLS, trusting the hub through the CA the agent pinned.
    installed = RegistryTrust(device.data_dir / "hub-ca.pem", registry(fleet_hub)).path(
        engine.name)
    assert installed is not None and installed.read_bytes() == fleet_hub.ca_path.read_bytes()
    row = next(r for r in reported(fleet_hub, device.device_id)["reported"] if r["name"] == "tiny")
    # What the model runs on inside its container, as the container's serving process says.
    assert (row["runtime"], row["device"]) == ("onnxruntime", "CPU")

    client = triton.InferenceServerClient(device.url.removeprefix("http://"))
    x = triton.InferInput("x", [2, 3], "FP32")
    rows = np.array(ROWS, dtype=np.float32)
    x.set_data_from_numpy(rows, binary_data=True)
    result = client.infer("tiny", [x], headers={"Authorization": f"Bearer {device.api_key}"})
    assert np.allclose(result.as_numpy("y"), expected_linear(rows), atol=1e-5)
    client.close()

    [found] = containers(engine, device)
    attrs = engine.client.containers.get(found["name"]).attrs
    assert attrs["HostConfig"]["Memory"] == 512 * 2**20
    assert attrs["Config"]["Labels"]["dev.edgefleet.deployment"] == "tiny"
    # The container's port answers only with the device's key, and only on loopback.
    port = int(attrs["Config"]["Labels"]["dev.edgefleet.port"])
    assert httpx.post(f"http://127.0.0.1:{port}/v2/models/tiny/infer",
                      json={"inputs": []}).status_code == 401

    # The engine in the inventory, and a tag rollouts can target.
    def record() -> dict:
        return httpx.get(f"{fleet_hub.url}/api/v1/devices/{device.device_id}",
                         headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}).json()

    wait_for(lambda: record()["tags"].get("runtime.container") == engine.name, timeout=60,
             what="the runtime.container tag")
    assert record()["inventory"]["container_engine_version"]

    def system_points() -> list[dict]:
        return httpx.get(f"{fleet_hub.url}/api/v1/devices/{device.device_id}/telemetry",
                         params={"kind": "system"},
                         headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}
                         ).json()

    point = wait_for(lambda: next((p["values"] for p in system_points()
                                   if p["values"].get("containers_running") == 1), None),
                     timeout=60, what="container telemetry")
    assert point["container_engine_up"] == 1 and point["container_memory_bytes"] > 0


def test_switch_versions_under_load_drops_no_request(
        fleet_hub: HubProcess, device: AgentProcess, versions: dict[str, int],
        engine: Engine) -> None:  # noqa: F811
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v1']}")
    wait_serving(fleet_hub, device, versions["v1"])
    stop, failures, seen = threading.Event(), [], set()

    def score() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {device.api_key}"}) as c:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                "data": [1.0, 2.0, 3.0]}]}
            while not stop.is_set():
                answer = c.post(f"{device.url}/v2/models/tiny/infer", json=body, timeout=30)
                if answer.status_code != 200:
                    failures.append(answer.text)
                else:
                    seen.add(answer.json()["model_version"])

    clients = [threading.Thread(target=score) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}")
        wait_serving(fleet_hub, device, versions["v2"])
        wait_containers(engine, device, [versions["v2"]])  # the old one drained and removed
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    assert seen == {str(versions["v1"]), str(versions["v2"])}


def test_a_resources_only_change_replaces_the_container_under_load(
        fleet_hub: HubProcess, device: AgentProcess, versions: dict[str, int],
        engine: Engine) -> None:  # noqa: F811
    """The deployment's --cpus/--memory become the container's limits (the agent's
    --container-memory-mb only a default); a change of them alone starts a new container
    beside the old one, switches the front and removes the old one, dropping nothing."""
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}")
    wait_serving(fleet_hub, device, versions["v2"])
    stop, failures = threading.Event(), []

    def score() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {device.api_key}"}) as c:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                "data": [1.0, 2.0, 3.0]}]}
            while not stop.is_set():
                answer = c.post(f"{device.url}/v2/models/tiny/infer", json=body, timeout=30)
                if answer.status_code != 200:
                    failures.append(answer.text)

    def limits() -> list[tuple[int, int]]:
        found = containers(engine, device)
        if any(c["state"] != "running" for c in found):
            return []
        return [(host["NanoCpus"], host["Memory"]) for host in (
            engine.client.containers.get(c["name"]).attrs["HostConfig"] for c in found)]

    clients = [threading.Thread(target=score) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}", "--cpus", "0.5",
               "--memory", "256Mi", "--batch-size", "8")
        wait_for(lambda: limits() == [(500_000_000, 256 * 2**20)], timeout=240,
                 what="one container with the deployment's limits")
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []

    def rows() -> list[tuple[int, str, str | None]]:
        return [(r["version"], r["state"], r["error"]) for r in
                reported(fleet_hub, device.device_id)["reported"] if r["name"] == "tiny"]

    wait_for(lambda: rows() == [(versions["v2"], "serving", None)], timeout=60,
             what="the update reported done")


def test_split_and_shadow_between_containers(
        fleet_hub: HubProcess, device: AgentProcess, versions: dict[str, int],
        engine: Engine) -> None:  # noqa: F811
    v1, v2 = str(versions["v1"]), str(versions["v2"])
    deploy(fleet_hub, device.device_id, f"tiny:{v1}", "--candidate", v2, "--traffic", "50")
    wait_for(lambda: {r["version"] for r in reported(fleet_hub, device.device_id)["reported"]
                      if r["name"] == "tiny" and r["state"] == "serving"}
             == {versions["v1"], versions["v2"]}, timeout=240, what="both versions serving")
    wait_containers(engine, device, sorted([versions["v1"], versions["v2"]]))
    seen = {infer(device, "tiny", ROWS)["model_version"] for _ in range(60)}
    assert seen == {v1, v2}  # a 50/50 split: 60 requests all on one side is a 1 in 2^59 event
    deploy(fleet_hub, device.device_id, f"tiny:{v1}", "--candidate", v2, "--shadow",
           "--traffic", "100")
    wait_for(lambda: device.state()["serving"]["tiny"]["shadow"], timeout=240,
             what="the candidate in shadow mode")
    # The state is saved before the front is told: wait for the front, not the file.
    wait_for(lambda: {infer(device, "tiny", ROWS)["model_version"] for _ in range(20)} == {v1},
             timeout=30, what="every request answered by the primary")
    deploy(fleet_hub, device.device_id, f"tiny:{v1}")  # back to one version, one container
    wait_for(lambda: device.state()["serving"]["tiny"]["candidate"] is None, timeout=240,
             what="the candidate removed")
    wait_containers(engine, device, [versions["v1"]])


def test_an_image_failing_its_self_test_is_rolled_back(
        fleet_hub: HubProcess, device: AgentProcess, versions: dict[str, int],
        engine: Engine) -> None:  # noqa: F811
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}")
    wait_serving(fleet_hub, device, versions["v2"])
    deploy(fleet_hub, device.device_id, f"tiny:{versions['broken']}")
    row = wait_for(lambda: next((r for r in reported(fleet_hub, device.device_id)["reported"]
                                 if r["version"] == versions["broken"]
                                 and r["state"] == "rolled_back"), None),
                   timeout=240, what="the broken version rolled back")
    assert "self-test" in row["error"]
    assert infer(device, "tiny", ROWS)["model_version"] == str(versions["v2"])
    wait_containers(engine, device, [versions["v2"]])


def test_a_tampered_image_never_runs(
        fleet_hub: HubProcess, device: AgentProcess, versions: dict[str, int],
        engine: Engine) -> None:  # noqa: F811
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}")
    wait_serving(fleet_hub, device, versions["v2"])
    version = versions["tamper"]
    package = httpx.get(f"{fleet_hub.url}/api/v1/packages/tiny/{version}",
                        headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}).json()
    image = next(i for i in package["images"] if i["platform"] == PLATFORM)
    model = next(layer for layer in image["layers"] if layer["role"] == "model")
    blob = next((fleet_hub.data_dir / "blobs").rglob(model["digest"].removeprefix("sha256:")))
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        deploy(fleet_hub, device.device_id, f"tiny:{version}")
        row = wait_for(lambda: next((r for r in reported(fleet_hub, device.device_id)["reported"]
                                     if r["version"] == version and r["state"] == "rolled_back"),
                                    None), timeout=240, what="the tampered version refused")
        assert "digest" in row["error"].lower()
        assert infer(device, "tiny", ROWS)["model_version"] == str(versions["v2"])
        assert [c["version"] for c in containers(engine, device)] == [str(versions["v2"])]
    finally:
        blob.write_bytes(original)


def test_a_container_removed_behind_the_agents_back_is_started_again(
        fleet_hub: HubProcess, device: AgentProcess, versions: dict[str, int],
        engine: Engine) -> None:  # noqa: F811
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}")
    wait_serving(fleet_hub, device, versions["v2"])
    [found] = containers(engine, device)
    engine.client.containers.get(found["name"]).remove(force=True)
    wait_for(lambda: _try_infer(device), timeout=120, what="the version answering again")
    wait_containers(engine, device, [versions["v2"]])
    row = wait_for(lambda: next((r for r in reported(fleet_hub, device.device_id)["reported"]
                                 if r["version"] == versions["v2"] and r["error"]), None),
                   timeout=60, what="the restart reported")
    assert row["state"] == "serving" and "gone" in row["error"]


def test_an_image_that_runs_out_of_memory_is_rolled_back_with_its_log(
        fleet_hub: HubProcess, versions: dict[str, int], engine: Engine,  # noqa: F811
        tmp_path: Path) -> None:
    agent = start_agent(fleet_hub, tmp_path / "agent", extra_args=(
        "--mode", "container", "--docker-host", engine.docker_host,
        "--container-memory-mb", "24"))
    try:
        deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
        row = wait_for(lambda: next((r for r in reported(fleet_hub, agent.device_id)["reported"]
                                     if r["state"] == "rolled_back"), None),
                       timeout=240, what="the version rolled back")
        assert "out of memory" in row["error"] and "last log lines" in row["error"]
        wait_containers(engine, agent, [])
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_certs_dir_the_agent_cannot_write_is_named_in_the_error(
        fleet_hub: HubProcess, versions: dict[str, int], engine: Engine,  # noqa: F811
        tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    agent = start_agent(fleet_hub, tmp_path / "agent", extra_args=(
        "--mode", "container", "--docker-host", engine.docker_host,
        "--engine-certs-dir", str(blocked)))
    try:
        deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
        row = wait_for(lambda: next((r for r in reported(fleet_hub, agent.device_id)["reported"]
                                     if r["state"] == "rolled_back"), None),
                       timeout=240, what="the version refused")
        assert f"{blocked}/{registry(fleet_hub)}/ca.crt" in row["error"]
        assert "\n" not in row["error"]
        wait_containers(engine, agent, [])
    finally:
        assert agent.stop() == 0, agent.log()


def _try_infer(agent: AgentProcess) -> dict | None:
    try:
        return infer(agent, "tiny", ROWS)
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize("state", ["starting", "serving"])
def test_kill_9_mid_update_ends_serving_with_no_orphan(
        fleet_hub: HubProcess, versions: dict[str, int], engine: Engine,  # noqa: F811
        tmp_path: Path, state: str) -> None:
    data = tmp_path / "agent"
    agent = start_container_agent(fleet_hub, engine, data)
    try:
        deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
        wait_serving(fleet_hub, agent, versions["v1"])
    finally:
        agent.stop()
    paused = start_container_agent(fleet_hub, engine, data, port=agent.port,
                                   env={"EDGEFLEET_AGENT_PAUSE_IN": f"{state}:120"})
    deploy(fleet_hub, paused.device_id, f"tiny:{versions['v2']}")
    wait_for(lambda: (paused.state().get("update") or {}).get("state") == state,
             timeout=240, what=f"the update to reach {state}")
    paused.stop(signal.SIGKILL)
    again = start_container_agent(fleet_hub, engine, data, port=agent.port)
    try:
        first = wait_for(lambda: _try_infer(again), timeout=120, what="a version answering")
        assert first["model_version"] in {str(versions["v1"]), str(versions["v2"])}
        wait_serving(fleet_hub, again, versions["v2"])
        wait_for(lambda: again.state()["update"] is None, what="the update to be finished")
        wait_containers(engine, again, [versions["v2"]])
    finally:
        assert again.stop() == 0, again.log()
        for leftover in engine.client.containers.list(
                all=True, filters={"label": f"{OWNER}={agent.device_id}"}):
            leftover.remove(force=True)


def test_an_engine_that_is_down_is_reported_and_the_agent_waits_for_it(
        fleet_hub: HubProcess, versions: dict[str, int], tmp_path: Path) -> None:
    """A podman of its own, started only after the agent (the shared engines stay up)."""
    directory = tmp_path / "engine"
    agent = start_agent(fleet_hub, tmp_path / "agent", extra_args=(
        "--mode", "container", "--docker-host", f"unix://{directory}/podman.sock"))

    def inventory() -> dict:
        return httpx.get(f"{fleet_hub.url}/api/v1/devices/{agent.device_id}",
                         headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}
                         ).json()["inventory"]

    try:
        wait_for(lambda: "not running" in inventory().get("container_engine_error", ""),
                 timeout=60, what="the engine reported down")
        assert agent.process.poll() is None
        started = subprocess.run(["bash", str(SCRIPT), "start", "podman", str(directory)],
                                 capture_output=True, text=True, timeout=120, check=False)
        assert started.returncode == 0, started.stderr
        wait_for(lambda: inventory().get("container_engine") == "podman"
                 and inventory().get("container_engine_error") == "", timeout=120,
                 what="the engine reported up")
        deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
        wait_serving(fleet_hub, agent, versions["v1"])
    finally:
        assert agent.stop() == 0, agent.log()
        subprocess.run(["bash", str(SCRIPT), "stop", "podman", str(directory)],
                       capture_output=True, timeout=120, check=False)
