"""A fleet simulator: thousands of virtual devices in one process, speaking the real protocol.

Real enrollment, real MQTT sessions (agent/sim/mqtt_lite.py, asyncio), real
desired-state checks, reported states and telemetry; simulated downloads,
model loads and scoring. `edgefleet sim` runs one from the command line;
tests and benchmarks use `Fleet` directly.
"""

from agent.sim.device import SimDevice
from agent.sim.fleet import Fleet
from agent.sim.options import PerVersion, SimOptions

__all__ = ["Fleet", "PerVersion", "SimDevice", "SimOptions"]
