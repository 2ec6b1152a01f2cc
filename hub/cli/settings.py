"""The deployment settings options `deploy` and `rollout create` share, and how they show.

The hub checks the values (contract/settings.py, one line naming the option's field);
here they only become the REST body's `resources` and `batching`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from contract.settings import GPU

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = (
    click.option("--cpus", help="CPU cores each version may use (0.5, 2, 500m): the container's "
                 "limit, the pod's request and limit [default: the agent's]."),
    click.option("--memory", help="Memory each version may use (512Mi, 2Gi, bytes) "
                 "[default: the agent's]."),
    click.option("--gpus", type=int, help=f"NVIDIA GPUs each version gets ({GPU}); 0 for none."),
    click.option("--accelerator", "accelerators", multiple=True, metavar="NAME=COUNT",
                 help="An extended resource and its count, e.g. gpu.intel.com/i915=1 "
                 "(Kubernetes; repeat for more)."),
    click.option("--batch-size", type=int,
                 help="Adaptive batching: merge concurrent requests into runtime calls of up "
                 "to this many rows (the model needs a free batch dimension); 1 turns it off "
                 "[default: the package's, else off]."),
    click.option("--batch-delay-ms", type=int,
                 help="With --batch-size: how long a batch's first request waits for more."),
)


def settings_options(command: F) -> F:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def settings_body(*, cpus: str | None, memory: str | None, gpus: int | None,
                  accelerators: tuple[str, ...], batch_size: int | None,
                  batch_delay_ms: int | None) -> dict[str, Any]:
    """The options as the REST body's `resources` and `batching` (only what was given)."""
    if batch_delay_ms is not None and batch_size is None:
        raise click.UsageError("--batch-delay-ms is about --batch-size; add one")
    counts: dict[str, Any] = {}
    for text in accelerators:
        name, sep, count = text.partition("=")
        if not sep:
            raise click.BadParameter(f"{text!r}: use NAME=COUNT", param_hint="--accelerator")
        counts[name] = int(count) if count.isascii() and count.isdigit() else count
    if gpus is not None:
        counts[GPU] = gpus
    resources: dict[str, Any] = {k: v for k, v in (("cpus", cpus), ("memory", memory))
                                 if v is not None}
    if counts:
        resources["accelerators"] = counts
    body: dict[str, Any] = {}
    if resources:
        body["resources"] = resources
    if batch_size is not None:
        body["batching"] = "off" if batch_size == 1 and not batch_delay_ms else {
            "max_batch_size": batch_size, "max_delay_ms": batch_delay_ms or 0}
    return body


def settings_text(record: dict[str, Any]) -> str:
    """A record's settings in a few words: "cpus 0.5, memory 512Mi, batching 32 rows/2 ms"."""
    resources = record.get("resources") or {}
    parts = [f"{k} {resources[k]}" for k in ("cpus", "memory") if k in resources]
    parts += [f"{name}={count}" for name, count in (resources.get("accelerators") or {}).items()]
    batching = record.get("batching")
    if batching == "off":
        parts.append("batching off")
    elif batching:
        parts.append(f"batching {batching['max_batch_size']} rows/{batching['max_delay_ms']} ms")
    return ", ".join(parts)
