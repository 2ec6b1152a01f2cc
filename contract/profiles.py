"""A model profile: what `edgefleet model profile` measures on one machine and the hub stores
with the version. Stdlib only.

One row per (device class, runtime, device, variant, batch size):

    {"device_class": "linux/amd64", "runtime": "openvino", "device": "CPU",
     "variant": "default", "batch": 8, "iterations": 50, "p50_ms": 0.21, "p99_ms": 0.35,
     "throughput": 38000.0, "peak_rss_bytes": 61865984}

The device class is the machine's OCI platform (the `platform` every device reports), so
a rollout's latency budget compares a version's profile with its target devices by it.
`throughput` is rows per second at that batch size; `peak_rss_bytes` the resident-memory
high-water mark of the process that loaded the model and ran every batch up to this one
(agent/profiling.py runs each runtime and device in a process of its own).
"""

from __future__ import annotations

from typing import Final

from contract.errors import FormatError

MAX_BATCH: Final = 256
MAX_ITERATIONS: Final = 10_000
KEY: Final = ("device_class", "runtime", "device", "variant", "batch")
NUMBERS: Final = ("iterations", "p50_ms", "p99_ms", "throughput", "peak_rss_bytes")


def batch_sizes(largest: int) -> list[int]:
    """The batch sizes a profile measures up to LARGEST: the powers of two below it, then it
    (8 -> 1, 2, 4, 8; 6 -> 1, 2, 4, 6); FormatError outside 1..MAX_BATCH."""
    if not 1 <= largest <= MAX_BATCH:
        raise FormatError(f"the largest batch size must be from 1 to {MAX_BATCH}, not {largest}")
    sizes = [1 << n for n in range(largest.bit_length()) if 1 << n < largest]
    return [*sizes, largest]
