"""Real container engines for tests: Debian's podman and dockerd, each on a private socket.

`.ci/engines` starts them (host networking only, data under the session's
temp dir) and this module hands tests a docker SDK client per engine. The
`engine` fixture is parametrised over both, so a test using it runs on
podman and on dockerd. An engine that cannot start fails the test with the
script's reason: nothing is skipped.

Use: `from tests.engines import engine` in a test module.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker  # type: ignore[import-untyped]  # docker 7 ships no types
import pytest

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
