"""The retraining pipeline: train, beat the champion, register, package, QA, production.

Run: python -m examples.mlops.pipeline --hub URL [--alpha A] [...]   (from the repo root)

Stages, each with a progress line and, when it fails, its own exit code:

  train     10  a Ridge regression on the diabetes data, exported to ONNX
  evaluate  11  the challenger against the champion (the version the newest completed
                rollout to --prod gave production), both run by onnxruntime on the same
                held-out data; the registry's stored metric is shown beside it
  register  12  only a better challenger, with lineage (git commit, dataset digest,
                run id) and its parameters and metrics
  package   13  `edgefleet package build`
  qa        14  a rollout to the --qa devices
  gate      15  their inference telemetry: error rate and p95 latency within limits,
                over at least --gate-requests requests; else the QA rollout is rolled back
  prod      16  a rollout to the --prod devices in --waves, auto-rollback on
Exit 0: promoted, or the champion kept (a challenger no better is not registered).
2: a usage error. The hub's URL and token come from --hub/--token or EDGEFLEET_HUB/
EDGEFLEET_TOKEN (an operator's token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from examples.diabetes.train import train
from examples.mlops.evaluate import dataset_digest, rmse
from examples.mlops.gate import Health, Limits, health
from examples.mlops.hub import Hub, HubError

HERE = Path(__file__).resolve().parent
CODES = {"train": 10, "evaluate": 11, "register": 12, "package": 13, "qa": 14, "gate": 15,
         "prod": 16}
WATCH_COMPLETED = 0  # `edgefleet rollout watch` exit codes (see its --help)
WATCH_TIMED_OUT = 4


class StageFailed(Exception):
    """A stage could not do its job; the message says why."""


def say(stage: str, text: str) -> None:
    print(f"{datetime.now().astimezone():%H:%M:%S} [{stage}] {text}", flush=True)


@dataclass
class Run:
    """What the stages found out, for the next ones and the --summary file."""

    args: argparse.Namespace
    hub: Hub
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    result: str = "failed"
    stage: str = ""
    challenger: Path | None = None
    challenger_rmse: float | None = None
    champion: dict[str, Any] | None = None
    champion_rmse: float | None = None
    version: int | None = None
    rollouts: dict[str, str] = field(default_factory=dict)
    health: Health | None = None

    def summary(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "result": self.result, "stage": self.stage,
                "model": self.args.model, "version": self.version,
                "champion": self.champion and self.champion["version"],
                "challenger_rmse": self.challenger_rmse, "champion_rmse": self.champion_rmse,
                "rollouts": self.rollouts,
                "qa_health": self.health and vars(self.health) | {
                    "error_rate": self.health.error_rate}}


def selector(text: str) -> dict[str, str]:
    """'stage=qa,site=lab' -> {'stage': 'qa', 'site': 'lab'}."""
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if not pairs or any(not key or not sep for key, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE[,KEY=VALUE]")
    return {key.strip(): value.strip() for key, _, value in pairs}


def target_text(target: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in target.items())


# --- stages ---------------------------------------------------------------------------


def stage_train(run: Run) -> None:
    out = Path(run.args.work_dir) / run.run_id
    metrics = train(out, run.args.alpha)
    run.challenger = out / "model.onnx"
    say("train", f"alpha={run.args.alpha:g}: {run.challenger} (sklearn RMSE {metrics['rmse']})")


def production_version(run: Run) -> dict[str, Any] | None:
    """The version in production: the newest completed rollout of the model to --prod."""
    for rollout in run.hub.get("/api/v1/rollouts", state="completed"):
        if rollout["model"] == run.args.model and rollout["target"] == run.args.prod \
                and rollout["deployment"] == run.args.deployment:
            record: dict[str, Any] = run.hub.get(
                f"/api/v1/models/{run.args.model}/versions/{rollout['version']}")
            return record
    return None


def stage_evaluate(run: Run) -> bool:
    """True when the challenger should go on: no champion, or better than it."""
    assert run.challenger is not None
    run.challenger_rmse = rmse(run.challenger)
    run.champion = production_version(run)
    if run.champion is None:
        say("evaluate", f"challenger RMSE {run.challenger_rmse}; nothing in production on "
            f"{target_text(run.args.prod)} yet: it is the first champion")
        return True
    ref = f"{run.args.model}:{run.champion['version']}"
    with tempfile.TemporaryDirectory() as tmp:
        done = run.hub.cli("model", "download", ref, "--out", tmp, "--quiet")
        if done.returncode != 0:
            raise StageFailed(f"cannot download the champion {ref}: {done.stderr.strip()}")
        model = next(Path(tmp).rglob("*.onnx"), None)
        if model is None:
            raise StageFailed(f"the champion {ref} has no .onnx file")
        run.champion_rmse = rmse(model)
    stored = run.champion["metrics"].get("rmse")
    if run.champion["lineage"].get("dataset_digest") not in (None, dataset_digest()):
        say("evaluate", f"note: {ref} was trained on other data; both are scored on this data")
    bar = run.champion_rmse * (1 - run.args.min_improvement)
    better = run.challenger_rmse < bar
    say("evaluate", f"challenger RMSE {run.challenger_rmse} vs champion {ref} "
        f"{run.champion_rmse} (stored: {stored}): challenger is "
        + ("better" if better else f"not better (needs < {bar:.3f})"))
    return better


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def stage_register(run: Run) -> None:
    assert run.challenger is not None and run.challenger_rmse is not None
    lineage: dict[str, Any] = {"dataset_digest": dataset_digest(), "run_id": run.run_id,
                               "source": "examples/mlops/pipeline.py"}
    commit = git("rev-parse", "HEAD")
    if commit:  # the training code's commit; dirty if the examples changed since
        lineage |= {"git_commit": commit,
                    "git_dirty": bool(git("status", "--porcelain", "--", ".."))}
    record = run.hub.register(
        run.args.model, {"model.onnx": run.challenger}, metrics={"rmse": run.challenger_rmse},
        lineage=lineage, tags={"param.alpha": f"{run.args.alpha:g}", "trained-by": "mlops"},
        description=f"Ridge(alpha={run.args.alpha:g}) on the diabetes data, "
                    f"run {run.run_id}")
    run.version = int(record["version"])
    say("register", f"{run.args.model}:{run.version} with RMSE {run.challenger_rmse}, "
        f"commit {(commit or 'unknown')[:12]}, data {lineage['dataset_digest'][:19]}")


def stage_package(run: Run) -> None:
    ref = f"{run.args.model}:{run.version}"
    args = ["package", "build", ref, "--quiet"]
    if run.args.platform:
        args += ["--platform", run.args.platform]
    built = run.hub.cli_json(*args)
    say("package", f"{ref}: {built['digest']} for {', '.join(built['platforms'])}")


def devices(run: Run, target: dict[str, str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = run.hub.get(
        "/api/v1/devices", tag=[f"{k}={v}" for k, v in target.items()])
    return found


def roll_out(run: Run, stage: str, target: dict[str, str], *extra: str) -> dict[str, Any]:
    """Roll the new version out to TARGET and follow it to its end; the final record."""
    if not devices(run, target):
        raise StageFailed(f"no device matches {target_text(target)}")
    record = run.hub.cli_json(
        "rollout", "create", f"{run.args.model}:{run.version}", "--target", target_text(target),
        "--deployment", run.args.deployment, "--auto-rollback",
        "--max-error-rate", str(run.args.max_error_rate),
        "--max-latency-ratio", str(run.args.max_latency_ratio), *extra)
    run.rollouts[stage] = record["id"]
    say(stage, f"rollout {record['id']} to {target_text(target)}")
    # Its own progress lines go straight to our output (CI logs).
    code = run.hub.cli("rollout", "watch", record["id"], "--interval", "0.5",
                       "--timeout", str(run.args.rollout_timeout), echo=True).returncode
    final: dict[str, Any] = run.hub.get(f"/api/v1/rollouts/{record['id']}", devices="true")
    if code != WATCH_COMPLETED:
        why = "timed out" if code == WATCH_TIMED_OUT else final["state"]
        raise StageFailed(f"rollout {record['id']} did not complete: {why}"
                          + (f" ({final['reason']})" if final.get("reason") else ""))
    return final


def stage_gate(run: Run, qa: dict[str, Any]) -> None:
    """Wait for enough QA traffic on the new version, then judge it."""
    assert run.version is not None
    limits = Limits(run.args.max_error_rate, run.args.max_p95_ms, run.args.gate_requests)
    since = datetime.fromisoformat(qa["created_at"].replace("Z", "+00:00"))
    serving = [d["device_id"] for d in qa["devices"] if d["state"] == "serving"]
    deadline = time.monotonic() + run.args.gate_timeout
    while True:
        seen = health({d: run.hub.telemetry(d, since) for d in serving},
                      run.args.deployment, run.version)
        run.health = seen
        if seen.requests >= limits.min_requests or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    say("gate", seen.describe())
    why = limits.failures(seen)
    if seen.requests < limits.min_requests:
        why.append(f"only {seen.requests} requests in {run.args.gate_timeout:g} s, "
                   f"the gate needs {limits.min_requests}")
    if why:
        rolled = run.hub.cli("rollout", "rollback", qa["id"])
        say("gate", f"rolled the QA devices back ({'ok' if rolled.returncode == 0 else 'FAILED'})")
        raise StageFailed("; ".join(why))


def pipeline(run: Run) -> None:
    run.stage = "train"
    stage_train(run)
    run.stage = "evaluate"
    if not stage_evaluate(run):
        run.result = "kept"
        return
    for name, step in (("register", stage_register), ("package", stage_package)):
        run.stage = name
        step(run)
    run.stage = "qa"
    qa = roll_out(run, "qa", run.args.qa)
    run.stage = "gate"
    stage_gate(run, qa)
    run.stage = "prod"
    roll_out(run, "prod", run.args.prod, "--waves", run.args.waves, "--soak", run.args.soak)
    run.result = "promoted"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.mlops.pipeline",
                                description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[4:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    p.add_argument("--hub", default=env("EDGEFLEET_HUB"), help="hub URL [env EDGEFLEET_HUB]")
    p.add_argument("--token", default=env("EDGEFLEET_TOKEN"),
                   help="operator API token [env EDGEFLEET_TOKEN]")
    p.add_argument("--model", default="diabetes", help="model name [%(default)s]")
    p.add_argument("--deployment", help="deployment name on the devices [the model name]")
    p.add_argument("--alpha", type=float, default=0.1, help="Ridge alpha [%(default)s]")
    p.add_argument("--min-improvement", type=float, default=0.0,
                   help="share by which the challenger's RMSE must beat the champion's "
                        "[%(default)s: any improvement]")
    p.add_argument("--work-dir", default=str(HERE / "build"), help="where models are written")
    p.add_argument("--platform", help="package platforms [the CLI's default]")
    p.add_argument("--qa", type=selector, default="stage=qa", help="QA devices [%(default)s]")
    p.add_argument("--prod", type=selector, default="stage=prod",
                   help="production devices [%(default)s]")
    p.add_argument("--waves", default="10%,50%,100%", help="production waves [%(default)s]")
    p.add_argument("--soak", default="5m", help="soak of each production wave [%(default)s]")
    p.add_argument("--gate-requests", type=int, default=200,
                   help="QA requests the gate needs to judge [%(default)s]")
    p.add_argument("--gate-timeout", type=float, default=600,
                   help="seconds to wait for them [%(default)s]")
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="QA gate and rollouts: highest error rate [%(default)s]")
    p.add_argument("--max-p95-ms", type=float, default=100.0,
                   help="QA gate: highest p95 latency [%(default)s]")
    # The hub's default: it compares the highest p95 of each version's points, which
    # scatter, so a tighter ratio fails healthy devices now and then.
    p.add_argument("--max-latency-ratio", type=float, default=3.0,
                   help="rollouts: highest p95 latency ratio new/old on a device [%(default)s]")
    p.add_argument("--rollout-timeout", type=float, default=3600,
                   help="seconds a rollout may take [%(default)s]")
    p.add_argument("--summary", type=Path, help="write what happened here as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.hub or not args.token:
        parser().error("give --hub and --token (or EDGEFLEET_HUB and EDGEFLEET_TOKEN)")
    args.deployment = args.deployment or args.model
    run = Run(args, Hub(args.hub, args.token))
    say("start", f"run {run.run_id}: {args.model} on {args.hub}, QA {target_text(args.qa)}, "
        f"production {target_text(args.prod)}")
    code = 0
    try:
        pipeline(run)
    except (StageFailed, HubError, OSError) as exc:
        code = CODES[run.stage]
        say(run.stage, f"FAILED: {exc} (exit {code})")
    if run.result == "promoted":
        say("done", f"{args.model}:{run.version} is in production")
    elif run.result == "kept":
        champion = run.champion["version"] if run.champion else "?"
        say("done", f"the champion {args.model}:{champion} stays; nothing registered")
    if args.summary:
        args.summary.write_text(json.dumps(run.summary(), indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
