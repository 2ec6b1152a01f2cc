"""The agent's timestamps, as the protocol writes them.

A module of its own so that what stamps a refusal or a status (agent/daemon.py,
agent/updates.py, agent/kube/daemon.py) does not load the update code for it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from contract.protocol import format_time


def now() -> str:
    return format_time(datetime.now(UTC))
