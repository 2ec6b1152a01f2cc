"""What the agent daemon loads before it has anything to do.

`edgefleet agent run` execs `python -m agent` (agent/__main__.py) so the
long-running daemon starts without the CLI; the daemon loads cryptography,
the registry client and the update machinery at its first desired state.
bench/agent.py measures what this saves (idle RSS); these tests keep the
heavy modules out, at import and in a real agent running idle.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.daemon import AgentOptions
from agent.mqtt import Session
from agentproc import AgentProcess, start_agent, wait_for
from contract import protocol
from contract.signing import generate_private_key
from hubproc import HubProcess
from mosquitto import Mosquitto

# Each costs an idle agent megabytes (bench/agent.py prints how many).
HEAVY = ["click", "rich", "httpx", "cryptography", "asyncio", "importlib.metadata", "numpy",
         "contract.verify", "packager.distribution"]
# Besides those, what only an update or users' input needs (agent/daemon.py, contract/settings.py).
IDLE_HEAVY = [*HEAVY, "agent.updates", "agent.package_store", "contract.oci", "tarfile",
              "decimal", "onnxruntime", "agent.serving.server",
              "paho", "urllib.request",  # agent/mqtt.py speaks MQTT itself (agent/mqtt_wire.py)
              "http.client", "email", "shutil", "bz2", "secrets",  # serving, profiling, enrolling
              # TLS (its agents load them for mqtts://), hashing (a restart reads the hub key's
              # id, agent/trust.py): OpenSSL costs an agent on plain MQTT 5 MB
              "ssl", "hashlib", "hmac"]
# What only an update needs: a refused desired state or command loads none of it.
UPDATE_CODE = ["agent.updates", "agent.package_store", "contract.oci", "tarfile",
               "packager.distribution"]
IMPORT_LOG_HEADER = "import time: self [us] | cumulative | imported package"


@pytest.fixture(scope="module")
def hub(broker_hub: HubProcess) -> HubProcess:
    return broker_hub  # this module's tests publish forgeries to its devices


def daemon_imports(log: str) -> set[str]:
    """The modules the agent's daemon imported, from its PYTHONPROFILEIMPORTTIME lines: those
    after the last header, which the exec'd `python -m agent` wrote (the CLI's come before)."""
    lines = log.rpartition(IMPORT_LOG_HEADER)[2].splitlines()
    return {line.rpartition("|")[2].strip() for line in lines if line.startswith("import time:")}


def test_the_daemon_starts_without_the_heavy_modules() -> None:
    code = "import sys, agent.__main__; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert [m for m in HEAVY if m in loaded] == []


def test_an_idle_agent_running_imports_none_of_them(hub: HubProcess, tmp_path: Path) -> None:
    """A real agent, enrolled and connected, that has reported, sent telemetry and answered
    health checks: every module its process imported, as Python logs them, and none heavy.
    It is started again after the start that enrolled it, as a device at every boot (that
    first start also needs http.client and secrets, which the others do not)."""
    assert start_agent(hub, tmp_path / "agent").stop() == 0
    agent = start_agent(hub, tmp_path / "agent", telemetry_interval=0.2,
                        env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        headers = {"Authorization": f"Bearer {hub.admin_token}"}
        wait_for(lambda: httpx.get(f"{hub.url}/api/v1/devices/{agent.device_id}/telemetry",
                                   headers=headers, verify=hub.verify).json(),
                 what="telemetry from the idle agent")
        assert httpx.get(f"{hub.url}/api/v1/devices/{agent.device_id}", headers=headers,
                         verify=hub.verify).json()["status"] == "online"
        assert httpx.get(f"{agent.url}/v2/health/ready").json() == {"ready": True}
    finally:
        assert agent.stop() == 0, agent.log()
    imported = daemon_imports(agent.log())
    assert {"agent.daemon", "agent.uplink", "agent.mqtt_wire"} <= imported  # the daemon's lines
    assert [m for m in IDLE_HEAVY if m in imported] == []


def test_an_idle_agent_refusing_a_desired_state_and_a_command_loads_no_update_code(
        hub: HubProcess, broker: Mosquitto, tmp_path: Path) -> None:
    """Refusals are reported with a timestamp; taking it loads nothing an update needs."""
    agent = start_agent(hub, tmp_path / "agent", env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        wait_for(lambda: device(hub, agent)["status"] == "online", what="the agent online")
        now = datetime.now(UTC)
        forged = protocol.sign_command(protocol.Command(
            "c-forged", agent.device_id, now, now + timedelta(minutes=5),
            protocol.CommandKind.PROFILE, protocol.ProfileArgs("tiny", 1, "default", 1, 1)),
            generate_private_key())
        with Session(broker.url, client_id="test-attacker") as attacker:
            wait_for(lambda: attacker.connected, what="the attacker connected")
            attacker.publish(protocol.desired_topic(agent.device_id), b"not a desired state")
            attacker.publish(protocol.commands_topic(agent.device_id), forged)
            wait_for(lambda: {"malformed", "bad_signature"} <= {
                r["reason"] for r in (device(hub, agent)["reported"] or {}).get("refusals", [])},
                what="both refusals reported")
    finally:
        assert agent.stop() == 0, agent.log()
    imported = daemon_imports(agent.log())
    assert "agent.commands" in imported and "cryptography" in imported  # the forgery was checked
    assert [m for m in UPDATE_CODE if m in imported] == []


def device(hub: HubProcess, agent: AgentProcess) -> Any:
    answer = httpx.get(f"{hub.url}/api/v1/devices/{agent.device_id}", verify=hub.verify,
                       headers={"Authorization": f"Bearer {hub.admin_token}"})
    answer.raise_for_status()
    return answer.json()


def test_the_registry_client_comes_without_httpx_command_line_tool() -> None:
    code = ("import sys, agent.__main__, packager.distribution;"
            " print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "httpx" in loaded
    assert [m for m in ("click", "rich", "pygments") if m in loaded] == []


def test_python_m_agent_says_how_it_is_started() -> None:
    done = subprocess.run([sys.executable, "-m", "agent"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "started by `edgefleet agent run`" in done.stderr


def test_python_m_agent_without_an_identity_says_how_to_enroll(tmp_path: Path) -> None:
    options = AgentOptions(data_dir=tmp_path).to_json()
    done = subprocess.run([sys.executable, "-m", "agent", options], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{tmp_path} holds no identity" in done.stderr
    assert "--token" in done.stderr


def test_options_survive_the_exec(tmp_path: Path) -> None:
    options = AgentOptions(data_dir=tmp_path, mqtt_url="mqtt://broker:1883", max_queue=3,
                           verbose=True, pause_in=("verifying", 2.5))
    assert AgentOptions.from_json(options.to_json()) == options
