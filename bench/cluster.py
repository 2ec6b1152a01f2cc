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
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,50", help="comma-separated deployment counts")
    parser.add_argument("--timeout", type=float, default=300)
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
        print(f"{'deployments':>11}  {'step':<12}  {'apply s':>8}  {'complete s':>10}"
              f"  {'per deployment s':>16}")
        for n, step, applied, total in rows:
            print(f"{n:>11}  {step:<12}  {applied:>8.2f}  {total:>10.2f}  {total / n:>16.3f}")
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
