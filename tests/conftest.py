"""Shared fixtures: a real hub process, a real Mosquitto, an HTTP client for the hub, and
the CLI.

Hubs run with TLS. One CA serves every hub of the run (bench/harness.py copies
it into each new data dir), and SSL_CERT_FILE names it beside the usual roots,
so the tests' own httpx calls and the CLI processes they start trust the hubs
as a user who ran `edgefleet login --ca` would.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import pytest

from firmwareimage import amd64_image, arm64_image, firmware_image  # noqa: F401 - shared images
from hub.pki import Authority
from hubapp import built_packages, hub_db, inproc  # noqa: F401 - in-process hub fixtures
from hubproc import EDGEFLEET, HubProcess, start_hub
from mosquitto import Mosquitto, start_mosquitto
from postgres import any_db, db_target, postgres_server, postgres_url  # noqa: F401 - both databases

_CA_DIRECTORY = pytest.StashKey[Path]()
# Modules about the managed broker's password logins, which exist only in plain text, and
# the container engines' pulls (the engines would need the run's CA in their own trust).
PLAIN_TEXT_MODULES = ("test_fleet_broker", "test_fleet_acl")


def pytest_configure(config: pytest.Config) -> None:
    if "EDGEFLEET_HARNESS_CA" in os.environ:  # a run inside a run (xdist, pytester)
        return
    directory = Path(tempfile.mkdtemp(prefix="edgefleet-test-ca-"))
    authority = Authority(directory)
    roots = [Path(certifi.where()), Path(ssl.get_default_verify_paths().openssl_cafile)]
    bundle = directory / "bundle.pem"
    bundle.write_text(authority.pem + "".join(p.read_text() for p in roots if p.is_file()))
    os.environ["EDGEFLEET_HARNESS_CA"] = str(directory)
    os.environ["SSL_CERT_FILE"] = str(bundle)
    config.stash[_CA_DIRECTORY] = directory


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_CA_DIRECTORY, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _plain_text_hubs(request: pytest.FixtureRequest) -> Iterator[None]:
    """The hubs of PLAIN_TEXT_MODULES run with --insecure."""
    if request.module.__name__.rpartition(".")[2] not in PLAIN_TEXT_MODULES:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_HARNESS_INSECURE", "1")
        yield


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = start_hub(tmp_path_factory.mktemp("hub") / "data")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A Mosquitto for the module, anyone may publish to it (an attacker holding broker
    credentials, where a test needs one)."""
    mosquitto = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield mosquitto
    mosquitto.stop()


@pytest.fixture(scope="module")
def broker_hub(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[HubProcess]:
    """A hub on the module's broker, which anyone may publish to: a test's forgeries reach
    the hub's devices as an attacker's would."""
    process = start_hub(tmp_path_factory.mktemp("hub") / "data",
                        extra_args=("--mqtt-url", broker.url))
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
