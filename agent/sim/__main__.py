"""`python -m agent.sim`: the same as `edgefleet sim`."""

from agent.sim.cli import sim

sim(prog_name="edgefleet sim")
