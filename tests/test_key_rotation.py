"""Rotating the hub's signing key with real agents on a real hub and Mosquitto: a device
offline across two rotations converges, keeps the new key across a kill -9, refuses a state
signed by a retired key; the offline root key hands trust over on its own."""

from __future__ import annotations

import json
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from agent.mqtt import Session
from agentproc import AgentProcess, deploy, infer, publish_version, start_agent, wait_for
from conftest import Cli
from contract import keys, protocol, signing
from hubproc import HubProcess
from modelgen import make_onnx
from mosquitto import Mosquitto

ROWS = [[1.0, 2.0, 3.0]]


@pytest.fixture(scope="module")
def hub(broker_hub: HubProcess) -> HubProcess:
    return broker_hub  # this module's tests publish forgeries to its devices


@pytest.fixture(scope="module")
def versions(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """Two versions, both packaged and signed before any rotation."""
    work = tmp_path_factory.mktemp("models")
    made = []
    for name in ("a", "b"):
        (work / name).mkdir()
        made.append(publish_version(hub, "tiny", make_onnx(work / name / "model.onnx")))
    return made


def device_record(hub: HubProcess, device_id: str) -> dict:
    return httpx.get(f"{hub.url}/api/v1/devices/{device_id}", verify=hub.verify,
                     headers={"Authorization": f"Bearer {hub.admin_token}"}).json()


def serving(hub: HubProcess, agent: AgentProcess, version: int) -> bool:
    rows = (device_record(hub, agent.device_id).get("reported") or {}).get("deployments", [])
    if not any(r["version"] == version and r["state"] == "serving" for r in rows):
        return False
    try:
        return infer(agent, "tiny", ROWS)["model_version"] == str(version)
    except httpx.HTTPStatusError as exc:
        # Just restarted, the agent has not loaded the model yet, while the hub still
        # shows what it reported before it was killed.
        if exc.response.status_code == 404:
            return False
        raise


def trusted(agent: AgentProcess) -> dict:
    path = agent.data_dir / "hub-keys.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_device_offline_across_two_rotations_converges_and_keeps_the_new_key(
    hub: HubProcess, broker: Mosquitto, versions: list[int], cli: Cli, tmp_path: Path,
) -> None:
    first, second = versions
    agent = start_agent(hub, tmp_path / "device")
    try:
        deploy(hub, agent.device_id, f"tiny:{first}")
        wait_for(lambda: serving(hub, agent, first), timeout=90, what="the first version")
        before = cli.json("keys", "list")
        assert isinstance(before, list) and [k["state"] for k in before] == ["current"]
        original = before[0]["key_id"]
        wait_for(lambda: device_record(hub, agent.device_id)["inventory"].get("hub_key")
                 == original, what="the device reporting the key it trusts")
        # Kept by the test only: the hub destroys a retired key, an attacker may still have it.
        stolen = tmp_path / "stolen.key"
        shutil.copy(hub.data_dir / "keys" / "hub-signing.key", stolen)
    finally:
        assert agent.stop() == 0, agent.log()

    # Offline: two rotations, and a new version assigned (signed by the newest key).
    for _ in range(2):
        rotated = cli.json("keys", "rotate")
        assert isinstance(rotated, dict)
    newest = rotated["current"]
    listed = cli.json("keys", "list")
    assert isinstance(listed, list)
    assert [(k["key_id"], k["state"]) for k in listed][0] == (original, "retired")
    assert listed[-1] == {**listed[-1], "key_id": newest, "state": "current", "rotation": 2}
    deploy(hub, agent.device_id, f"tiny:{second}")

    agent = start_agent(hub, agent.data_dir)
    try:
        # the package was signed by the first key; the rotation signed it again
        wait_for(lambda: serving(hub, agent, second), timeout=90,
                 what="the device back online on the new version")
        assert trusted(agent)["sequence"] == 2
        assert keys.pem_key_id(trusted(agent)["key"]) == newest
        assert original in trusted(agent)["retired"]
        wait_for(lambda: (cli.json("keys", "show") or {})["devices"].get(newest) == 1,  # type: ignore[union-attr]
                 what="the hub counting the device under the new key")
        agent.stop(signal.SIGKILL)
    finally:
        agent.stop()

    agent = start_agent(hub, agent.data_dir)  # after a kill -9: the trust is on disk
    try:
        assert trusted(agent)["sequence"] == 2
        wait_for(lambda: serving(hub, agent, second), timeout=60, what="serving after restart")
        deploy(hub, agent.device_id, f"tiny:{first}")  # a new state, signed by the new key
        wait_for(lambda: serving(hub, agent, first), timeout=90, what="a state of the new key")

        # Someone with broker access and the retired key signs a state: refused as retired.
        topic = protocol.desired_topic(agent.device_id)
        now = datetime.now(UTC)
        forged = protocol.sign_desired(protocol.DesiredState(
            agent.device_id, 10_000, now, now + timedelta(hours=1), ()),
            signing.load_private_key(stolen))
        with Session(broker.url, client_id="test-attacker") as attacker:
            attacker.publish(topic, forged)
        refusal = wait_for(lambda: next((r for r in agent.state().get("refusals", [])
                                         if r["reason"] == "retired_key"), None),
                           what="the retired key's state refused")
        assert original in refusal["message"] and refusal["generation"] == 10_000
        reasons = wait_for(lambda: {r["reason"] for r in device_record(
            hub, agent.device_id)["reported"]["refusals"]} or None, what="reported")
        assert "retired_key" in reasons
        assert infer(agent, "tiny", ROWS)["model_version"] == str(first)
    finally:
        assert agent.stop() == 0, agent.log()


def test_the_offline_root_key_signs_a_rotation_devices_follow(
    hub: HubProcess, versions: list[int], cli: Cli, tmp_path: Path,
) -> None:
    refused = cli.run("keys", "rotate", "--root-key", str(_not_a_key(tmp_path)), ok=False)
    assert refused.returncode != 0 and "is not a root key" in refused.stderr
    root = tmp_path / "usb" / "root.key"
    root.parent.mkdir()
    made = cli.run("keys", "generate", "--root", str(root))
    assert "Keep it offline" in made.stdout and root.stat().st_mode & 0o077 == 0
    again = cli.run("keys", "generate", "--root", str(tmp_path / "second.key"), ok=False)
    assert "cannot change" in again.stderr and not (tmp_path / "second.key").exists()

    agent = start_agent(hub, tmp_path / "device")  # enrolls knowing the root key
    try:
        assert trusted(agent)["root"] is not None
        deploy(hub, agent.device_id, f"tiny:{versions[0]}")
        wait_for(lambda: serving(hub, agent, versions[0]), timeout=90, what="serving")
        answer = cli.json("keys", "rotate", "--root-key", str(root))
        assert isinstance(answer, dict)
        assert answer["signed_by"] == signing.key_id(signing.load_private_key(root))
        wait_for(lambda: keys.pem_key_id(trusted(agent).get("key", "")) == answer["current"],
                 what="the device following the root's rotation")
        deploy(hub, agent.device_id, f"tiny:{versions[1]}")
        wait_for(lambda: serving(hub, agent, versions[1]), timeout=90, what="a new state")
    finally:
        assert agent.stop() == 0, agent.log()
    assert '"keys.rotate"' in json.dumps(cli.json("audit"))
    rotated = cli.json("events", "--type", "key.rotated")
    assert isinstance(rotated, list)
    assert any(e["subject"].endswith(f"-> {answer['current']}") for e in rotated), rotated


def _not_a_key(tmp_path: Path) -> Path:
    path = tmp_path / "junk.key"
    path.write_text("not a key")
    return path
