"""`python -m agent.serving`: the serving process, as the agent starts it."""

from agent.serving.cli import serve

serve()
