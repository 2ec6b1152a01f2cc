"""The main job, end to end on one machine: what README.md's first command runs.

A hub with its managed MQTT broker (Mosquitto), one real agent on this machine and a
few simulated devices (`edgefleet sim`, speaking the real protocol). The
diabetes model is trained, registered as two versions, packaged and signed,
rolled out (version 1 everywhere, then version 2 in waves with a failure
threshold and automatic rollback), scored on the real agent, and the
rollout's summary printed. Everything stops at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for bench/harness.py, which starts the processes

from bench.harness import (  # noqa: E402
    EDGEFLEET,
    AgentProcess,
    HubProcess,
    start_agent,
    start_hub,
    wait_for,
)

console = Console()
TARGET = "site=demo"


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def edgefleet(hub: HubProcess, *args: str, check: bool = True) -> str:
    """Run the CLI as a user would; --json answers are for this script, not shown."""
    console.print(f"[dim]$ edgefleet {' '.join(args)}[/dim]")
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
           "EDGEFLEET_CA": str(hub.ca_path), "COLUMNS": "120"}
    done = subprocess.run([*EDGEFLEET, *args], env=env, capture_output=True, text=True)
    if "--json" not in args:
        sys.stdout.write(done.stdout)  # already formatted by the CLI; do not re-wrap
    if check and done.returncode != 0:
        console.print(done.stderr)
        raise SystemExit(f"edgefleet {args[0]} failed")
    return done.stdout


def _quiet(hub: HubProcess, *args: str) -> str:
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
           "EDGEFLEET_CA": str(hub.ca_path)}
    return subprocess.run([*EDGEFLEET, *args], env=env, capture_output=True, text=True,
                          check=True).stdout


def train(work: Path, alpha: float) -> tuple[Path, float]:
    out = work / f"alpha-{alpha}"
    done = subprocess.run([sys.executable, str(ROOT / "examples/diabetes/train.py"),
                           "--out", str(out), "--alpha", str(alpha)],
                          check=True, capture_output=True, text=True)
    return out / "model.onnx", json.loads(done.stdout)["rmse"]


def start_sim(hub: HubProcess, work: Path, devices: int) -> subprocess.Popen:
    log = open(work / "sim.log", "wb")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(
        [*EDGEFLEET, "sim", "--devices", str(devices), "--hub", hub.url,
         "--api-token", hub.admin_token, "--tag", TARGET, "--data-dir", str(work / "sim"),
         "--telemetry-interval", "2", "--step-latency", "0.2"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "EDGEFLEET_CA": str(hub.ca_path)},
    )


def score(agent: AgentProcess) -> dict:
    import httpx

    row = [0.038, 0.051, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.020, -0.018]
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 10], "data": row}]}
    answer = httpx.post(f"{agent.url}/v2/models/diabetes/infer", json=body,
                        headers={"Authorization": f"Bearer {agent.api_key}"}, timeout=30)
    answer.raise_for_status()
    return answer.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "edgefleet-demo-data",
                        help="the hub's data (kept); the agent and sim start fresh each run")
    parser.add_argument("--simulated", type=int, default=5, help="simulated devices")
    parser.add_argument("--keep", action="store_true", help="leave everything running at the end")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    hub = agent = sim = None
    try:
        step("1. Start the hub (REST API + managed Mosquitto broker)")
        hub = start_hub(args.data_dir)
        console.print(hub.log().strip())

        step("2. Train the diabetes example twice (Ridge -> ONNX) and register both")
        versions = []
        for alpha in (0.1, 1.0):
            model, rmse = train(work, alpha)
            out = edgefleet(hub, "model", "register", str(model), "--name", "diabetes",
                            "--tag", "team=health", "--metric", f"rmse={rmse}", "--quiet",
                            "--json")
            versions.append(json.loads(out)["version"])
        edgefleet(hub, "model", "list", "diabetes")

        step("3. Package both: signed multi-platform OCI images (native mode, no deps)")
        for version in versions:
            edgefleet(hub, "package", "build", f"diabetes:{version}", "--no-deps", "--quiet")
        edgefleet(hub, "package", "list", "diabetes")

        step(f"4. Devices: one real agent and {args.simulated} simulated ones, tagged {TARGET}")
        token = json.loads(edgefleet(hub, "device", "token", "create", "--tag", TARGET,
                                     "--json"))["token"]
        agent = start_agent(hub, work / "agent", token=token, telemetry_interval=2)
        sim = start_sim(hub, work, args.simulated)
        wait_for(lambda: len(json.loads(_quiet(hub, "device", "list", "--tag", TARGET,
                                               "--json"))) >= args.simulated + 1,
                 timeout=60, what="every device to enroll")
        edgefleet(hub, "device", "list", "--tag", TARGET)

        step(f"5. Roll out diabetes:{versions[0]} everywhere")
        first = json.loads(edgefleet(hub, "rollout", "create", f"diabetes:{versions[0]}",
                                     "--target", TARGET, "--json"))["id"]
        edgefleet(hub, "rollout", "watch", first, "--timeout", "120")

        step(f"6. Roll out diabetes:{versions[1]} in waves, pausing and rolling back on failure")
        second = json.loads(edgefleet(
            hub, "rollout", "create", f"diabetes:{versions[1]}", "--target", TARGET,
            "--waves", "1,50%,100%", "--soak", "3s", "--max-failures", "0", "--auto-rollback",
            "--json"))["id"]
        edgefleet(hub, "rollout", "watch", second, "--timeout", "180", check=False)

        step("7. Score on the real agent (Open Inference Protocol)")
        answer = score(agent)
        console.print(f"model {answer['model_name']} version {answer['model_version']}: "
                      f"predicted disease progression {answer['outputs'][0]['data'][0]:.1f}")

        step("8. Rollout summary")
        edgefleet(hub, "rollout", "show", second)
        edgefleet(hub, "audit", "--action", "rollout.", "--limit", "8")
    finally:
        if args.keep:
            console.print(f"Left running: hub {hub.url if hub else '-'}, agent "
                          f"{agent.url if agent else '-'}; work dir {work}")
        else:
            if sim is not None:
                sim.send_signal(signal.SIGTERM)
                sim.wait(30)
            if agent is not None:
                agent.stop()
            if hub is not None:
                hub.stop()
            shutil.rmtree(work, ignore_errors=True)
            console.print(f"Everything stopped. The hub's data stays in {args.data_dir}")


if __name__ == "__main__":
    main()
