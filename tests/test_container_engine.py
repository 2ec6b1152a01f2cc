"""The agent's container driver on real podman and real dockerd, pulling from a real hub.

The package is built by `edgefleet package build --image` (Debian base, real
wheels), pushed to the hub and signed by it; the driver pulls it with a
device's own credentials after checking the signature. The hub serves TLS on
this machine's own address (tests/engines.py): the engines trust it only
through the CA the agent installs (`agent.container.trust`), and refuse it
with another CA.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.container.engine import (
    DEPLOYMENT,
    MANAGED,
    ContainerEngine,
    EngineError,
    Limits,
    RunSpec,
)
from agent.container.images import ImageCheckError, VerifiedRef, verify_remote
from agent.container.serving import ContainerError, ContainerServing
from agent.container.trust import RegistryTrust
from agent.container.watch import ContainerWatch
from agent.loading import version_body
from agent.mqtt import BackoffPolicy
from agent.serving.body import DeploymentBody
from agent.state import Installed
from agent.supervisor import ServingOptions, ServingProcess
from conftest import Cli
from contract import signing
from contract.settings import GPU, Batching, Resources, Settings
from engines import Engine, engine, engine_address, forget_ca  # noqa: F401  (fixture)
from hub.pki import Authority
from hubproc import HubProcess, free_port, start_hub
from modelgen import make_onnx
from packager.distribution import Registry

pytestmark = pytest.mark.slow
PLATFORM = "linux/amd64"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """A TLS hub on an address where both engines check its certificate."""
    process = start_hub(tmp_path_factory.mktemp("hub") / "data", address=engine_address())
    yield process
    forget_ca(registry(process))
    assert process.stop() == 0, process.log()


def registry(hub: HubProcess) -> str:
    return f"{hub.address}:{hub.port}"


@pytest.fixture(scope="module")
def package(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tiny:1 registered, built as a runnable image, pushed and signed by the hub."""
    path = make_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers) as c:
        digest = c.post("/api/v1/blobs", content=path.read_bytes()).json()["digest"]
        c.post("/api/v1/models/tiny/versions",
               json={"files": [{"path": "model.onnx", "digest": digest}]}).raise_for_status()
    cli = Cli(hub, tmp_path_factory.mktemp("home"))
    built = cli.json("package", "build", "tiny:1", "--image", "--platform", PLATFORM, "--quiet")
    assert isinstance(built, dict)
    return built


@pytest.fixture(scope="module")
def device(hub: HubProcess) -> dict[str, Any]:
    """A device's credentials and the hub key it pinned at enrollment."""
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    token = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={}, headers=headers).json()
    enrolled = httpx.post(f"{hub.url}/api/v1/enroll", json={
        "token": token["token"], "name": "box-1", "platform": PLATFORM,
        "public_key": signing.public_key_pem(signing.generate_private_key()),
    })
    assert enrolled.status_code == 201, enrolled.text
    return enrolled.json()


@pytest.fixture(scope="module")
def verified(hub: HubProcess, package: dict[str, Any], device: dict[str, Any]) -> VerifiedRef:
    with Registry(hub.url, device["device_token"]) as registry:
        return verify_remote(registry, "models/tiny", package["digest"], platform=PLATFORM,
                             public_key=signing.load_public_key(device["hub_public_key"]))


@pytest.fixture
def driver(engine: Engine) -> Iterator[ContainerEngine]:  # noqa: F811
    driver = ContainerEngine(engine.client)
    yield driver
    for leftover in driver.find():
        driver.stop(leftover.name, timeout=1)


def pull(driver: ContainerEngine, hub: HubProcess, device: dict[str, Any],
         verified: VerifiedRef, *, trust: bool = True) -> str:
    """The agent's pull: the hub's CA installed where the engine reads it, then the image."""
    if trust:
        RegistryTrust(hub.ca_path, registry(hub)).install(driver.describe()["engine"])
    return driver.pull(registry(hub), verified.repository, verified.manifest,
                       verified.config, username=device["device"]["id"],
                       password=device["device_token"])


def spec(image: str, verified: VerifiedRef, tmp_path: Path, **changes: Any) -> RunSpec:
    return replace(RunSpec(
        deployment="tiny", version=1, package=verified.index, image=image, port=free_port(),
        api_key="secret", control_dir=tmp_path / "control",
        limits=Limits(cpus=1.0, memory_bytes=512 * 1024 * 1024), restart_retries=2,
    ), **changes)


def load(run: RunSpec, verified: VerifiedRef) -> httpx.Response:
    """What the agent does next: load the version (and self-test it) through the control socket."""
    transport = httpx.HTTPTransport(uds=str(run.control_dir / "control.sock"))
    with httpx.Client(transport=transport, base_url="http://serving", timeout=60) as control:
        return control.put("/control/deployments/tiny", json=verified.load_request(run.version))


def test_a_signed_image_is_pulled_run_and_serves(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    image = pull(driver, hub, device, verified)
    assert image.removeprefix("sha256:") in verified.config
    run = spec(image, verified, tmp_path)
    started = driver.run(run)
    assert (started.deployment, started.version, started.package) == ("tiny", "1", verified.index)
    driver.wait_control(run)
    loaded = load(run, verified)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["self_test"]["1"]["outputs"][0]["shape"] == [1, 2]
    url = f"http://127.0.0.1:{run.port}/v2/models/tiny/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert httpx.post(url, json=body).status_code == 401
    answer = httpx.post(url, json=body, headers={"Authorization": "Bearer secret"})
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"

    attrs = driver.client.containers.get(run.name).attrs
    host = attrs["HostConfig"]
    assert host["NanoCpus"] == 1_000_000_000 and host["Memory"] == 512 * 1024 * 1024
    assert host["RestartPolicy"]["Name"] == "on-failure"
    # Bounded logs: dockerd shows max-size here; podman applies it (`podman inspect`: Size).
    assert host["LogConfig"]["Type"] == "json-file"
    assert attrs["Config"]["Labels"][MANAGED] == "1"
    assert attrs["Config"]["Labels"][DEPLOYMENT] == "tiny"
    [found] = driver.find("tiny")
    assert found.name == run.name and found.running and found.restarts == 0
    assert driver.find("other") == []
    usage = driver.usage(run.name)
    assert 10 * 1024 * 1024 < usage.memory_bytes < 512 * 1024 * 1024
    assert usage.memory_limit_bytes == 512 * 1024 * 1024
    assert "Scoring API" in driver.logs(run.name)
    assert driver.describe()["engine"] in ("podman", "docker")

    driver.stop(run.name)
    assert driver.find() == []


def test_the_engine_pulls_only_with_the_hubs_ca_installed(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    assert driver.remove_image(verified.config) is not None  # a pull that must reach the hub
    engine = driver.describe()["engine"]
    installed = RegistryTrust(hub.ca_path, registry(hub)).path(engine)
    assert installed is not None
    forget_ca(registry(hub))
    with pytest.raises(EngineError) as unknown:  # no CA for the hub: the system's roots only
        pull(driver, hub, device, verified, trust=False)
    assert "does not trust the hub's CA" in str(unknown.value) and not unknown.value.transient

    other = Authority(tmp_path / "other-ca")  # a CA of another hub, or an impostor's
    installed.parent.mkdir(parents=True)
    installed.write_bytes(other.paths.ca_cert.read_bytes())
    with pytest.raises(EngineError, match="does not trust the hub's CA"):
        pull(driver, hub, device, verified, trust=False)

    image = pull(driver, hub, device, verified)  # the agent puts the pinned CA back
    assert image.removeprefix("sha256:") in verified.config
    assert installed.read_bytes() == hub.ca_path.read_bytes()


def test_a_deployments_settings_are_its_containers_limits(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    """Settings from the signed desired state (as the agent stages them) become the engine's
    NanoCpus and Memory; the agent's own limits fill in what a deployment does not say; a
    version whose limits change gets a container of another name (started beside the old
    one, so the front can switch without dropping a request)."""
    image = pull(driver, hub, device, verified)
    front = ServingProcess(tmp_path, ServingOptions("127.0.0.1", free_port(), tmp_path / "key"))
    (tmp_path / "key").write_text("secret")
    serving = ContainerServing(front, driver, lambda name, version: None, data_dir=tmp_path,
                               api_key_file=tmp_path / "key",
                               limits=Limits(cpus=2.0, memory_bytes=256 * 2**20), gpus=True)
    settings = Settings(Resources(cpu_millis=500, memory_bytes=512 * 2**20,
                                  accelerators=((GPU, 0),)), Batching(32, 2))
    installed = Installed(version=1, digest=verified.index, directory=str(tmp_path),
                          entrypoint="model.onnx", framework="onnx", prefer=[], image=image,
                          settings=settings.to_json())
    own = serving.run_spec("tiny", installed, port=free_port())
    assert own.gpus == 0  # the deployment said none, though the agent would give them all
    driver.run(own)
    host = driver.client.containers.get(own.name).attrs["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["MemorySwap"]) == (
        500_000_000, 512 * 2**20, 512 * 2**20)
    assert not host.get("DeviceRequests")
    # Memory said, CPUs not: the agent's CPUs.
    memory_only = replace(installed, settings=Settings(Resources(
        memory_bytes=64 * 2**20, accelerators=((GPU, 0),))).to_json())
    mixed = serving.run_spec("tiny", memory_only, port=free_port())
    assert mixed.name != own.name
    driver.run(mixed)
    host = driver.client.containers.get(mixed.name).attrs["HostConfig"]
    assert (host["NanoCpus"], host["Memory"]) == (2_000_000_000, 64 * 2**20)
    assert sorted(c.name for c in driver.find("tiny")) == sorted([own.name, mixed.name])
    # Accelerators an engine cannot give are refused before anything runs, in one line.
    intel = replace(installed, settings=Settings(Resources(
        accelerators=(("gpu.intel.com/i915", 1),))).to_json())
    refusing = ContainerServing(front, driver, lambda name, version: intel, data_dir=tmp_path,
                                api_key_file=tmp_path / "key")
    with pytest.raises(ContainerError, match="NVIDIA GPUs \\(nvidia.com/gpu\\) only, not "
                       "gpu.intel.com/i915=1: deploy it to a Kubernetes target"):
        refusing.put("tiny", DeploymentBody(version_body(intel)))


def test_a_container_that_cannot_serve_reports_exit_code_and_log_lines(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    run = spec(pull(driver, hub, device, verified), verified, tmp_path, port=70000)
    driver.run(run)
    with pytest.raises(EngineError, match="exited with code 2") as failed:
        driver.wait_control(run, timeout=120)
    assert "70000" in str(failed.value)  # the serving process's own complaint, from its log
    status = driver.status(run.name)
    assert status.exit_code == 2 and status.restarts == 2


def test_a_package_signed_by_another_key_is_refused_before_any_pull(
        hub: HubProcess, package: dict[str, Any], device: dict[str, Any]) -> None:
    other = signing.generate_private_key().public_key()
    with Registry(hub.url, device["device_token"]) as registry:
        with pytest.raises(ImageCheckError, match="another key"):
            verify_remote(registry, "models/tiny", package["digest"], platform=PLATFORM,
                          public_key=other)
        with pytest.raises(ImageCheckError, match="no image for linux/arm64"):
            verify_remote(registry, "models/tiny", package["digest"], platform="linux/arm64",
                          public_key=signing.load_public_key(device["hub_public_key"]))


def test_an_image_that_is_not_the_signed_one_is_refused(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any],
        verified: VerifiedRef) -> None:
    forged = replace(verified, config="sha256:" + "0" * 64)
    with pytest.raises(EngineError, match="refusing to run it"):
        pull(driver, hub, device, forged)


def test_an_engine_that_is_down_is_a_transient_error(tmp_path: Path) -> None:
    down = ContainerEngine.connect(f"unix://{tmp_path}/none.sock", timeout=5)
    started = time.monotonic()
    with pytest.raises(EngineError) as failed:
        down.find()
    assert failed.value.transient and time.monotonic() - started < 10


def test_a_container_out_of_memory_is_reported_as_such(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    run = spec(pull(driver, hub, device, verified), verified, tmp_path, restart_retries=1,
               limits=Limits(memory_bytes=24 * 1024 * 1024))
    driver.run(run)
    with pytest.raises(EngineError, match="out of memory"):
        driver.wait_control(run, timeout=120)
    status = driver.status(run.name)
    assert status.exit_code == 137 and status.restarts == 1


def test_an_image_is_removed_once_no_container_uses_it(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    image = pull(driver, hub, device, verified)
    run = spec(image, verified, tmp_path)
    driver.run(run)
    driver.remove_image(image)  # in use: kept
    assert image in [i.id for i in driver.client.images.list()]
    driver.stop(run.name, timeout=1)
    driver.remove_image(image)
    assert image not in [i.id for i in driver.client.images.list()]


def test_after_a_restart_only_the_kept_containers_stay(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    image = pull(driver, hub, device, verified)
    old = spec(image, verified, tmp_path / "old", version=1)
    new = spec(image, verified, tmp_path / "new", version=2)
    driver.run(old)
    driver.run(new)
    # A fresh driver, as an agent restarted after a kill -9 makes, finds both by label.
    restarted = ContainerEngine(driver.client)
    assert [c.name for c in restarted.find("tiny")] == sorted([old.name, new.name])
    assert restarted.prune(keep={new.name}) == [old.name]
    assert [c.version for c in restarted.find()] == ["2"]


def test_a_watch_reports_an_engine_that_is_down_and_backs_off(tmp_path: Path) -> None:
    down = ContainerEngine.connect(f"unix://{tmp_path}/none.sock", timeout=5)
    front = ServingProcess(tmp_path, ServingOptions("127.0.0.1", free_port(), tmp_path / "key"))
    serving = ContainerServing(front, down, lambda name, version: None, data_dir=tmp_path,
                               api_key_file=tmp_path / "key")
    now = [0.0]
    watch = ContainerWatch(serving, clock=lambda: now[0],
                           policy=BackoffPolicy(initial=1.0, maximum=8.0, jitter=0.0))
    waits = []
    for _ in range(5):
        assert watch.check({"tiny": {"edgefleet-tiny-1-0123456789ab"}}) == {}
        started = now[0]
        while not watch.due():
            now[0] += 1
        waits.append(now[0] - started)
    assert waits == [1, 2, 4, 8, 8]
    facts = watch.facts()
    assert "not running" in facts["container_engine_error"] and "container_engine" not in facts


def test_gpus_are_asked_for_through_the_engines_device_requests(
        driver: ContainerEngine, hub: HubProcess, device: dict[str, Any], verified: VerifiedRef,
        tmp_path: Path) -> None:
    """A stand-in: this machine has no GPU and no NVIDIA container toolkit. dockerd refuses
    the request (no device driver has the `gpu` capability); podman's Docker API takes it
    and drops it, which the driver finds and refuses. Either way a GPU deployment never
    runs on the CPU unnoticed, and the error is one line naming why."""
    run = spec(pull(driver, hub, device, verified), verified, tmp_path, gpus=1)
    expected = "capabilities: \\[\\[gpu\\]\\]" if driver.describe()["engine"] == "docker" \
        else "dropped the GPU device request"
    with pytest.raises(EngineError, match=expected):
        driver.run(run)
    assert driver.find() == []
