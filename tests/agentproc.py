"""Agent processes for tests: bench/harness.py's (shared with the benchmarks), plus
deploying to one and scoring on it through the CLI and the scoring API."""

from __future__ import annotations

import os
import subprocess

import httpx

from bench.harness import (
    AgentProcess,
    enrollment_token,
    publish_version,
    start_agent,
    wait_for,
)
from hubproc import EDGEFLEET, HubProcess

__all__ = ["AgentProcess", "deploy", "enrollment_token", "infer", "publish_version",
           "start_agent", "wait_for"]


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
