"""What a cluster offers, read from its API: the inventory a Kubernetes agent reports.

Counted over the nodes a pod could land on now (Ready and not cordoned):
their architectures (as OCI platforms, so rollouts match packages to clusters
as to devices), allocatable CPU and memory, and extended resources such as
`nvidia.com/gpu` or `gpu.intel.com/i915`. The node count also says how many
nodes there are in all. Reading nodes needs a cluster-wide `list nodes`; an
agent without it still reports the version and says why the rest is missing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from kubernetes import client
from kubernetes.utils import parse_quantity

from agent.kube.apply import KubeError, call_json

# Allocatable resources that are not accelerators: the built-in ones and their prefixes.
_BUILT_IN = ("cpu", "memory", "pods", "ephemeral-storage", "storage")
_BUILT_IN_PREFIXES = ("hugepages-", "attachable-volumes-", "kubernetes.io/", "requests.")


def _schedulable(node: Mapping[str, Any]) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _is_accelerator(resource: str) -> bool:
    if resource in _BUILT_IN or resource.startswith(_BUILT_IN_PREFIXES):
        return False
    domain = resource.split("/", 1)[0]
    return "/" in resource and not domain.endswith(".kubernetes.io")


def _platform(node: Mapping[str, Any]) -> str:
    info = (node.get("status") or {}).get("nodeInfo") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    os_name = info.get("operatingSystem") or labels.get("kubernetes.io/os") or "linux"
    arch = info.get("architecture") or labels.get("kubernetes.io/arch") or "unknown"
    return f"{os_name}/{arch}"


def summarize(nodes: Sequence[Mapping[str, Any]], version: Mapping[str, Any]) -> dict[str, Any]:
    """The cluster inventory (JSON-able) from its NODES and its /version document."""
    usable = [n for n in nodes if _schedulable(n)]
    cpu = Decimal(0)
    memory = Decimal(0)
    accelerators: dict[str, int] = {}
    for node in usable:
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        cpu += parse_quantity(allocatable.get("cpu", "0"))
        memory += parse_quantity(allocatable.get("memory", "0"))
        for resource, quantity in allocatable.items():
            if _is_accelerator(resource):
                count = int(parse_quantity(quantity))
                if count > 0:
                    accelerators[resource] = accelerators.get(resource, 0) + count
    return {
        "kind": "kubernetes",
        "kubernetes_version": str(version.get("gitVersion", "unknown")),
        "nodes": {"total": len(nodes), "schedulable": len(usable)},
        "platforms": sorted({_platform(n) for n in usable}),
        "cpu": {"allocatable_millicores": int(cpu * 1000)},
        "memory": {"allocatable_bytes": int(memory)},
        "accelerators": dict(sorted(accelerators.items())),
    }


def facts(inventory: Mapping[str, Any]) -> dict[str, int | float | str]:
    """The inventory as the flat facts a reported state carries (as agent.inventory.facts)."""
    values: dict[str, int | float | str] = {
        "kubernetes_version": inventory["kubernetes_version"][:128],
        "node_count": inventory["nodes"]["total"],
        "schedulable_nodes": inventory["nodes"]["schedulable"],
        "cpu_count": inventory["cpu"]["allocatable_millicores"] / 1000,
        "memory_mb": inventory["memory"]["allocatable_bytes"] // 2**20,
    }
    platforms = ",".join(inventory["platforms"])
    if platforms:
        values["platforms"] = platforms[:128]
    for resource, count in inventory["accelerators"].items():
        values[fact_name(resource)] = count
    return values


def fact_name(resource: str) -> str:
    """An extended resource as a reported fact's name ("nvidia.com/gpu" ->
    "accelerator.nvidia.com_gpu"): the protocol's value names have no / or -."""
    return ("accelerator." + re.sub(r"[^A-Za-z0-9_.]", "_", resource))[:64]


def read_inventory(api_client: client.ApiClient) -> dict[str, Any]:
    """Read the version and nodes from the API server; without permission to list nodes
    the inventory has the version only and `nodes_error` says why."""
    version = call_json("read the API server's version", client.VersionApi(api_client).get_code)
    try:
        nodes = call_json("list nodes", client.CoreV1Api(api_client).list_node)["items"]
    except KubeError as e:
        if e.status != 403:
            raise
        inventory = summarize([], version)
        inventory["nodes_error"] = str(e)
        return inventory
    return summarize(nodes, version)
