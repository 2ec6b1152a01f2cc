"""The hub process the tests start: bench/harness.py's, which the benchmarks use too.

Tests import these names from here, so that their imports name the test helper
modules only; the definitions live in the harness.
"""

from __future__ import annotations

from bench.harness import EDGEFLEET, HubProcess, free_port, start_hub, stop_process

__all__ = ["EDGEFLEET", "HubProcess", "free_port", "start_hub", "stop_process"]
