"""Benchmark Kubernetes mode: desired workload -> Deployments applied and rolled out.

Run from the repository root after `.ci/k8s-tools` (about 1 minute on 2 cores):

    .venv/bin/python bench/cluster.py                  # 1 and 50 deployments
    .venv/bin/python bench/cluster.py --sizes 1,10,100

A real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) with two kwok nodes of 64 CPUs each runs on loopback in a temporary
directory (tests/kube.py), removed at the end. For each size N, in a fresh
namespace:

* "first deploy": N workloads applied (Deployment + Service each, server-side
  apply, one at a time as the agent does) until every Deployment's rollout is
  complete, i.e. its pod scheduled and made Ready by kwok;
* "update": the same N moved to a new package digest (previous workload
  recorded), until every rollout is complete again: the new pod Ready and the
  old one gone.

"apply" is the time the agent spends in its API calls; "complete" is the
clock from the first apply to the last rollout seen complete, polled every
0.2 s (one read of each Deployment, its ReplicaSets and pods per poll, as
`Namespace.rollout` does). With kwok the pods cost nothing, so the numbers are
the control plane's and the agent's; "apply" is the agent's share.

With --agent, the same sizes again end to end: a hub, Mosquitto and the agent
process (`edgefleet agent run --mode kubernetes`, one per size and namespace);
N deployments of one signed package are posted to the hub's REST API, then
moved to a second version, each timed from the first POST to the hub showing
all N reported `serving` (polled every 0.2 s). That covers the desired state
over MQTT, the package check in the registry, the apply, the rollout followed
(every 1 s) and the reported state back; the agent updates its deployments
one at a time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.kube.apply import Namespace  # noqa: E402
from agent.kube.manifests import Release, Target, Workload  # noqa: E402
from bench.kube import FakeNode, KubeCluster, core_v1, k8s_bin_dir  # noqa: E402

PLATFORMS = ("linux/amd64", "linux/arm64")
# Room for 100 pods of the default 250m CPU / 512 MiB on each node, twice over.
NODES = (FakeNode("kwok-amd64", "amd64", cpu="64", memory="128Gi"),
         FakeNode("kwok-arm64", "arm64", cpu="64", memory="128Gi"))


def workloads(n: int, version: int, previous: list[Workload] | None) -> list[Workload]:
    return [Workload(f"model-{i}", Release(f"model-{i}", version, f"models/model-{i}",
                                           f"sha256:{version:032x}{i:032x}"), PLATFORMS,
                     previous=previous[i] if previous else None) for i in range(n)]


def roll(ns: Namespace, batch: list[Workload], timeout: float) -> tuple[float, float]:
    """Apply BATCH and wait until every rollout is complete: (apply seconds, total seconds)."""
    start = time.perf_counter()
    for w in batch:
        ns.deploy(w)
    applied = time.perf_counter() - start
    pending = {w.object_name for w in batch}
    while pending:
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"{len(pending)} rollouts not complete in {timeout} s")
        for name in sorted(pending):
            status = ns.rollout(name)
            if status.failed:
                raise SystemExit(f"rollout failed: {status.message}")
            if status.done:
                pending.discard(name)
        if pending:
            time.sleep(0.2)
    return applied, time.perf_counter() - start


def through_agent(sizes: list[int], cluster: KubeCluster, api: object, directory: Path,
                  timeout: float) -> list[tuple[int, str, float]]:
    """Desired state -> every deployment reported serving, through the agent process."""
    from bench.harness import publish_version, start_hub, start_mosquitto
    from bench.kube import start_kube_agent
    from packager.samples import make_onnx

    broker = start_mosquitto(directory / "mosquitto")
    hub = start_hub(directory / "hub", extra_args=("--mqtt-url", broker.url))
    rows = []
    try:
        versions = []
        for n in (1, 2):
            (directory / f"model-{n}").mkdir()
            versions.append(publish_version(hub, "tiny", make_onnx(
                directory / f"model-{n}" / "model.onnx", batch=n)))
        headers = {"Authorization": f"Bearer {hub.admin_token}"}
        with httpx.Client(base_url=f"{hub.url}/api/v1", headers=headers, timeout=60) as http:
            for n in sizes:
                namespace = f"agent-{n}"
                core_v1(api).create_namespace({"metadata": {"name": namespace}})
                agent = start_kube_agent(hub, cluster.admin_kubeconfig, namespace,
                                         directory / f"agent-{n}", extra_args=(
                                             "--progress-deadline", "120"))
                try:
                    for step, version in (("first deploy", versions[0]),
                                          ("update", versions[1])):
                        started = time.perf_counter()
                        for i in range(n):
                            http.post(f"/devices/{agent.device_id}/deployments",
                                      json={"model": "tiny", "version": version,
                                            "name": f"m-{i}"}).raise_for_status()
                        while True:
                            rows_now = http.get(f"/devices/{agent.device_id}/deployments"
                                                ).json()["reported"]
                            done = {r["name"] for r in rows_now
                                    if r["version"] == version and r["state"] == "serving"}
                            if len(done) == n:
                                break
                            if time.perf_counter() - started > timeout:
                                raise SystemExit(f"{n - len(done)} of {n} not serving in "
                                                 f"{timeout} s:\n{agent.log()[-3000:]}")
                            time.sleep(0.2)
                        rows.append((n, step, time.perf_counter() - started))
                finally:
                    agent.stop()
                    core_v1(api).delete_namespace(namespace)
    finally:
        hub.stop()
        broker.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,50", help="comma-separated deployment counts")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--agent", action="store_true",
                        help="also time desired state -> serving through the agent process")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    directory = Path(tempfile.mkdtemp(prefix="bench-kube-"))
    cluster = KubeCluster(directory, k8s_bin_dir(), nodes=NODES)
    try:
        started = time.perf_counter()
        cluster.start()
        print(f"control plane up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        rows = []
        with cluster.admin_client() as api:
            for n in sizes:
                namespace = f"bench-{n}"
                core_v1(api).create_namespace({"metadata": {"name": namespace}})
                ns = Namespace(api, Target(namespace=namespace, agent="bench",
                                           registry="hub.test:5000", api_key_secret="key"))
                first = workloads(n, 1, None)
                rows.append((n, "first deploy", *roll(ns, first, args.timeout)))
                rows.append((n, "update", *roll(ns, workloads(n, 2, first), args.timeout)))
                core_v1(api).delete_namespace(namespace)
            agent_rows = through_agent(sizes, cluster, api, directory, args.timeout) \
                if args.agent else []
        print(f"{'deployments':>11}  {'step':<12}  {'apply s':>8}  {'complete s':>10}"
              f"  {'per deployment s':>16}")
        for n, step, applied, total in rows:
            print(f"{n:>11}  {step:<12}  {applied:>8.2f}  {total:>10.2f}  {total / n:>16.3f}")
        if agent_rows:
            print("\nthrough the agent: desired state posted -> all reported serving")
            print(f"{'deployments':>11}  {'step':<12}  {'serving s':>10}  {'per deployment s':>16}")
            for n, step, total in agent_rows:
                print(f"{n:>11}  {step:<12}  {total:>10.2f}  {total / n:>16.3f}")
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
