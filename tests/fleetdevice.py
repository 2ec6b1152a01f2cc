"""The device side of the wire protocol for hub tests: a real MQTT session and real payloads.

A `FakeDevice` is not a mock of the hub: it enrolls over REST, logs in to
the broker with the credentials the hub handed out, and speaks
`contract.protocol` exactly as the agent does, so tests can drive each
message by hand (a resend, a malformed report, a crash). `tiny_packages`
gives it something to deploy.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from agent.mqtt import BackoffPolicy, Message, Session
from conftest import Cli
from contract import protocol, signing, tls
from contract.files import write_secret
from hubproc import HubProcess
from modelgen import make_onnx

FAST = BackoffPolicy(initial=0.05, maximum=0.5)


def tiny_packages(hub: HubProcess, cli: Cli, directory: Path) -> dict[int, str]:
    """Register tiny:1 and tiny:2 and build their signed packages; returns their digests."""
    model = make_onnx(directory / "model.onnx")
    digests = {}
    with httpx.Client(base_url=hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
        for version in (1, 2):
            blob = api.post("/api/v1/blobs", content=model.read_bytes()).json()["digest"]
            api.post("/api/v1/models/tiny/versions", json={
                "files": [{"path": "model.onnx", "digest": blob}],
                "description": f"v{version}"}).raise_for_status()
            built = cli.json("package", "build", f"tiny:{version}", "--no-deps",
                             "--platform", "linux/arm64")
            digests[version] = built["digest"]
    return digests


def enroll(hub: HubProcess, name: str) -> dict[str, Any]:
    """A new device's enrollment answer: device, device_token, hub_public_key, mqtt; over
    TLS also its key and certificate (written beside the hub's data dir) as `tls`."""
    auth = {"Authorization": f"Bearer {hub.admin_token}"}
    token = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={}, headers=auth)
    token.raise_for_status()
    key = signing.generate_private_key()
    body = {"token": token.json()["token"], "name": name, "platform": "linux/amd64",
            "public_key": signing.public_key_pem(key)}
    if hub.tls:
        body["csr"] = tls.build_csr(key)
    answer = httpx.post(f"{hub.url}/api/v1/enroll", json=body)
    assert answer.status_code == 201, answer.text
    enrolled = answer.json()
    if "certificate" in enrolled["mqtt"]:
        files = hub.data_dir.parent / "devices" / enrolled["device"]["id"]
        files.mkdir(parents=True)
        signing.write_private_key(key, files / "device.key")
        write_secret(files / "device.pem", enrolled["mqtt"]["certificate"])
        enrolled["tls"] = [str(hub.ca_path), str(files / "device.pem"),
                           str(files / "device.key")]
    return enrolled


@dataclass
class FakeDevice:
    enrollment: dict[str, Any]
    session: Session
    applied: int = 0

    @property
    def id(self) -> str:
        return str(self.enrollment["device"]["id"])

    def desired(self, timeout: float = 15) -> protocol.DesiredState:
        """The next desired state, verified with the hub key pinned at enrollment."""
        message = self.session.get(timeout)
        assert message.topic == protocol.desired_topic(self.id)
        state = protocol.verify_desired(
            message.payload, public_key=signing.load_public_key(
                self.enrollment["hub_public_key"]),
            device_id=self.id, last_generation=self.applied, now=datetime.now(UTC))
        self.applied = state.generation
        return state

    def desired_generation(self, generation: int, timeout: float = 30) -> protocol.DesiredState:
        """Wait for GENERATION, passing over the retained state the broker sends
        again after a reconnect (the agent ignores those the same way)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.desired(max(deadline - time.monotonic(), 0.01))
            except protocol.ProtocolRefusal as refusal:
                if refusal.reason != protocol.Reason.ALREADY_APPLIED:
                    raise
                continue
            assert state.generation == generation, f"got generation {state.generation}"
            return state

    def report(self, *statuses: tuple[str, str, int, str], error: str | None = None) -> None:
        """Publish a reported state: (deployment name, model, version, state) per version."""
        self.session.publish(protocol.reported_topic(self.id), protocol.build_reported(
            protocol.ReportedState(
                device_id=self.id, applied_generation=self.applied,
                deployments=tuple(
                    protocol.DeploymentStatus(name, model, version, protocol.UpdateState(state),
                                              since=datetime.now(UTC), error=error,
                                              runtime="onnxruntime", device="CPU")
                    for name, model, version, state in statuses),
                platform="linux/arm64", accelerators=("onnxruntime:CPU",),
                agent_version="9.9.9")))

    def telemetry(self, seqs: range) -> None:
        now = datetime.now(UTC)
        self.session.publish(protocol.telemetry_topic(self.id), protocol.build_telemetry(
            protocol.TelemetryBatch(self.id, tuple(
                protocol.Point(seq, now, "inference", {"requests": seq, "deployment": "tiny"})
                for seq in seqs))))


def connect(enrollment: dict[str, Any], *, password: str | None = None,
            **options: Any) -> FakeDevice:
    """Log in as the agent does: its id as client id and user, birth and will on
    its status topic, subscribed to its desired state."""
    device_id = enrollment["device"]["id"]
    mqtt = enrollment["mqtt"]
    status = protocol.status_topic(device_id)
    settings: dict[str, Any] = {
        "client_id": device_id, "username": mqtt["username"],
        "password": mqtt.get("password") if password is None else password,
        "birth": Message(status, protocol.ONLINE, retain=True),
        "will": Message(status, protocol.OFFLINE, retain=True),
        "subscriptions": [protocol.desired_topic(device_id)], "backoff": FAST, **options,
    }
    session = Session(mqtt["url"], **settings)
    if "tls" in enrollment:
        session.use_tls(tls.client_context(*map(Path, enrollment["tls"])))
    session.start()
    return FakeDevice(enrollment, session)


def crashing_device(enrollment: dict[str, Any]) -> subprocess.Popen[str]:
    """A device in a process of its own, online until the test kills it; its
    broker then publishes its last will."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from fleetdevice import connect
        device = connect({enrollment!r})
        device.session.wait_connected(15)
        print("connected", flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "connected"
    return process
