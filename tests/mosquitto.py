"""A real Mosquitto broker on a free loopback port (bench/harness.py's), and its fixture.

    from mosquitto import mosquitto  # noqa: F401  (the fixture)

    def test_x(mosquitto: Mosquitto) -> None:
        ... mosquitto.url ...
        mosquitto.stop(); mosquitto.start()   # "broker gone, then back"

The broker writes its config, persistence file and log into its own
directory. It keeps retained messages, persistent sessions and their queued
messages across stop()/start() (it saves them when SIGTERM stops it), unless
`start(fresh=True)` asks for a broker that has forgotten everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import Mosquitto, free_port, start_mosquitto

__all__ = ["Mosquitto", "free_port", "mosquitto", "start_mosquitto"]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()
