"""The Kubernetes control plane fixture: bench/kube.py's cluster, one per test session.

    from kube import kube_cluster  # noqa: F401  (the fixture)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.kube import (  # noqa: F401  (names the tests take from here)
    FakeNode,
    KubeAgentProcess,
    KubeCluster,
    MissingBinaries,
    apps_v1,
    core_v1,
    k8s_bin_dir,
    start_kube_agent,
    write_kubeconfig,
)


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    try:
        bin_dir = k8s_bin_dir()
    except MissingBinaries as e:
        pytest.fail(str(e), pytrace=False)
    cluster = KubeCluster(tmp_path_factory.mktemp("kube"), bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
