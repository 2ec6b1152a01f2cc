"""Start a real `edgefleet agent run` process against a hub, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from hubproc import EDGEFLEET, HubProcess, free_port, stop_process

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float = 30, what: str = "it") -> T:
    """Poll CHECK until it returns something truthy; fail naming WHAT after TIMEOUT."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def enrollment_token(hub: HubProcess, **body: object) -> str:
    answer = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json=body,
                        headers={"Authorization": f"Bearer {hub.admin_token}"})
    answer.raise_for_status()
    return answer.json()["token"]


@dataclass
class AgentProcess:
    data_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def device_id(self) -> str:
        return json.loads((self.data_dir / "identity.json").read_text())["device_id"]

    @property
    def api_key(self) -> str:
        return (self.data_dir / "serving-api-key").read_text().strip()

    def state(self) -> dict:
        return json.loads((self.data_dir / "state.json").read_text())

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.process, sig, timeout)


def start_agent(
    hub: HubProcess, data_dir: Path, *, port: int | None = None, token: str | None = None,
    env: dict[str, str] | None = None, telemetry_interval: float = 1.0,
    extra_args: tuple[str, ...] = (),
) -> AgentProcess:
    """Start (and on a first start, enroll) an agent; returns once its scoring API answers."""
    port = port or free_port()
    log_path = data_dir.parent / f"{data_dir.name}-agent.log"
    args = [*EDGEFLEET, "agent", "run", "--data-dir", str(data_dir), "--serve-port", str(port),
            "--telemetry-interval", str(telemetry_interval), *extra_args]
    if not (data_dir / "identity.json").exists():
        args += ["--hub", hub.url, "--token", token or enrollment_token(hub)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    agent = AgentProcess(data_dir, port, process, log_path)

    def live() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"agent exited with {process.returncode}:\n{agent.log()}")
        try:
            return httpx.get(f"{agent.url}/v2/health/live", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(live, timeout=60, what="the agent's scoring API")
    return agent


def publish_version(hub: HubProcess, name: str, model: Path, *, extra: tuple[str, ...] = ()) -> int:
    """Register MODEL as the next version of NAME and push its signed package; returns the version."""
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers, timeout=60) as c:
        digest = c.post("/api/v1/blobs", content=model.read_bytes()).json()["digest"]
        answer = c.post(f"/api/v1/models/{name}/versions",
                        json={"files": [{"path": model.name, "digest": digest}]})
        answer.raise_for_status()
    version = answer.json()["version"]
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token}
    done = subprocess.run([*EDGEFLEET, "package", "build", f"{name}:{version}", "--no-deps",
                           "--quiet", *extra], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"package build failed:\n{done.stderr}")
    return version


def deploy(hub: HubProcess, device_id: str, ref: str, *extra: str) -> None:
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token}
    done = subprocess.run([*EDGEFLEET, "deploy", ref, "--device", device_id, *extra], env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"deploy failed:\n{done.stderr}")


def infer(agent: AgentProcess, name: str, rows: list[list[float]], *,
          version: str | None = None, input_name: str = "x") -> dict:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": input_name, "datatype": "FP32", "shape": [len(rows), len(rows[0])],
                        "data": [v for row in rows for v in row]}]}
    answer = httpx.post(agent.url + path, json=body, timeout=30,
                        headers={"Authorization": f"Bearer {agent.api_key}"})
    answer.raise_for_status()
    return answer.json()
