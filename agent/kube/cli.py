"""`edgefleet agent run --mode kubernetes`: enroll the cluster namespace, then exec the daemon."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def run_kubernetes(*, hub_url: str | None, token: str | None, data_dir: Path, name: str | None,
                   mqtt_url: str | None, telemetry_interval: float, verbose: bool,
                   pause_in: tuple[str, float] | None, kubeconfig: Path | None,
                   namespace: str | None, registry: str | None, api_key_secret: str,
                   pull_secret: str, replicas: int, cpu: str, memory: str,
                   progress_deadline: int, reconcile_interval: float) -> None:
    from agent import identity as identities
    from agent.identity import EnrollmentError
    from agent.kube.apply import KubeError
    from agent.kube.daemon import KubeOptions, api_client, cluster_platform
    from agent.kube.inventory import read_inventory
    from agent.kube.manifests import (
        ManifestError,
        Release,
        Resources,
        Target,
        Workload,
        deployment_manifest,
    )

    if namespace is None and kubeconfig is None and IN_CLUSTER_NAMESPACE.is_file():
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip()
    if not namespace:
        raise click.UsageError("--mode kubernetes needs --namespace (the namespace that is "
                               "the device)")
    if kubeconfig is not None and not kubeconfig.is_file():
        raise click.BadParameter(f"{kubeconfig} does not exist", param_hint="--kubeconfig")
    try:   # the builders' own checks, before enrolling rather than at the first update
        deployment_manifest(
            Target(namespace, "check", registry or "registry.check", api_key_secret,
                   pull_secret=pull_secret or None),
            Workload("check", Release("check", 1, "models/check", "sha256:" + "0" * 64),
                     ("linux/amd64",), replicas=replicas, resources=Resources(cpu, memory),
                     progress_deadline_seconds=progress_deadline))
    except ManifestError as exc:
        raise click.UsageError(str(exc)) from None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = identities.load(data_dir)
    if identity is None:
        if not hub_url or not token:
            raise click.UsageError(
                f"{data_dir} holds no identity yet: give --hub and --token-file (or --token) to "
                "enroll this cluster")
        try:
            with api_client(kubeconfig) as api:
                platform = cluster_platform(read_inventory(api))
        except KubeError as exc:
            raise click.ClickException(f"cannot read the cluster's inventory: {exc}; check "
                                       "--kubeconfig and that the API server is up") from None
        try:
            identity = identities.enroll(data_dir, hub_url=hub_url, token=token,
                                         name=name or f"kubernetes-{namespace}",
                                         platform=platform, mqtt_url=mqtt_url)
        except EnrollmentError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"Enrolled as {identity.device_id} ({identity.name})")
    hub = urlsplit(identity.hub_url)
    registry = registry or hub.netloc
    options = KubeOptions(
        data_dir=data_dir.absolute(), namespace=namespace, registry=registry,
        kubeconfig=kubeconfig.absolute() if kubeconfig else None, mqtt_url=mqtt_url,
        api_key_secret=api_key_secret, pull_secret=pull_secret or None, replicas=replicas,
        cpu=cpu, memory=memory, progress_deadline=progress_deadline,
        reconcile_interval=reconcile_interval,
        telemetry_interval=telemetry_interval, verbose=verbose, pause_in=pause_in)
    click.echo(f"Device {identity.device_id}: Kubernetes namespace {namespace}, images from "
               f"{registry}, hub {identity.hub_url}, broker {mqtt_url or identity.mqtt_url}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "agent.kube", options.to_json()])

