"""Real container engines for tests: Debian's podman and dockerd, each on a private socket.

`.ci/engines` starts them (host networking only, data under the session's
temp dir) and this module hands tests a docker SDK client per engine. The
`engine` fixture is parametrised over both, so a test using it runs on
podman and on dockerd. An engine that cannot start fails the test with the
script's reason: nothing is skipped.

Hubs the engines pull from listen on `engine_address()`, this machine's own
non-loopback address: dockerd treats every registry on 127.0.0.0/8 as
insecure (no certificate check) and cannot be told otherwise, and the tests
must show the engines check the hub's CA. The engines run without the test
run's SSL_CERT_FILE (.ci/engines), so they trust the hub only through the
certs.d file the agent installs; `forget_ca` removes those files.

Use: `from tests.engines import engine` in a test module.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker  # type: ignore[import-untyped]  # docker 7 ships no types
import pytest

from agent.container.trust import CERTS_DIRS

ENGINES = ("podman", "docker")
SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "engines"
START_TIMEOUT = 120


@dataclass(frozen=True)
class Engine:
    name: str  # "podman" or "docker"
    docker_host: str  # unix:///.../podman.sock
    client: docker.DockerClient

    def load(self, layout: Path, ref: str, name: str) -> None:
        """Copy image REF of the OCI layout LAYOUT into the engine as NAME (repo:tag).

        Through skopeo's docker-daemon transport, which both engines accept
        (dockerd 20.10 cannot load OCI archives itself).
        """
        done = subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-daemon-host", self.docker_host,
             f"oci:{layout}:{ref}", f"docker-daemon:{name}"],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"skopeo could not load {layout}:{ref} into {self.name}: {done.stderr}"
            )


def engine_address() -> str:
    """This machine's first global IPv4 address (the tests' hubs for engines listen on it)."""
    done = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                          capture_output=True, text=True, timeout=10, check=False)
    for line in done.stdout.splitlines():
        return line.split()[3].partition("/")[0]
    pytest.fail("this machine has no global IPv4 address for the engines to reach a hub "
                "whose certificate they check (dockerd does not check registries on "
                "loopback)", pytrace=False)


def forget_ca(registry: str) -> None:
    """Remove what the agent installed for the engines' pulls from REGISTRY (host:port)."""
    for root in CERTS_DIRS.values():
        shutil.rmtree(root / registry, ignore_errors=True)


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True,
        timeout=START_TIMEOUT, check=False,
    )


@pytest.fixture(scope="session", params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Engine]:
    name = request.param
    # Short paths: a unix socket path must fit in 108 bytes.
    directory = tmp_path_factory.mktemp(name)
    started = _script("start", name, str(directory))
    if started.returncode != 0:
        _script("stop", name, str(directory))
        pytest.fail(f"{name} did not start ({SCRIPT} start {name}): {started.stderr.strip()}",
                    pytrace=False)
    docker_host = started.stdout.strip().splitlines()[-1].removeprefix("DOCKER_HOST=")
    client = docker.DockerClient(base_url=docker_host, timeout=120)
    try:
        yield Engine(name, docker_host, client)
    finally:
        client.close()
        stopped = _script("stop", name, str(directory))
        assert stopped.returncode == 0, f"{name} did not stop: {stopped.stderr}"
