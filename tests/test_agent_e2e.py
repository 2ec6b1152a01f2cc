"""The agent end to end: a real Mosquitto, a real hub process and real agent processes.

Enroll, deploy, score (plain JSON and tritonclient), update under load,
a self-test failure rolled back, tampered packages and forged or replayed
desired states refused, a broker outage without telemetry loss, a disk that
fills up mid-download, and every runtime serving a tiny model of its own
format.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.http as triton

from agent.mqtt import MqttTimeout, Session
from agentproc import AgentProcess, deploy, infer, publish_version, start_agent, wait_for
from contract import protocol, tls
from contract.oci import OCILayout
from contract.signing import generate_private_key
from hubproc import EDGEFLEET, HubProcess, start_hub
from modelgen import expected_linear, make_failing_onnx, make_onnx, make_openvino_ir, make_tflite
from mosquitto import Mosquitto
from smalldisk import small_disk

ROWS = [[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]]


@pytest.fixture(scope="module")
def fleet_hub(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = start_hub(tmp_path_factory.mktemp("hub") / "data", extra_args=("--mqtt-url", broker.url))
    yield hub
    assert hub.stop() == 0, hub.log()


@pytest.fixture(scope="module")
def versions(fleet_hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """tiny:1 and tiny:2 (same function, different bytes) and tiny:3 that fails every request."""
    work = tmp_path_factory.mktemp("models")
    first = publish_version(fleet_hub, "tiny", make_onnx(work / "model.onnx"))
    (work / "v2").mkdir()
    second = publish_version(fleet_hub, "tiny", make_onnx(work / "v2" / "model.onnx"))
    (work / "v3").mkdir()
    broken = publish_version(fleet_hub, "tiny", make_failing_onnx(work / "v3" / "model.onnx"))
    return {"v1": first, "v2": second, "broken": broken}


@pytest.fixture(scope="module")
def device(fleet_hub: HubProcess, versions: dict[str, int],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = start_agent(fleet_hub, tmp_path_factory.mktemp("agent") / "data")
    yield agent
    assert agent.stop() == 0, agent.log()


def reported(hub: HubProcess, device_id: str) -> dict:
    return httpx.get(f"{hub.url}/api/v1/devices/{device_id}/deployments",
                     headers={"Authorization": f"Bearer {hub.admin_token}"}).json()


def serving_version(hub: HubProcess, device_id: str, name: str = "tiny") -> int | None:
    rows = [r for r in reported(hub, device_id)["reported"]
            if r["name"] == name and r["state"] == "serving"]
    return max((r["version"] for r in rows), default=None)


def wait_serving(hub: HubProcess, agent: AgentProcess, version: int, name: str = "tiny") -> None:
    wait_for(lambda: serving_version(hub, agent.device_id, name) == version
             and infer(agent, name, ROWS)["model_version"] == str(version),
             timeout=60, what=f"{name}:{version} serving on {agent.device_id}")


def test_enroll_deploy_and_score(fleet_hub: HubProcess, device: AgentProcess,
                                 versions: dict[str, int]) -> None:
    record = httpx.get(f"{fleet_hub.url}/api/v1/devices/{device.device_id}",
                       headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}).json()
    assert record["status"] == "online" and record["platform"] == "linux/amd64"
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v1']}")
    wait_serving(fleet_hub, device, versions["v1"])
    answer = infer(device, "tiny", ROWS)
    got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(2, 2)
    assert np.allclose(got, expected_linear(np.array(ROWS, dtype=np.float32)), atol=1e-5)
    row = next(r for r in reported(fleet_hub, device.device_id)["reported"] if r["name"] == "tiny")
    assert (row["runtime"], row["device"]) == ("onnxruntime", "CPU")
    record = httpx.get(f"{fleet_hub.url}/api/v1/devices/{device.device_id}",
                       headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}).json()
    assert "onnxruntime:CPU" in record["inventory"]["accelerators"]
    assert record["inventory"]["cpu_count"] >= 1 and record["inventory"]["memory_mb"] > 0
    assert "onnxruntime_version" in record["inventory"]
    # targetable without anyone tagging the device by hand
    assert record["tags"]["arch"] == "amd64" and record["tags"]["accel.openvino.CPU"] == "yes"

    client = triton.InferenceServerClient(device.url.removeprefix("http://"))
    x = triton.InferInput("x", [2, 3], "FP32")
    x.set_data_from_numpy(np.array(ROWS, dtype=np.float32), binary_data=True)
    result = client.infer("tiny", [x], headers={"Authorization": f"Bearer {device.api_key}"})
    assert np.allclose(result.as_numpy("y"), got)
    client.close()


def test_an_idle_agent_runs_no_serving_process_until_there_is_something_to_serve(
        fleet_hub: HubProcess, versions: dict[str, int], tmp_path: Path) -> None:
    """Nothing deployed: no serving process, the agent answers health itself; the first
    deployment starts it, removing the last ends it; any other scoring request starts it
    too and gets the serving process's own answer."""
    data = tmp_path / "agent"
    agent = start_agent(fleet_hub, data)  # after /v2/health/live answered
    try:
        daemon = psutil.Process(agent.process.pid)
        assert httpx.get(f"{agent.url}/v2/health/ready").json() == {"ready": True}
        assert daemon.children() == [] and not (data / "serving.pid").exists()
        deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
        wait_serving(fleet_hub, agent, versions["v1"])
        (serving,) = daemon.children()
        assert int((data / "serving.pid").read_text()) == serving.pid
        httpx.delete(f"{fleet_hub.url}/api/v1/devices/{agent.device_id}/deployments/tiny",
                     headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}
                     ).raise_for_status()
        wait_for(lambda: not daemon.children(), what="the serving process to end")
        assert not (data / "serving.pid").exists()
        assert httpx.get(f"{agent.url}/v2/health/live").json() == {"live": True}
        key = {"Authorization": f"Bearer {agent.api_key}"}
        with httpx.Client(base_url=agent.url, timeout=60) as client:
            assert client.get("/v2/models/tiny").status_code == 401  # the key first
            assert client.get("/v2", headers=key).json()["name"] == "edgefleet"
            assert client.get("/v2/models/tiny", headers=key).status_code == 404
            assert client.get("/metrics", headers=key).status_code == 200
        (woken,) = daemon.children()
        # Started from the front's connection thread, it outlives that connection: the
        # next deployment is served by the same process.
        deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
        wait_serving(fleet_hub, agent, versions["v1"])
        assert [p.pid for p in daemon.children()] == [woken.pid]
    finally:
        assert agent.stop() == 0, agent.log()


def test_update_while_scoring_drops_no_request(fleet_hub: HubProcess, device: AgentProcess,
                                               versions: dict[str, int]) -> None:
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

    client = threading.Thread(target=score)
    client.start()
    try:
        deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}")
        wait_serving(fleet_hub, device, versions["v2"])
    finally:
        stop.set()
        client.join()
    assert failures == []
    assert seen == {str(versions["v1"]), str(versions["v2"])}


def test_no_report_shows_a_version_serving_without_its_runtime(
        fleet_hub: HubProcess, broker: Mosquitto, versions: dict[str, int],
        tmp_path: Path) -> None:
    """Every state a real agent publishes through a first deployment and an update: each
    version reported serving names the runtime it runs on, before the switch too."""
    agent = start_agent(fleet_hub, tmp_path / "agent")
    topic = protocol.reported_topic(agent.device_id)
    try:
        with Session(broker.url, client_id="test-listener", subscriptions=[topic]) as listener:
            wait_for(lambda: listener.connected, what="the listener connected")
            time.sleep(0.5)  # its SUBACK
            for version in (versions["v1"], versions["v2"]):
                deploy(fleet_hub, agent.device_id, f"tiny:{version}")
                wait_serving(fleet_hub, agent, version)
            shown = []
            with contextlib.suppress(MqttTimeout):  # every report read, in the order sent
                while True:
                    shown += json.loads(listener.get(timeout=3).payload)["deployments"]
    finally:
        assert agent.stop() == 0, agent.log()
    serving = [(d["version"], d["runtime"], d["device"]) for d in shown
               if d["state"] == "serving"]
    assert {v for v, _, _ in serving} == {versions["v1"], versions["v2"]}
    assert {(runtime, where) for _, runtime, where in serving} == {("onnxruntime", "CPU")}


def test_split_and_shadow_candidates(fleet_hub: HubProcess, device: AgentProcess,
                                     versions: dict[str, int]) -> None:
    v1, v2 = str(versions["v1"]), str(versions["v2"])
    deploy(fleet_hub, device.device_id, f"tiny:{v1}")
    wait_serving(fleet_hub, device, versions["v1"])
    deploy(fleet_hub, device.device_id, f"tiny:{v1}", "--candidate", v2, "--traffic", "50")
    wait_for(lambda: {r["version"] for r in reported(fleet_hub, device.device_id)["reported"]
                      if r["name"] == "tiny" and r["state"] == "serving"}
             == {versions["v1"], versions["v2"]}, timeout=60, what="both versions serving")
    seen = {infer(device, "tiny", ROWS)["model_version"] for _ in range(60)}
    assert seen == {v1, v2}  # a 50/50 split: 60 requests all on one side is a 1 in 2^59 event
    assert infer(device, "tiny", ROWS, version=v2)["model_version"] == v2

    deploy(fleet_hub, device.device_id, f"tiny:{v1}", "--candidate", v2, "--shadow",
           "--traffic", "100")
    wait_for(lambda: next((d for d in device.state()["serving"].values() if d["shadow"]), None),
             timeout=60, what="the candidate in shadow mode")
    assert {infer(device, "tiny", ROWS)["model_version"] for _ in range(20)} == {v1}
    deploy(fleet_hub, device.device_id, f"tiny:{v1}")  # back to one version
    wait_for(lambda: device.state()["serving"]["tiny"]["candidate"] is None, timeout=60,
             what="the candidate removed")


def test_failing_self_test_is_rolled_back(fleet_hub: HubProcess, device: AgentProcess,
                                          versions: dict[str, int]) -> None:
    deploy(fleet_hub, device.device_id, f"tiny:{versions['v2']}")
    wait_serving(fleet_hub, device, versions["v2"])
    deploy(fleet_hub, device.device_id, f"tiny:{versions['broken']}")
    row = wait_for(lambda: next((r for r in reported(fleet_hub, device.device_id)["reported"]
                                 if r["version"] == versions["broken"]
                                 and r["state"] == "rolled_back"), None),
                   timeout=60, what="the broken version rolled back")
    assert "self-test" in row["error"]
    assert infer(device, "tiny", ROWS)["model_version"] == str(versions["v2"])
    assert serving_version(fleet_hub, device.device_id) == versions["v2"]
    # on disk: the serving version and the one before it (for rollback), nothing else
    staged = device.data_dir / "versions" / "tiny"
    wait_for(lambda: sorted(int(d.name.split("-")[0]) for d in staged.iterdir())
             == [versions["v1"], versions["v2"]], what="old versions pruned")
    # and in the package store only their packages: the broken one's blobs are deleted
    serving = device.state()["serving"]["tiny"]
    kept = {serving[role]["digest"].removeprefix("sha256:") for role in ("primary", "previous")}
    store = OCILayout(device.data_dir / "store")
    assert {ref for ref in store.refs() if ref.startswith("pkg-")} == {f"pkg-{d}" for d in kept}
    assert store.collect_garbage() == 0  # nothing left that no tag reaches


def test_tampered_package_is_refused(fleet_hub: HubProcess, device: AgentProcess,
                                     tmp_path: Path) -> None:
    deploy(fleet_hub, device.device_id, "tiny:2")
    wait_serving(fleet_hub, device, 2)
    model = make_onnx(tmp_path / "model.onnx", batch=4)  # other bytes: a model layer of its own
    version = publish_version(fleet_hub, "tiny", model)
    package = httpx.get(f"{fleet_hub.url}/api/v1/packages/tiny/{version}",
                        headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}).json()
    layer = package["images"][0]["layers"][0]["digest"].removeprefix("sha256:")
    blob = next((fleet_hub.data_dir / "blobs").rglob(layer))
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        deploy(fleet_hub, device.device_id, f"tiny:{version}")
        row = wait_for(lambda: next((r for r in reported(fleet_hub, device.device_id)["reported"]
                                     if r["version"] == version and r["state"] == "rolled_back"),
                                    None), timeout=60, what="the tampered version refused")
        assert "digest" in row["error"]
        assert infer(device, "tiny", ROWS)["model_version"] == "2"
    finally:
        blob.write_bytes(original)


def test_forged_and_replayed_desired_states_are_refused(
    fleet_hub: HubProcess, broker: Mosquitto, device: AgentProcess
) -> None:
    deploy(fleet_hub, device.device_id, "tiny:1")
    wait_serving(fleet_hub, device, 1)
    topic = protocol.desired_topic(device.device_id)
    with Session(broker.url, client_id="test-attacker", subscriptions=[topic]) as attacker:
        retained = attacker.get(timeout=10).payload  # the hub's signed state, as the device got it
        applied = json.loads(retained)["generation"]
        now = datetime.now(UTC)
        forged = protocol.sign_desired(protocol.DesiredState(
            device.device_id, applied + 100, now, now + timedelta(hours=1), ()),
            generate_private_key())
        attacker.publish(topic, forged)
        wait_for(lambda: any(r["reason"] == "bad_signature" for r in device.state()["refusals"]),
                 what="the forged state refused")
        deploy(fleet_hub, device.device_id, "tiny:2")
        wait_serving(fleet_hub, device, 2)
        attacker.publish(topic, retained)  # a genuine but older generation: a replay
        wait_for(lambda: any(r["reason"] == "replay" for r in device.state()["refusals"]),
                 what="the replay refused")

    def reasons_at_hub() -> set[str]:
        hub_view = httpx.get(f"{fleet_hub.url}/api/v1/devices/{device.device_id}", headers={
            "Authorization": f"Bearer {fleet_hub.admin_token}"}).json()
        return {r["reason"] for r in hub_view["reported"]["refusals"]}

    # The device's report of the replay reaches the hub a moment after its own state has it.
    wait_for(lambda: {"bad_signature", "replay"} <= reasons_at_hub(),
             what="both refusals reported to the hub")
    assert infer(device, "tiny", ROWS)["model_version"] == "2"


def test_broker_outage_loses_no_telemetry(fleet_hub: HubProcess, broker: Mosquitto,
                                          device: AgentProcess) -> None:
    headers = {"Authorization": f"Bearer {fleet_hub.admin_token}"}

    def points() -> list[dict]:
        return httpx.get(f"{fleet_hub.url}/api/v1/devices/{device.device_id}/telemetry",
                         params={"limit": 100000}, headers=headers).json()

    before = wait_for(lambda: points(), what="telemetry")
    broker.stop()
    time.sleep(4)  # the agent measures every second while the broker is gone
    broker.start()
    last_seq = before[-1]["seq"]
    after = wait_for(lambda: (p := points()) and p[-1]["seq"] > last_seq + 6 and p,
                     timeout=60, what="telemetry after the outage")
    seqs = [p["seq"] for p in after]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a point is missing or repeated"
    assert len(set(seqs)) == len(seqs)


def test_the_agent_sends_drift_sketches_of_what_it_serves(
        fleet_hub: HubProcess, device: AgentProcess, tmp_path: Path) -> None:
    """The serving process counts what it scores into the bins of the version's baseline,
    and the agent sends them: the hub sees x[0] shifted, x[1] not."""
    version = publish_version(fleet_hub, "watched", make_onnx(tmp_path / "model.onnx"))
    sample = np.random.default_rng(5).normal(size=(1000, 3))
    np.save(tmp_path / "sample.npy", sample)
    env = {**os.environ, "EDGEFLEET_HUB": fleet_hub.url, "EDGEFLEET_TOKEN": fleet_hub.admin_token}
    subprocess.run([*EDGEFLEET, "model", "baseline", f"watched:{version}",
                    str(tmp_path / "sample.npy")], env=env, check=True, capture_output=True)
    deploy(fleet_hub, device.device_id, f"watched:{version}")
    wait_serving(fleet_hub, device, version, name="watched")
    shifted = sample[:400] + [3.0, 0.0, 0.0]
    for rows in np.split(shifted, 4):
        infer(device, "watched", rows.tolist())

    def drift() -> dict[str, dict]:
        report = httpx.get(f"{fleet_hub.url}/api/v1/models/watched/versions/{version}/drift",
                           headers={"Authorization": f"Bearer {fleet_hub.admin_token}"}).json()
        return {f["feature"]: f for f in report["features"]}

    found = wait_for(lambda: (d := drift())["x[0]"]["observed"] >= 400 and d, timeout=30,
                     what="the sketches of 400 rows at the hub")
    assert found["x[0]"]["drifted"] and not found["x[1]"]["drifted"]
    assert found["x[1]"]["observed"] == found["x[0]"]["observed"]
    subprocess.run([*EDGEFLEET, "undeploy", "watched", "--device", device.device_id], env=env,
                   check=True, capture_output=True)


@pytest.mark.parametrize("fmt", ["openvino", "tflite"])
def test_each_runtime_serves_its_own_format(fleet_hub: HubProcess, device: AgentProcess,
                                            fmt: str, tmp_path: Path) -> None:
    onnx_path = make_onnx(tmp_path / "model.onnx")
    if fmt == "openvino":
        xml = make_openvino_ir(onnx_path, tmp_path / "ir")
        model_dir, runtime = xml.parent, "openvino"
    else:
        model_dir = tmp_path / "tfl"
        model_dir.mkdir()
        make_tflite(model_dir / "model.tflite")
        runtime = "litert"
    name = f"tiny-{fmt}"
    headers = {"Authorization": f"Bearer {fleet_hub.admin_token}"}
    with httpx.Client(base_url=fleet_hub.url, headers=headers) as c:
        files = []
        for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
            files.append({
                "path": path.name,
                "digest": c.post("/api/v1/blobs", content=path.read_bytes()).json()["digest"],
            })
        c.post(f"/api/v1/models/{name}/versions", json={"files": files}).raise_for_status()
    env = {**os.environ, "EDGEFLEET_HUB": fleet_hub.url, "EDGEFLEET_TOKEN": fleet_hub.admin_token}
    subprocess.run([*EDGEFLEET, "package", "build", f"{name}:1", "--no-deps", "--quiet"],
                   env=env, check=True, capture_output=True)
    deploy(fleet_hub, device.device_id, f"{name}:1", "--deployment", name)
    wait_for(lambda: serving_version(fleet_hub, device.device_id, name) == 1, timeout=60,
             what=f"{name} serving")
    row = next(r for r in reported(fleet_hub, device.device_id)["reported"] if r["name"] == name)
    assert row["runtime"] == runtime
    rows = [[1.0, 2.0, 3.0]] if fmt == "tflite" else ROWS
    got = np.array(infer(device, name, rows)["outputs"][0]["data"], dtype=np.float32)
    assert np.allclose(got.reshape(len(rows), 2),
                       expected_linear(np.array(rows, dtype=np.float32)), atol=1e-5)
    # the other deployments on the device are untouched
    assert serving_version(fleet_hub, device.device_id, "tiny") is not None


def _try_infer(agent: AgentProcess) -> dict | None:
    try:
        return infer(agent, "tiny", ROWS)
    except httpx.HTTPError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("state", ["downloading", "verifying", "staged", "starting", "self_test",
                                   "serving"])
def test_kill_9_in_each_update_state_ends_serving_a_good_version(
    fleet_hub: HubProcess, versions: dict[str, int], tmp_path: Path, state: str
) -> None:
    data = tmp_path / "agent"
    agent = start_agent(fleet_hub, data)
    try:
        deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
        wait_serving(fleet_hub, agent, versions["v1"])
    finally:
        agent.stop()
    paused = start_agent(fleet_hub, data, port=agent.port,
                         env={"EDGEFLEET_AGENT_PAUSE_IN": f"{state}:60"})
    deploy(fleet_hub, paused.device_id, f"tiny:{versions['v2']}")
    wait_for(lambda: (paused.state().get("update") or {}).get("state") == state,
             timeout=60, what=f"the update to reach {state}")
    serving_pid = int((data / "serving.pid").read_text())
    paused.stop(signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{serving_pid}").exists(), timeout=10,
             what="the serving process to die with its agent")
    again = start_agent(fleet_hub, data, port=agent.port)
    try:
        # Right after the restart a good version answers, and the update then completes.
        first = wait_for(lambda: _try_infer(again), timeout=30, what="a version answering")
        assert first["model_version"] in {str(versions["v1"]), str(versions["v2"])}
        wait_serving(fleet_hub, again, versions["v2"])
        wait_for(lambda: again.state()["update"] is None, what="the update to be finished")
    finally:
        assert again.stop() == 0, again.log()


def test_unreadable_pinned_key_refuses_desired_states_and_keeps_running(
    fleet_hub: HubProcess, versions: dict[str, int], tmp_path: Path
) -> None:
    data = tmp_path / "agent"
    agent = start_agent(fleet_hub, data)
    assert agent.stop() == 0, agent.log()
    # The key pinned at enrollment, and the trust followed since (agent/trust.py), damaged.
    identity_file = data / "identity.json"
    identity = json.loads(identity_file.read_text())
    identity_file.write_text(json.dumps({**identity, "hub_public_key": "not a key"}))
    trust_file = data / "hub-keys.json"
    if trust_file.exists():
        trust_file.write_text(json.dumps({**json.loads(trust_file.read_text()),
                                          "key": "not a key"}))
    again = start_agent(fleet_hub, data, port=agent.port)
    try:
        deploy(fleet_hub, again.device_id, f"tiny:{versions['v1']}")
        refusal = wait_for(lambda: next((r for r in again.state().get("refusals", [])
                                         if r["reason"] == "bad_signature"), None),
                           timeout=60, what="the desired state refused")
        assert "enroll this device again" in refusal["message"]
        assert again.process.poll() is None
    finally:
        assert again.stop() == 0, again.log()


def test_disk_full_during_download_is_rolled_back_and_frees_the_space(
    fleet_hub: HubProcess, versions: dict[str, int], tmp_path: Path
) -> None:
    big = publish_version(fleet_hub, "tiny", make_onnx(tmp_path / "big" / "model.onnx",
                                                       padding_mb=4))
    with small_disk(tmp_path / "disk", "3m") as data:
        agent = start_agent(fleet_hub, data)
        try:
            deploy(fleet_hub, agent.device_id, f"tiny:{versions['v1']}")
            wait_serving(fleet_hub, agent, versions["v1"])
            deploy(fleet_hub, agent.device_id, f"tiny:{big}")
            row = wait_for(lambda: next((r for r in reported(fleet_hub, agent.device_id)["reported"]
                                         if r["version"] == big and r["state"] == "rolled_back"),
                                        None), timeout=60, what="the big version rolled back")
            assert "disk is full" in row["error"], row
            assert infer(agent, "tiny", ROWS)["model_version"] == str(versions["v1"])
            # the partial download is gone: the state file and telemetry need the room
            assert not list((data / "store").rglob("*.part"))
            assert agent.state()["update"] is None
        finally:
            assert agent.stop() == 0, agent.log()


def test_bad_enrollment_is_a_clear_error(fleet_hub: HubProcess, tmp_path: Path) -> None:
    # the right hub (its CA pinned), an unknown secret
    token = tls.pinned_token("efe_not-a-token", tls.fingerprint(fleet_hub.ca_path.read_text()))
    done = subprocess.run(
        [*EDGEFLEET, "agent", "run", "--hub", fleet_hub.url, "--token", token,
         "--data-dir", str(tmp_path / "a")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "unknown enrollment token" in done.stderr
    assert "Traceback" not in done.stderr
