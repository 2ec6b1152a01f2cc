"""The main job, end to end on one machine: what README.md's first command runs.

Starts a hub with its embedded MQTT broker, trains the diabetes example,
registers it, lists and shows it, downloads it back and checks the bytes,
then stops the hub. Pass --keep to leave the hub running afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hubproc import HubProcess, start_hub  # noqa: E402

console = Console()
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def edgefleet(hub: HubProcess, *args: str) -> str:
    console.print(f"[dim]$ edgefleet {' '.join(args)}[/dim]")
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
           "COLUMNS": "140"}
    done = subprocess.run([EDGEFLEET, *args], env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout)  # already formatted by the CLI; do not re-wrap
    if done.returncode != 0:
        console.print(done.stderr)
        raise SystemExit(f"edgefleet {args[0]} failed")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "edgefleet-demo-data")
    parser.add_argument("--keep", action="store_true", help="leave the hub running at the end")
    args = parser.parse_args()

    step("1. Start the hub (REST API + embedded MQTT broker)")
    hub = start_hub(args.data_dir)
    console.print(hub.log().strip())
    try:
        work = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
        step("2. Train the diabetes example (scikit-learn Ridge -> ONNX)")
        trained = subprocess.run(
            [sys.executable, str(ROOT / "examples/diabetes/train.py"), "--out", str(work)],
            check=True, capture_output=True, text=True,
        )
        metrics = json.loads(trained.stdout)
        console.print(metrics)

        step("3. Register it")
        edgefleet(hub, "model", "register", str(work / "model.onnx"), "--name", "diabetes",
                  "--tag", "team=health", "--metric", f"rmse={metrics['rmse']}",
                  "--description", "Ridge regression on the sklearn diabetes data", "--quiet")
        step("4. List and show")
        edgefleet(hub, "model", "list")
        edgefleet(hub, "model", "list", "diabetes")
        edgefleet(hub, "model", "show", "diabetes")

        step("5. Download it back and compare")
        edgefleet(hub, "model", "download", "diabetes", "--out", str(work / "back"), "--quiet")
        same = (work / "back/model.onnx").read_bytes() == (work / "model.onnx").read_bytes()
        digest = hashlib.sha256((work / "model.onnx").read_bytes()).hexdigest()[:16]
        console.print(f"bytes identical: {same} (sha256 {digest}...)")
        if not same:
            raise SystemExit("downloaded bytes differ")
        step("6. Audit log")
        edgefleet(hub, "audit", "--limit", "5")
    finally:
        if args.keep:
            console.print(f"Hub left running at {hub.url} (pid {hub.process.pid}); "
                          f"admin token in {args.data_dir / 'admin-token'}")
        else:
            hub.stop()
            console.print("Hub stopped. Data kept in " + str(args.data_dir))


if __name__ == "__main__":
    main()
