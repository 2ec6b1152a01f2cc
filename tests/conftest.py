"""Shared fixtures: a real hub process, an HTTP client for it, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hubapp import built_packages, hub_db, inproc  # noqa: F401 - in-process hub fixtures
from hubproc import EDGEFLEET, HubProcess, start_hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = start_hub(tmp_path_factory.mktemp("hub") / "data")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def api(hub: HubProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=hub.url, headers={"Authorization": f"Bearer {hub.admin_token}"}, timeout=30
    ) as client:
        yield client


class Cli:
    """Runs `edgefleet` as a user would, in its own process."""

    def __init__(self, hub: HubProcess, home: Path) -> None:
        self.env = {
            **os.environ,
            "EDGEFLEET_HUB": hub.url,
            "EDGEFLEET_TOKEN": hub.admin_token,
            "EDGEFLEET_CONFIG": str(home / "config.json"),
            "COLUMNS": "200",
        }

    def run(self, *args: str, ok: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None, input: str = "") -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*EDGEFLEET, *args], capture_output=True, text=True, timeout=300,
            env={**self.env, **(env or {})}, cwd=cwd, input=input,
        )
        if ok and done.returncode != 0:
            raise AssertionError(
                f"edgefleet {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json").stdout)


@pytest.fixture
def cli(hub: HubProcess, tmp_path: Path) -> Cli:
    return Cli(hub, tmp_path)
