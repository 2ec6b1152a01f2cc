"""Benchmark container mode against native mode: time to serving, bytes per update, scoring latency.

Run from the repository root (engines and mmdebstrap: `bash .ci/engines install`):

    .venv/bin/python bench/container.py                    # podman, 20 MB model, ~2 min warm
    .venv/bin/python bench/container.py --engine docker
    .venv/bin/python bench/container.py --requests 2000    # steadier percentiles

A real hub (tests/hubproc.py) and a real engine (.ci/engines, private socket,
host networking) run in a temporary directory removed at the end. The model
is tests/modelgen.py's tiny ONNX model padded to --size-mb MB; version 2 has
other padding (new weights, same runtime). Both are built with `edgefleet
package build --image --platform linux/amd64` (Debian base and wheels from
~/.cache/edgefleet: the first run on a machine also builds those), pushed
and signed by the hub; a device is enrolled and its credentials are used.

* to serving: from the desired version to a loaded, self-tested model.
  Container: `verify_remote` (signature, manifest, config, serving layer),
  the engine's pull by digest, container start, control socket, load with
  self-test. Native (the baseline, same run): `PackageStore` download,
  verify, stage, a fresh `python -m agent.serving` (first version only),
  load with self-test. Version 1 pulls the whole image (base and deps are
  new to the engine); version 2 is a model-only update.
* pulled: bytes of the blobs version 2's image has that version 1's has not
  (what a device's engine downloads), against the model file's size; the
  target is the model layer plus a few kB.
* scoring: --requests sequential OIP requests to version 2, p50 and p95,
  through the container's port and through the native serving process.
* through the agent: two real agents (Mosquitto, the hub's desired states),
  one `--mode container` on the same engine (its images removed first, so
  version 1 pulls the whole image and version 2 the model layer), one
  native; from `edgefleet deploy` to the device's address answering with
  the new version (pull or download, verify, container start, load,
  self-test through the front, switch), and scoring p50 through each
  agent's one address (container mode adds the front's proxy hop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from rich.console import Console

BENCH = Path(__file__).resolve().parent
# bench/agent.py would shadow the agent package: this directory goes last.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]
sys.path.insert(0, str(BENCH.parent))
from agent.container.engine import ContainerEngine, Limits, RunSpec  # noqa: E402
from agent.container.images import VerifiedRef, verify_remote  # noqa: E402
from agent.package_store import PackageStore  # noqa: E402
from bench.harness import (  # noqa: E402
    EDGEFLEET,
    AgentProcess,
    HubProcess,
    free_port,
    start_agent,
    start_hub,
    start_mosquitto,
    wait_for,
)
from contract import signing  # noqa: E402
from contract.protocol import Package  # noqa: E402
from packager.distribution import Registry  # noqa: E402
from packager.samples import make_onnx  # noqa: E402
from report import Row, print_table  # noqa: E402

PLATFORM = "linux/amd64"
ENGINES = BENCH.parent / ".ci" / "engines"
API_KEY = "bench-key"
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}
T = TypeVar("T")
console = Console(stderr=True)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def control(socket_path: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)),
                        base_url="http://serving", timeout=120)


def wait_socket(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with control(path) as client:
                client.get("/control/state")
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no serving process answered on {path}") from None
            time.sleep(0.05)


def load(path: Path, body: dict[str, Any]) -> None:
    with control(path) as client:
        answer = client.put("/control/deployments/bench", json=body)
    if answer.status_code != 200:
        raise RuntimeError(f"load failed: {answer.text}")


def latencies(port: int, requests: int, api_key: str = API_KEY) -> list[float]:
    url = f"http://127.0.0.1:{port}/v2/models/bench/infer"
    samples = []
    with httpx.Client(headers={"Authorization": f"Bearer {api_key}"}) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.post(url, json=BODY).raise_for_status()
            samples.append(time.perf_counter() - started)
    return samples


@contextmanager
def engine(name: str, directory: Path) -> Iterator[ContainerEngine]:
    started = subprocess.run(["bash", str(ENGINES), "start", name, str(directory)],
                             capture_output=True, text=True, check=False)
    if started.returncode != 0:
        raise SystemExit(f"{name} did not start: {started.stderr.strip()}")
    driver = ContainerEngine.connect(started.stdout.strip().splitlines()[-1].split("=", 1)[1])
    try:
        yield driver
    finally:
        driver.close()
        subprocess.run(["bash", str(ENGINES), "stop", name, str(directory)], check=False)


def register_and_build(hub: HubProcess, scratch: Path, version: int, padding_mb: int) -> str:
    path = make_onnx(scratch / f"v{version}" / "model.onnx", padding_mb=padding_mb)
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers, timeout=300) as c:
        digest = c.post("/api/v1/blobs", content=path.read_bytes()).json()["digest"]
        c.post("/api/v1/models/bench/versions",
               json={"files": [{"path": "model.onnx", "digest": digest}]}).raise_for_status()
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
           "EDGEFLEET_CONFIG": str(scratch / "no-config.json")}
    done = subprocess.run([*EDGEFLEET, "package", "build", f"bench:{version}", "--image",
                           "--platform", PLATFORM, "--quiet", "--json"],
                          env=env, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"package build bench:{version} failed: {done.stderr.strip()}")
    return str(json.loads(done.stdout)["digest"])


def enroll(hub: HubProcess) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    token = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={}, headers=headers).json()
    return dict(httpx.post(f"{hub.url}/api/v1/enroll", json={
        "token": token["token"], "name": "bench-box", "platform": PLATFORM,
        "public_key": signing.public_key_pem(signing.generate_private_key()),
    }).json())


def image_blobs(registry: Registry, ref: VerifiedRef) -> dict[str, int]:
    """Digest -> size of the manifest, config and layers of REF's platform image."""
    descriptor, body = registry.manifest(ref.repository, ref.manifest)
    manifest = json.loads(body)
    blobs = {descriptor.digest: descriptor.size,
             manifest["config"]["digest"]: manifest["config"]["size"]}
    blobs.update({layer["digest"]: layer["size"] for layer in manifest["layers"]})
    return blobs


def answers(agent: AgentProcess, version: int) -> bool:
    try:
        answer = httpx.post(f"{agent.url}/v2/models/bench/infer", json=BODY, timeout=10,
                            headers={"Authorization": f"Bearer {agent.api_key}"})
    except httpx.TransportError:
        return False
    return answer.status_code == 200 and answer.json()["model_version"] == str(version)


def deploy_and_wait(hub: HubProcess, agent: AgentProcess, version: int) -> float:
    """Seconds from `edgefleet deploy bench:VERSION` to the agent's address answering with it."""
    env = {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token}
    started = time.perf_counter()
    subprocess.run([*EDGEFLEET, "deploy", f"bench:{version}", "--device", agent.device_id],
                   env=env, capture_output=True, check=True, timeout=60)
    wait_for(lambda: answers(agent, version), timeout=600, what=f"bench:{version} serving")
    return time.perf_counter() - started


def through_agents(hub: HubProcess, scratch: Path, docker_host: str, requests: int,
                   engine_name: str) -> list[Row]:
    """Desired state to serving, and scoring, through a container-mode and a native agent."""
    rows = []
    for mode in ("container", "native"):
        (scratch / f"agent-{mode}").mkdir()
    agents = {
        "container": start_agent(hub, scratch / "agent-container" / "data", extra_args=(
            "--mode", "container", "--docker-host", docker_host)),
        "native": start_agent(hub, scratch / "agent-native" / "data"),
    }
    try:
        for version in (1, 2):
            console.log(f"through the agents: version {version}")
            seconds = {mode: deploy_and_wait(hub, agent, version)
                       for mode, agent in agents.items()}
            label = "first version (whole image)" if version == 1 else "model-only update"
            rows.append(Row(f"desired state to serving, {label}, agent {engine_name}",
                            f"{seconds['container']:.2f} s", f"native {seconds['native']:.2f} s",
                            f"{seconds['container'] / seconds['native']:.1f}x"))
        p50 = {mode: statistics.median(latencies(agent.port, requests, agent.api_key))
               for mode, agent in agents.items()}
        rows.append(Row("scoring p50 through the agent's address",
                        f"container {p50['container'] * 1e3:.2f} ms",
                        f"native {p50['native'] * 1e3:.2f} ms",
                        f"{p50['container'] / p50['native']:.1f}x"))
    finally:
        for agent in agents.values():
            agent.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["podman", "docker"], default="podman")
    parser.add_argument("--size-mb", type=int, default=20, help="model size (default 20)")
    parser.add_argument("--requests", type=int, default=500, help="scoring requests (default 500)")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-container-") as tmp:
        scratch = Path(tmp)
        broker = start_mosquitto(scratch / "mosquitto")
        # Plain text: the engines pull from the hub without its CA in their trust store.
        hub = start_hub(scratch / "hub", tls=False, extra_args=("--mqtt-url", broker.url))
        serving = None
        try:
            console.log("registering and building two versions (--image)")
            digests = {v: register_and_build(hub, scratch, v, args.size_mb + v - 1) for v in (1, 2)}
            device = enroll(hub)
            key = signing.load_public_key(device["hub_public_key"])
            registry = Registry(hub.url, device["device_token"])
            store = PackageStore(scratch / "native", platform=PLATFORM, public_key=lambda: key)
            native_port = free_port()
            with engine(args.engine, scratch / "engine") as driver:
                refs, container = {}, {}
                for version in (1, 2):
                    console.log(f"container mode: version {version}")

                    def to_serving(version: int = version) -> RunSpec:
                        ref = verify_remote(registry, "models/bench", digests[version],
                                            platform=PLATFORM, public_key=key)
                        refs[version] = ref
                        image = driver.pull(hub.url.removeprefix("http://"), ref.repository,
                                            ref.manifest, ref.config,
                                            username=device["device"]["id"],
                                            password=device["device_token"])
                        spec = RunSpec(deployment="bench", version=version, package=ref.index,
                                       image=image, port=free_port(), api_key=API_KEY,
                                       control_dir=scratch / f"control-{version}",
                                       limits=Limits(cpus=2.0))
                        driver.run(spec)
                        driver.wait_control(spec)
                        load(spec.control_dir / "control.sock", ref.load_request(version))
                        return spec

                    container[version] = timed(to_serving)
                    console.log(f"native mode: version {version}")

                    def native(version: int = version) -> None:
                        nonlocal serving
                        package = Package("models/bench", digests[version], 0)
                        store.download(registry, package)
                        staged = store.stage("bench", version, package, store.verify(package))
                        socket_path = scratch / "native.sock"
                        if serving is None:
                            serving = subprocess.Popen(
                                [sys.executable, "-m", "agent.serving", "--port", str(native_port),
                                 "--control-socket", str(socket_path), "--api-key", API_KEY],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                            wait_socket(socket_path)
                        load(socket_path, {
                            "version": str(version), "model_dir": str(staged.model_dir),
                            "entrypoint": staged.entrypoint, "framework": staged.framework,
                            "self_test": staged.sample_request})

                    native_seconds, _ = timed(native)
                    label = "first version (whole image)" if version == 1 else "model-only update"
                    rows.append(Row(f"to serving, {label}, {args.engine}",
                                    f"{container[version][0]:.2f} s",
                                    f"native {native_seconds:.2f} s",
                                    f"{container[version][0] / native_seconds:.1f}x"))
                    if version == 1:
                        driver.stop(container[1][1].name, timeout=5)
                old, new = image_blobs(registry, refs[1]), image_blobs(registry, refs[2])
                pulled = sum(size for digest, size in new.items() if digest not in old)
                model_bytes = (scratch / "v2" / "model.onnx").stat().st_size
                rows.append(Row("pulled for the model-only update", f"{pulled / 1e6:.2f} MB",
                                f"model {model_bytes / 1e6:.2f} MB",
                                f"+{(pulled - model_bytes) / 1e3:.1f} kB over the model"))
                console.log("scoring")
                for name, port in (("container", container[2][1].port), ("native", native_port)):
                    samples = sorted(latencies(port, args.requests))
                    rows.append(Row(f"scoring p50 / p95, {name}",
                                    f"{statistics.median(samples) * 1e3:.2f} / "
                                    f"{samples[int(len(samples) * 0.95)] * 1e3:.2f} ms"))
                driver.stop(container[2][1].name, timeout=5)
                for ref in refs.values():  # so that the agent pulls as a new device would
                    driver.remove_image(ref.config)
                rows += through_agents(hub, scratch, f"unix://{driver.socket_path}",
                                       args.requests, args.engine)
            registry.close()
        finally:
            if serving is not None:
                serving.terminate()
                serving.wait(30)
            hub.stop()
            broker.stop()
    print_table(rows, f"container mode ({args.engine}) against native mode")


if __name__ == "__main__":
    main()
