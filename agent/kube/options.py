"""`edgefleet agent run`'s Kubernetes options (used with `--mode kubernetes` only).

Click only: a device's `agent run` imports this, never the kubernetes client.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = (
    click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path),
                 envvar="KUBECONFIG",
                 help="Kubernetes: the API server's kubeconfig [default: the pod's in-cluster "
                      "service account; env KUBECONFIG]."),
    click.option("--namespace", envvar="EDGEFLEET_KUBE_NAMESPACE",
                 help="Kubernetes: the namespace that is the device [env "
                      "EDGEFLEET_KUBE_NAMESPACE; in a pod: its own]."),
    click.option("--registry", envvar="EDGEFLEET_KUBE_REGISTRY",
                 help="Kubernetes: the hub's registry as the nodes reach it, HOST[:PORT] "
                      "[default: the hub URL's; env EDGEFLEET_KUBE_REGISTRY]."),
    click.option("--api-key-secret", envvar="EDGEFLEET_KUBE_API_KEY_SECRET",
                 default="edgefleet-scoring-key", show_default=True,
                 help="Kubernetes: the Secret (key api-key) with the serving pods' API key."),
    click.option("--pull-secret", envvar="EDGEFLEET_KUBE_PULL_SECRET",
                 default="edgefleet-registry", show_default=True,
                 help="Kubernetes: the image pull Secret the agent keeps with its registry "
                      "credentials ('' for none: the nodes pull anonymously)."),
    click.option("--replicas", type=click.IntRange(0, 1000), default=1, show_default=True,
                 help="Kubernetes: pods per deployment."),
    click.option("--cpu", default="250m", show_default=True,
                 help="Kubernetes: CPU request of each serving pod."),
    click.option("--memory", default="512Mi", show_default=True,
                 help="Kubernetes: memory request and limit of each serving pod."),
    click.option("--progress-deadline", type=click.IntRange(10, 86400), default=300,
                 show_default=True,
                 help="Kubernetes: seconds a rollout may make no progress before it is undone."),
    click.option("--reconcile-interval", type=click.FloatRange(1), default=60.0,
                 show_default=True,
                 help="Kubernetes: seconds between checks that bring hand edits back."),
)


def kube_options(command: F) -> F:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command
