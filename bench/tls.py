"""The cost of TLS: a rollout to simulated devices and telemetry ingestion, TLS vs --insecure.

Run from the repository root (about 3 minutes for 1,000 devices on 2 cores):

    .venv/bin/python bench/tls.py                  # 1,000 devices
    .venv/bin/python bench/tls.py --devices 200    # a smoke run

Both modes run in this one process, one after the other, on the same
machine: `--insecure` first, then TLS (the default). Each gets a fresh
`edgefleet hub serve` with its managed Mosquitto (bench/harness.py), the
tiny ONNX model published as version 1 with its signed package, and the
devices enrolled over REST on one keep-alive connection (with TLS each
device also makes its key and a certificate request, and keeps the
certificate the hub issues and the hub's CA, as `agent run` does). One
`edgefleet sim` process then runs them all (real MQTT sessions, with TLS
client certificates on the managed broker's TLS listener; see bench/rollout.py
for what the simulator does and does not simulate).

Measured, per mode:

* enrollment: devices/s over REST (TLS: including the CSR and the issued
  certificate; this script's client, not the simulator's);
* connect: from the simulator's start until every device holds an MQTT
  session (its first status line): the TLS handshakes with certificates;
* rollout: POST /api/v1/rollouts (tiny:1, one wave at 100 %) until the
  rollout API says `completed`;
* telemetry: points stored per second while every device measures every
  INTERVAL s (two points a message), over WINDOW s after a warm-up, and the
  CPU seconds the hub and Mosquitto spent meanwhile, per 1,000 points.

The table gives each number for both modes and the ratio TLS / insecure
(for rates below 1 means TLS is slower, for times and CPU above 1 means it
costs more). The machine is shared: run it twice before believing a ratio
near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from subprocess import PIPE, Popen
from typing import Any

import httpx
import psutil
from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose agent.py would shadow the agent package
from agent.identity import CA_FILE, CERT_FILE, IDENTITY_FILE, KEY_FILE, Identity  # noqa: E402
from contract import signing, tls  # noqa: E402
from harness import EDGEFLEET, HubProcess, publish_version, start_hub  # noqa: E402
from packager.samples import make_onnx  # noqa: E402
from report import Row, print_table  # noqa: E402
from rollout import Simulator, status_every  # noqa: E402

MODEL = "tiny"
PLATFORM = "linux/arm64"
ENROLL_THREADS = 4
CONNECT_LIMIT_S = 300.0
ROLLOUT_LIMIT_S = 300.0
TELEMETRY_INTERVAL_S = 1.0
WARM_UP_S = 5.0
WINDOW_S = 15.0
POLL_S = 0.2


@dataclass
class Result:
    mode: str
    enroll_per_s: float
    connect_s: float
    rollout_s: float
    points_per_s: float
    hub_cpu_per_1k: float    # hub CPU seconds per 1,000 points stored
    broker_cpu_per_1k: float


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class Bench:
    def __init__(self, root: Path, hub: HubProcess, devices: int) -> None:
        self.root, self.hub, self.devices = root, hub, devices
        self.client = httpx.Client(base_url=hub.url, timeout=60, verify=hub.verify,
                                   headers={"Authorization": f"Bearer {hub.admin_token}"},
                                   limits=httpx.Limits(max_connections=ENROLL_THREADS + 1))
        self.sim: Simulator | None = None

    def status(self) -> dict[str, Any]:
        answer = self.client.get("/api/v1/fleet/status")
        answer.raise_for_status()
        return dict(answer.json())

    def enroll(self) -> float:
        """Enroll every device; devices/s."""
        answer = self.client.post("/api/v1/enrollment-tokens", json={"tags": {"bench": "tls"}})
        answer.raise_for_status()
        token = answer.json()["token"]
        start = time.monotonic()
        with ThreadPoolExecutor(ENROLL_THREADS) as pool:
            list(pool.map(lambda i: self._enroll_one(token, f"sim-{i:05d}"),
                          range(self.devices)))
        return self.devices / (time.monotonic() - start)

    def _enroll_one(self, token: str, name: str) -> None:
        key = signing.generate_private_key()
        secret, pin = tls.split_token(token)
        body = {"token": secret, "public_key": signing.public_key_pem(key), "name": name,
                "platform": PLATFORM}
        if pin is not None:
            body["csr"] = tls.build_csr(key)
        answer = self.client.post("/api/v1/enroll", json=body)
        answer.raise_for_status()
        got = answer.json()
        mqtt = got["mqtt"]
        identity = Identity(
            device_id=got["device"]["id"], name=name, hub_url=self.hub.url,
            device_token=got["device_token"], mqtt_url=mqtt["url"],
            mqtt_username=mqtt["username"], mqtt_password=mqtt.get("password", ""),
            hub_public_key=got["hub_public_key"], tls=pin is not None,
            mqtt_certificate="certificate" in mqtt)
        directory = self.root / "sim" / "devices" / name
        directory.mkdir(parents=True)
        # Plain writes: contract.files fsyncs every file, thousands of fsyncs here.
        files = {IDENTITY_FILE: json.dumps(asdict(identity))}
        if pin is not None:
            files[CA_FILE] = self.hub.ca_path.read_text()
            files[CERT_FILE] = mqtt["certificate"]
            files[KEY_FILE] = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()).decode()
        for file, text in files.items():
            (directory / file).write_text(text)
            (directory / file).chmod(0o600)

    def start_sim(self) -> float:
        """Start the simulator; seconds until every device is connected."""
        log_path = self.root / "sim.log"
        with open(log_path, "ab") as log:
            process = Popen(
                [*EDGEFLEET, "sim", "--devices", str(self.devices),
                 "--data-dir", str(self.root / "sim"), "--step-latency", "0.01",
                 "--telemetry-interval", str(TELEMETRY_INTERVAL_S), "--rps", "10",
                 "--json-status-every", str(status_every(self.devices))],
                stdout=PIPE, stderr=log, text=True)
        started = time.monotonic()
        self.sim = Simulator(self.devices, process, log_path)
        at, _ = self.sim.next_line(CONNECT_LIMIT_S)
        return at - started

    def rollout(self) -> float:
        start = time.monotonic()
        answer = self.client.post("/api/v1/rollouts", json={
            "model": MODEL, "version": 1, "target": {"bench": "tls"}, "waves": "100%"})
        answer.raise_for_status()
        rollout_id = answer.json()["id"]
        while True:
            time.sleep(POLL_S)
            shown = self.client.get(f"/api/v1/rollouts/{rollout_id}").json()
            if shown["state"] == "completed":
                return time.monotonic() - start
            if shown["state"] != "running" or time.monotonic() - start > ROLLOUT_LIMIT_S:
                raise RuntimeError(f"rollout {rollout_id} is {shown['state']}: "
                                   f"{shown['reason']}")

    def telemetry(self) -> tuple[float, float, float]:
        """Points stored per second over the window, and the hub's and the broker's CPU
        seconds per 1,000 of them."""
        hub = psutil.Process(self.hub.process.pid)
        broker = next(p for p in hub.children() if p.name() == "mosquitto")
        time.sleep(WARM_UP_S)
        points = self.status()["ingest"]["telemetry_points"]
        hub_cpu, broker_cpu, start = _cpu(hub), _cpu(broker), time.monotonic()
        time.sleep(WINDOW_S)
        stored = self.status()["ingest"]["telemetry_points"] - points
        seconds = time.monotonic() - start
        thousands = max(stored, 1) / 1000
        return (stored / seconds, (_cpu(hub) - hub_cpu) / thousands,
                (_cpu(broker) - broker_cpu) / thousands)

    def close(self) -> None:
        if self.sim is not None:
            self.sim.stop()
        self.client.close()


def run(root: Path, mode: str, devices: int) -> Result:
    print(f"{mode}: starting a hub, publishing, enrolling {devices:,} devices", file=sys.stderr)
    hub = start_hub(root / "hub", tls=mode == "tls")
    try:
        publish_version(hub, MODEL, make_onnx(root / "model" / "model.onnx"))
        bench = Bench(root, hub, devices)
        try:
            enroll = bench.enroll()
            print(f"{mode}: connecting", file=sys.stderr)
            connect = bench.start_sim()
            print(f"{mode}: rollout, then telemetry", file=sys.stderr)
            rollout = bench.rollout()
            points, hub_cpu, broker_cpu = bench.telemetry()
        finally:
            bench.close()
    finally:
        hub.stop()
    return Result(mode, enroll, connect, rollout, points, hub_cpu, broker_cpu)


def rows(plain: Result, secure: Result) -> list[Row]:
    def row(metric: str, field: str, unit: str, digits: int) -> Row:
        a, b = getattr(plain, field), getattr(secure, field)
        return Row(metric, f"{b:,.{digits}f} {unit}", f"{a:,.{digits}f} {unit}",
                   f"{b / a:.2f}x" if a else "n/a")

    return [
        row("enrollment", "enroll_per_s", "devices/s", 0),
        row("connect every device", "connect_s", "s", 1),
        row("rollout to every device", "rollout_s", "s", 1),
        row("telemetry stored", "points_per_s", "points/s", 0),
        row("hub CPU per 1,000 points", "hub_cpu_per_1k", "s", 3),
        row("Mosquitto CPU per 1,000 points", "broker_cpu_per_1k", "s", 3),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-tls-") as tmp:
        results = {}
        for mode in ("insecure", "tls"):
            (Path(tmp) / mode).mkdir()
            results[mode] = run(Path(tmp) / mode, mode, args.devices)
    print_table(rows(results["insecure"], results["tls"]),
                f"edgefleet TLS bench: {args.devices:,} simulated devices, managed Mosquitto, "
                f"telemetry every {TELEMETRY_INTERVAL_S:g} s",
                f"value: TLS (the default); baseline: --insecure; ratio TLS / insecure. "
                f"{os.cpu_count()} CPUs shared with other work, load average before: "
                f"{load_before:.1f}.")


if __name__ == "__main__":
    main()
