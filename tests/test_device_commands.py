"""A profile measured on an enrolled device, asked through its command topic: a real
Mosquitto (anyone may publish to it: the attacker), a real hub process and a real agent.

The device's rows are stored with the version under its platform and id and announced as
profile.done; forged, replayed, expired, misaddressed, out-of-range and oversized commands
are refused and reported, never run; a device that does not answer, is offline or unknown
is a one-line error. Few calls per batch size: these check the plumbing, not the numbers.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.mqtt import Session
from agentproc import AgentProcess, publish_version, start_agent, wait_for
from conftest import Cli
from contract import protocol
from contract.signing import generate_private_key, load_private_key
from hubproc import HubProcess
from modelgen import make_onnx
from mosquitto import Mosquitto


@pytest.fixture(scope="module")
def hub(broker_hub: HubProcess) -> HubProcess:
    return broker_hub  # this module's tests publish forgeries to its devices


@pytest.fixture(scope="module")
def version(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> int:
    return publish_version(hub, "tiny", make_onnx(tmp_path_factory.mktemp("m") / "model.onnx"))


@pytest.fixture(scope="module")
def device(hub: HubProcess, version: int,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = start_agent(hub, tmp_path_factory.mktemp("agent") / "data")
    wait_for(lambda: get(hub, f"/api/v1/devices/{agent.device_id}")["status"] == "online",
             what="the device online")
    yield agent
    agent.stop()


def get(hub: HubProcess, path: str, **params: Any) -> Any:
    answer = httpx.get(f"{hub.url}{path}", params=params, verify=hub.verify,
                       headers={"Authorization": f"Bearer {hub.admin_token}"})
    answer.raise_for_status()
    return answer.json()


def ask(hub: HubProcess, device_id: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{hub.url}/api/v1/devices/{device_id}/commands", verify=hub.verify,
                      headers={"Authorization": f"Bearer {hub.admin_token}"},
                      json={"model": "tiny", "version": 1, "max_batch": 2, "iterations": 3,
                            **body})


def refusals(hub: HubProcess, device_id: str) -> list[dict[str, Any]]:
    reported = get(hub, f"/api/v1/devices/{device_id}")["reported"] or {}
    return [r for r in reported.get("refusals", []) if r["generation"] is None]


def test_a_profile_is_measured_on_the_device_and_stored_with_the_version(
        cli: Cli, hub: HubProcess, device: AgentProcess) -> None:
    began = time.monotonic()
    done = cli.run("model", "profile", "tiny:1", "--device", device.device_id, "--max-batch",
                   "2", "--iterations", "3", "--json")
    took = time.monotonic() - began
    rows = json.loads(done.stdout)
    platform = get(hub, f"/api/v1/devices/{device.device_id}")["platform"]
    assert {(r["device_class"], r["variant"], r["batch"]) for r in rows if
            r["runtime"] == "onnxruntime"} == {(platform, "default", 1), (platform, "default", 2)}
    assert f"device {device.device_id} is profiling tiny:1 (default)" in done.stderr
    stored = get(hub, "/api/v1/models/tiny/versions/1/profiles")
    assert {(r["host"], r["runtime"], r["batch"]) for r in stored} == {
        (device.device_id, r["runtime"], r["batch"]) for r in rows}
    events = get(hub, "/api/v1/events", type="profile.done")["events"]
    assert [(e["subject"], e["actor"]) for e in events] == [("tiny:1", device.device_id)]
    print(f"device profile end to end: {took:.1f} s, {len(rows)} rows")  # -s shows it
    shown = cli.run("model", "profile", "tiny:1", "--device", device.device_id,
                    "--max-batch", "1", "--iterations", "2")
    assert f"measured on device {device.device_id}" in shown.stdout


def _signed(key: Any, device_id: str, *, id: str, issued: datetime, valid: timedelta,
            iterations: int = 3) -> bytes:
    return protocol.sign_command(protocol.Command(
        id, device_id, issued, issued + valid, protocol.CommandKind.PROFILE,
        protocol.ProfileArgs("tiny", 1, "default", 2, iterations)), key)


def test_forged_replayed_expired_and_oversized_commands_are_refused_never_run(
        hub: HubProcess, broker: Mosquitto, device: AgentProcess) -> None:
    topic = protocol.commands_topic(device.device_id)
    hub_key = load_private_key(hub.data_dir / "keys" / "hub-signing.key")
    now = datetime.now(UTC)
    with Session(broker.url, client_id="test-attacker", subscriptions=[topic]) as attacker:
        wait_for(lambda: attacker.connected, what="the attacker connected")
        time.sleep(0.5)  # its SUBACK
        sent = ask(hub, device.device_id)
        assert sent.status_code == 201, sent.text
        genuine = attacker.get(timeout=10).payload
        busy = ask(hub, device.device_id)  # one profile at a time
        assert busy.status_code == 409 and "already profiling" in busy.json()["detail"]
        path = f"/api/v1/devices/{device.device_id}/commands/{sent.json()['id']}"
        wait_for(lambda: get(hub, path)["state"] == "done", timeout=120, what="it done")

        attacks = {
            "bad_signature": _signed(generate_private_key(), device.device_id, id="c-forged",
                                     issued=now, valid=timedelta(minutes=5)),
            "replay": genuine,
            "expired": _signed(hub_key, device.device_id, id="c-expired",
                               issued=now - timedelta(minutes=20), valid=timedelta(minutes=10)),
            "wrong_device": _signed(hub_key, "someone-else", id="c-elsewhere", issued=now,
                                    valid=timedelta(minutes=5)),
            "malformed": b'{"schema": "edgefleet.command/v1", "pad": "' + b"x" * 9000 + b'"}',
        }
        for payload in attacks.values():
            attacker.publish(topic, payload)
        # Out of range though signed by the hub's key: the agent's reader checks too.
        with pytest.raises(protocol.ProtocolError, match="iterations"):
            _signed(hub_key, device.device_id, id="c-huge", issued=now,
                    valid=timedelta(minutes=5), iterations=100_000)
        wait_for(lambda: set(attacks) <= {r["reason"] for r in refusals(hub, device.device_id)},
                 what="every attack refused and reported")
    log = device.log()
    for refused in ("c-forged", "c-expired", "c-elsewhere"):
        assert f"command {refused}: profile" not in log
    assert log.count(f"command {sent.json()['id']}: profile") == 1  # the replay did not run
    assert "too many" not in log


def test_the_hub_checks_a_command_before_it_sends_it(hub: HubProcess,
                                                     device: AgentProcess) -> None:
    for body, status, words in (
            ({"iterations": 100_000}, 422, "iterations"),
            ({"max_batch": 0}, 422, "max_batch"),
            ({"variant": "int8"}, 404, "no package"),
            ({"version": 9}, 404, "tiny"),
            ({"expires_in": 7200}, 422, "expires_in")):
        answer = ask(hub, device.device_id, **body)
        assert answer.status_code == status, answer.text
        assert words in answer.text


def test_a_device_that_does_not_answer_times_out_and_its_command_expires_unrun(
        cli: Cli, hub: HubProcess, device: AgentProcess) -> None:
    device.process.send_signal(signal.SIGSTOP)  # online for the hub, deaf to the broker
    try:
        done = cli.run("model", "profile", "tiny:1", "--device", device.device_id,
                       "--timeout", "3", ok=False)
    finally:
        device.process.send_signal(signal.SIGCONT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: timed out after 3s waiting for device {device.device_id}: it did not answer "
        f"command {_command_id(done.stderr)}, which now expires unrun (`edgefleet device show "
        f"{device.device_id}` lists a refusal); try a longer --timeout")
    # Delivered once the agent runs again, by then expired: refused, not run.
    wait_for(lambda: any(r["reason"] == "expired" and _command_id(done.stderr) in r["message"]
                         for r in refusals(hub, device.device_id)), what="the late one refused")
    assert get(hub, f"/api/v1/devices/{device.device_id}/commands/"
                    f"{_command_id(done.stderr)}")["state"] == "expired"


def _command_id(stderr: str) -> str:
    return stderr.split("command ", 1)[1].split(":", 1)[0].split(" ", 1)[0]


def test_an_offline_or_unknown_device_is_a_one_line_error(
        cli: Cli, hub: HubProcess, device: AgentProcess, tmp_path: Path) -> None:
    unknown = cli.run("model", "profile", "tiny:1", "--device", "no-such-device", ok=False)
    assert unknown.returncode == 1
    assert "no device with id 'no-such-device'" in unknown.stderr
    assert device.stop() == 0
    wait_for(lambda: get(hub, f"/api/v1/devices/{device.device_id}")["status"] == "offline",
             what="the device offline")
    offline = cli.run("model", "profile", "tiny:1", "--device", device.device_id, ok=False)
    assert offline.returncode == 1
    assert len(offline.stderr.strip().splitlines()) == 1
    assert f"device {device.device_id} is offline" in offline.stderr
