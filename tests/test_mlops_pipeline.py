"""The retraining pipeline (examples/mlops) end to end against a real hub.

A real Mosquitto, a real `edgefleet hub serve`, and two simulated fleets
(`edgefleet sim`, the agent's own protocol code): two devices tagged
stage=qa, four tagged stage=prod. The pipeline runs as a user runs it, one
command in its own process; the tests then read what it did through the
REST API. In order: a first model with nothing in production goes all the
way; a better challenger beats it and replaces it; a worse one is not
registered; one that is slow on the QA devices is stopped by the gate; one
that fails in production is rolled back by the hub after its first wave; and
the webhook receiver runs the pipeline on a signed event and refuses forged
ones.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from examples.mlops.gate import Limits, health
from hubproc import EDGEFLEET, HubProcess, free_port, start_hub
from mosquitto import Mosquitto, start_mosquitto

ROOT = Path(__file__).resolve().parent.parent
# The third version's latency on every device: its p95 is above the gate's --max-p95-ms.
SLOW = ("--latency-ms", "diabetes:3=150")
# The fourth fails half its requests on the production devices only.
FAILING = ("--error-rate", "diabetes:4=0.5")
FAST = ("--telemetry-interval", "0.2", "--rps", "100", "--step-latency", "0.02")


@dataclass
class Site:
    base: Path
    broker: Mosquitto
    hub: HubProcess
    env: dict[str, str]

    def get(self, path: str, **params: Any) -> Any:
        answer = httpx.get(f"{self.hub.url}{path}", params=params, verify=self.hub.verify,
                           headers={"Authorization": f"Bearer {self.hub.admin_token}"})
        answer.raise_for_status()
        return answer.json()

    def pipeline(self, name: str, *args: str) -> tuple[int, str, dict[str, Any]]:
        """Run the pipeline; its exit code, output and summary."""
        summary = self.base / f"{name}.json"
        done = subprocess.run(
            [sys.executable, "-m", "examples.mlops.pipeline", *self.pipeline_args(),
             "--summary", str(summary), *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=180)
        output = done.stdout + done.stderr
        (self.base / f"{name}.log").write_text(output)  # for a look after a failure
        return done.returncode, output, json.loads(summary.read_text())

    def pipeline_args(self) -> list[str]:
        return ["--work-dir", str(self.base / "work"), "--platform", "linux/arm64",
                "--waves", "50%,100%", "--soak", "1s", "--gate-requests", "100",
                "--gate-timeout", "20", "--max-p95-ms", "100", "--rollout-timeout", "60"]

    def serving(self, tag: str) -> set[int | None]:
        """The diabetes version each device tagged TAG reports serving."""
        found = set()
        for device in self.get("/api/v1/devices", tag=[tag]):
            rows = self.get(f"/api/v1/devices/{device['id']}/deployments")["reported"]
            found.add(next((r["version"] for r in rows
                            if r["name"] == "diabetes" and r["state"] == "serving"), None))
        return found


def start_sim(site: Site, name: str, count: int, stage: str,
              *extra: str) -> subprocess.Popen[bytes]:
    with open(site.base / f"sim-{name}.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [*EDGEFLEET, "sim", "--devices", str(count), "--hub", site.hub.url, "--api-token",
             site.hub.admin_token, "--tag", f"stage={stage}", "--name-prefix", f"{name}-",
             "--data-dir", str(site.base / f"sim-{name}"), *FAST, *SLOW, *extra],
            env=site.env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("mlops")
    broker = start_mosquitto(base / "mosquitto")
    hub = start_hub(base / "data", extra_args=("--mqtt-url", broker.url))
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
           "EDGEFLEET_CONFIG": str(base / "config.json"), "PYTHONPATH": str(ROOT)}
    if hub.tls:
        env["EDGEFLEET_CA"] = str(hub.ca_path)
    site = Site(base, broker, hub, env)
    sims = [start_sim(site, "qa", 2, "qa"), start_sim(site, "prod", 4, "prod", *FAILING)]
    try:
        deadline = time.monotonic() + 30
        while sum(d["status"] == "online" for d in site.get("/api/v1/devices")) < 6:
            assert time.monotonic() < deadline, "the simulated devices did not come online"
            time.sleep(0.2)
        yield site
    finally:
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=20)
        assert hub.stop() == 0, hub.log()
        broker.stop()


def test_a_first_model_goes_through_qa_to_production(site: Site) -> None:
    code, output, summary = site.pipeline("first", "--alpha", "10")
    assert code == 0, output
    assert summary["result"] == "promoted" and summary["champion"] is None, summary
    assert summary["version"] == 1
    assert site.serving("stage=prod") == {1} and site.serving("stage=qa") == {1}
    assert "[evaluate]" in output and "nothing in production" in output


def test_a_better_challenger_is_registered_with_lineage_gated_and_promoted(site: Site) -> None:
    code, output, summary = site.pipeline("better", "--alpha", "0.1")
    assert code == 0, output
    assert summary["result"] == "promoted" and summary["champion"] == 1, summary
    assert summary["challenger_rmse"] < summary["champion_rmse"]
    version = site.get("/api/v1/models/diabetes/versions/2")
    assert version["metrics"] == {"rmse": summary["challenger_rmse"]}
    assert version["tags"]["param.alpha"] == "0.1"
    lineage = version["lineage"]
    assert lineage["run_id"] == summary["run_id"]
    assert lineage["dataset_digest"].startswith("sha256:")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert lineage["git_commit"] == head
    rollouts = {r["id"]: r for r in site.get("/api/v1/rollouts")}
    qa, prod = (rollouts[summary["rollouts"][stage]] for stage in ("qa", "prod"))
    assert (qa["target"], qa["state"]) == ({"stage": "qa"}, "completed")
    assert (prod["target"], prod["state"], prod["waves"]) == (
        {"stage": "prod"}, "completed", "50%,100%")
    assert summary["qa_health"]["requests"] >= 100
    assert summary["qa_health"]["errors"] == 0
    assert site.serving("stage=prod") == {2}


def test_a_worse_challenger_is_not_registered(site: Site) -> None:
    rollouts = len(site.get("/api/v1/rollouts"))
    code, output, summary = site.pipeline("worse", "--alpha", "100")
    assert code == 0, output
    assert summary["result"] == "kept" and summary["version"] is None, summary
    assert summary["challenger_rmse"] > summary["champion_rmse"]
    assert "not better" in output
    assert [v["version"] for v in site.get("/api/v1/models/diabetes/versions")] == [2, 1]
    assert len(site.get("/api/v1/rollouts")) == rollouts
    assert site.serving("stage=prod") == {2}


def test_a_challenger_slow_on_the_qa_devices_stops_at_the_gate(site: Site) -> None:
    # Version 3 (alpha 0.3 beats 0.1) is slow on every device (SLOW). The rollouts' own
    # latency check is off, so the gate decides.
    code, output, summary = site.pipeline("slow", "--alpha", "0.3", "--max-latency-ratio", "100")
    assert code == 15, output
    assert summary["stage"] == "gate" and summary["version"] == 3, summary
    assert summary["qa_health"]["p95_ms"] > 100
    assert "p95" in output and "rolled the QA devices back (ok)" in output
    assert "prod" not in summary["rollouts"]
    assert site.serving("stage=prod") == {2}
    deadline = time.monotonic() + 20
    while site.serving("stage=qa") != {2}:
        assert time.monotonic() < deadline, site.serving("stage=qa")
        time.sleep(0.2)


def test_a_challenger_failing_in_production_is_rolled_back_by_the_hub(site: Site) -> None:
    # A longer soak than the others: the hub has time to see the errors in the first wave.
    code, output, summary = site.pipeline("failing", "--alpha", "0.5", "--soak", "5s")
    assert code == 16, output
    assert summary["stage"] == "prod" and summary["version"] == 4, summary
    assert summary["qa_health"]["errors"] == 0  # QA saw nothing wrong
    prod = site.get(f"/api/v1/rollouts/{summary['rollouts']['prod']}")
    assert prod["state"] == "rolled_back" and "error rate" in output, output
    assert prod["current_wave"] == 1  # the second wave never started
    deadline = time.monotonic() + 20
    while site.serving("stage=prod") != {2}:
        assert time.monotonic() < deadline, site.serving("stage=prod")
        time.sleep(0.2)


def sign(secret: str, stamp: int, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), f"{stamp}.".encode() + body,
                                hashlib.sha256).hexdigest()


def test_the_webhook_trigger_runs_the_pipeline_on_a_signed_event_only(site: Site) -> None:
    secret = "s3cret-" + "x" * 32
    secret_file = site.base / "webhook-secret"
    secret_file.write_text(secret + "\n")
    port = free_port()
    log_path = site.base / "trigger.log"
    with open(log_path, "wb") as log:
        trigger = subprocess.Popen(
            [sys.executable, "-m", "examples.mlops.trigger", "--secret-file", str(secret_file),
             "--port", str(port), "--type", "model.registered", "--",
             *site.pipeline_args(), "--alpha", "100"],
            cwd=ROOT, env=site.env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/hook"

    def logged(text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in log_path.read_text():
            assert trigger.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

    try:
        logged("listening on")
        body = json.dumps({"id": 999_999, "type": "model.registered", "subject": "x:1"}).encode()
        now = int(time.time())
        forged = [{"Edgefleet-Timestamp": str(now), "Edgefleet-Signature": sign("wrong" * 4, now,
                                                                                  body)},
                  {"Edgefleet-Timestamp": str(now - 3600),
                   "Edgefleet-Signature": sign(secret, now - 3600, body)},
                  {"Edgefleet-Timestamp": str(now + 1), "Edgefleet-Signature": sign(
                      secret, now, body)},
                  {}]
        for headers in forged:
            assert httpx.post(url, content=body, headers=headers).status_code == 401
        other = json.dumps({"id": 999_998, "type": "rollout.completed"}).encode()
        answer = httpx.post(url, content=other, headers={
            "Edgefleet-Timestamp": str(now), "Edgefleet-Signature": sign(secret, now, other)})
        assert answer.status_code == 202 and "ignored" in answer.text
        assert "running" not in log_path.read_text()

        subprocess.run([*EDGEFLEET, "webhook", "add", url, "--type", "model.registered",
                        "--secret-file", str(secret_file)], env=site.env, check=True,
                       capture_output=True)
        model = next((site.base / "work").rglob("model.onnx"))
        registered = subprocess.run([*EDGEFLEET, "model", "register", str(model), "--name",
                                     "other", "--quiet"], env=site.env, capture_output=True,
                                    text=True)
        assert registered.returncode == 0, registered.stderr
        logged("model.registered other:1: running")
        logged("pipeline exited 0", timeout=120)
        text = log_path.read_text()
        assert text.count("refused a request") == len(forged)
        assert "the champion diabetes:2 stays" in text
    finally:
        trigger.send_signal(signal.SIGINT)
        trigger.wait(timeout=10)


def test_both_ci_files_run_the_one_command() -> None:
    github = yaml.safe_load((ROOT / "examples/mlops/github-workflow.yml").read_text())
    gitlab = yaml.safe_load((ROOT / "examples/mlops/gitlab-ci.yml").read_text())
    commands = [step.get("run", "") for step in github["jobs"]["retrain"]["steps"]]
    commands += gitlab["mlops-retrain"]["script"]
    runs = [c for c in commands if "examples.mlops.pipeline" in c]
    assert len(runs) == 2 and all(c.startswith("python -m examples.mlops.pipeline ")
                                  for c in runs), runs


def test_the_gate_adds_up_only_the_new_versions_points() -> None:
    def point(version: int, count: int, errors: int, p95: float,
              deployment: str = "diabetes") -> dict[str, Any]:
        return {"kind": "inference", "values": {"deployment": deployment, "version": version,
                                                "count": count, "errors": errors,
                                                "p95_ms": p95}}

    seen = health({"a": [point(3, 10, 1, 40.0), point(3, 30, 0, 20.0), point(2, 50, 50, 900.0)],
                   "b": [point(3, 20, 2, 60.0), point(3, 5, 0, 1.0, deployment="other")],
                   "c": [point(2, 5, 0, 10.0)]}, "diabetes", 3)
    assert (seen.devices, seen.requests, seen.errors) == (2, 60, 3)
    assert seen.error_rate == pytest.approx(0.05)
    assert seen.p95_ms == pytest.approx(60.0)  # b's; a's is (40*9 + 20*30) / 39
    assert Limits(0.1, 50.0, 10).failures(seen) == ["p95 60.0 ms above 50 ms"]
    assert Limits(0.01, 100.0, 10).failures(seen) == ["error rate 5.00% above 1.00%"]
