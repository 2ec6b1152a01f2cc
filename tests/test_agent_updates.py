"""The package store and the update state machine, in process, against a real hub's registry.

A package is built and signed here (packager, no PyPI) and pushed to a real
hub (tests/hubproc.py). `PackageStore` downloads, verifies, stages and
prunes it; `Updater` drives updates through their states with that store
and a serving control that records what it is asked (the serving process
itself is tested in test_serving_*.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import now
from agent.package_store import PackageStore, StageError
from agent.serving.body import DeploymentBody, build
from agent.state import AgentState, StateFile, Update
from agent.supervisor import ServingError
from agent.updates import SERVING_ATTEMPTS, Updater
from contract import signing
from contract.cosign import sign_package, signature_tag
from contract.oci import OCILayout
from contract.protocol import Package
from contract.protocol import UpdateState as S
from hubproc import HubProcess
from packager.distribution import Registry, push_layout
from packager_fixtures import build as build_package
from packager_fixtures import model_files

PLATFORM = "linux/amd64"
REPOSITORY = "models/unit"
BATCHING = {"max_batch_size": 32, "max_delay_ms": 0}


@dataclass(frozen=True)
class Pushed:
    packages: dict[int, Package]   # version -> package in the hub's registry
    key: ec.EllipticCurvePrivateKey
    hub: HubProcess

    def registry(self) -> Registry:
        return Registry(self.hub.url, self.hub.admin_token)


@pytest.fixture(scope="module")
def pushed(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    root = tmp_path_factory.mktemp("packages")
    key = signing.generate_private_key()
    files = model_files(root / "model")
    packages = {}
    with Registry(hub.url, hub.admin_token) as registry:
        for version in (1, 2):
            # Version 2's serving.json carries a batching default, as the packager writes one.
            result = build_package(root / f"layout-{version}", files, version=version,
                                   platforms=[PLATFORM, "linux/arm64"],
                                   batching=BATCHING if version == 2 else None)
            layout = OCILayout(root / f"layout-{version}")
            sign_package(layout, result.digest, key, REPOSITORY)
            push_layout(layout, registry, REPOSITORY, [result.tag, signature_tag(result.digest)])
            packages[version] = Package(REPOSITORY, result.digest, result.index.size)
    return Pushed(packages, key, hub)


def store(data: Path, key: ec.EllipticCurvePrivateKey) -> PackageStore:
    return PackageStore(data, platform=PLATFORM, public_key=lambda: key.public_key())


# ---- package store -------------------------------------------------------------------


def test_a_package_is_downloaded_verified_staged_and_pruned(pushed: Pushed, tmp_path: Path) -> None:
    packages = store(tmp_path, pushed.key)
    package = pushed.packages[1]
    with pushed.registry() as registry:
        index = packages.download(registry, package)
    assert index.digest == package.digest
    image = packages.verify(package)
    staged = packages.stage("d", 1, package, image)
    assert staged.directory == tmp_path / "versions" / "d" / f"1-{package.digest[7:19]}"
    assert (staged.model_dir / "model.onnx").is_file()
    assert (staged.model_dir / "assets" / "labels.txt").read_text() == "low\nhigh\n"
    assert (staged.entrypoint, staged.framework) == ("model.onnx", "onnx")
    assert staged.sample_request is not None and staged.sample_request["inputs"]
    assert packages.stage("d", 1, package, image) == staged  # staged once, found again

    packages.prune("d", {staged.directory})
    assert staged.directory.is_dir()
    kept = packages.prune_packages({package.digest})
    assert kept == 0
    freed = packages.prune_packages(set())
    assert freed > 0 and not packages.layout.refs()
    packages.prune("d", set())
    assert not staged.directory.exists()


def test_a_package_signed_by_another_key_is_refused(pushed: Pushed, tmp_path: Path) -> None:
    packages = store(tmp_path, signing.generate_private_key())
    with pushed.registry() as registry:
        packages.download(registry, pushed.packages[1])
    with pytest.raises(StageError, match=f"verification of {pushed.packages[1].digest} failed"):
        packages.verify(pushed.packages[1])


def test_a_package_the_registry_does_not_have_is_a_stage_error(pushed: Pushed,
                                                                tmp_path: Path) -> None:
    missing = Package(REPOSITORY, "sha256:" + "0" * 64, 100)
    with pushed.registry() as registry, pytest.raises(StageError, match="download of"):
        store(tmp_path, pushed.key).download(registry, missing)


# ---- updater ---------------------------------------------------------------------------


class EngineDown(ServingError):
    transient = True


@dataclass
class FakeServing:
    """A serving control that records each request; FAIL_SELF_TEST makes self-tests fail."""

    fail_self_test: set[str] = field(default_factory=set)
    down_for: int = 0  # puts that fail as a serving side that is down (container engine)
    puts: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    tested: list[str] = field(default_factory=list)

    def put(self, name: str, body: DeploymentBody) -> Any:
        if self.down_for:
            self.down_for -= 1
            raise EngineDown("cannot list containers: the engine is not running")
        sent = build(body)  # the body is checked exactly as on the way to the real process
        self.puts.append(sent)

        def described(version: dict[str, Any] | None) -> dict[str, Any] | None:
            return version and {"version": version["version"], "runtime": "onnxruntime",
                                "device": "CPU"}

        return {"deployment": {"primary": described(sent),
                               "candidate": described(sent.get("candidate"))}}

    def delete(self, name: str) -> Any:
        self.deleted.append(name)

    def self_test(self, name: str, version: str, sample: Mapping[str, Any]) -> Any:
        self.tested.append(version)
        if version in self.fail_self_test:
            raise ServingError(f"self-test of '{name}:{version}' failed: wrong answer")

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class Device:
    data: Path
    updater: Updater
    serving: FakeServing
    seen: list[str]  # the update's state at each report

    @property
    def state(self) -> AgentState:
        return self.updater.state


@pytest.fixture
def device(pushed: Pushed, tmp_path: Path) -> Iterator[Device]:
    state_file = StateFile(tmp_path)
    state = state_file.load()
    serving = FakeServing()
    seen: list[str] = []
    registry = pushed.registry()

    def report() -> None:
        seen.append(state.update.state if state.update else "idle")

    updater = Updater(state, state_file, store(tmp_path, pushed.key), lambda: registry,
                      serving, report, sleep=lambda seconds: None)
    yield Device(tmp_path, updater, serving, seen)
    registry.close()


def update(pushed: Pushed, version: int, *, role: str = "primary", traffic: int = 0,
           shadow: bool = False, state: S = S.DOWNLOADING) -> Update:
    package = pushed.packages[version]
    return Update(generation=1, deployment="d", model="diabetes", role=role, version=version,
                  repository=package.repository, digest=package.digest, size=package.size,
                  prefer=["onnxruntime:CPU"], state=str(state), since=now(), traffic=traffic,
                  shadow=shadow)


def test_a_first_version_goes_through_every_state_and_is_saved(pushed: Pushed,
                                                                device: Device) -> None:
    assert device.updater.run(update(pushed, 1))
    assert device.seen == ["downloading", "verifying", "staged", "starting", "self_test",
                           "serving", "idle"]
    assert device.serving.tested == ["1"]
    serving = device.state.serving["d"]
    assert serving.primary.version == 1 and serving.candidate is None
    body = device.serving.puts[-1]
    assert body["version"] == "1" and body["model_dir"] == serving.primary.directory + "/model"
    assert body["runtime"]["prefer"] == ["onnxruntime:CPU"]
    assert [(s["version"], s["state"], s["runtime"]) for s in device.state.statuses] == [
        (1, "serving", "onnxruntime")]
    saved = StateFile(device.data).load()  # what a restart would find
    assert saved.serving["d"].primary == serving.primary and saved.update is None


def test_a_version_is_reported_with_its_runtime_from_its_load_until_it_fails(
        pushed: Pushed, device: Device) -> None:
    """What starting loaded is reported in self_test and in serving before the switch; a
    failed version is not reported with one."""
    reports: list[list[tuple[int, str, str | None]]] = []
    device.updater.report = lambda: reports.append(
        [(s["version"], s["state"], s["runtime"]) for s in device.state.statuses])
    assert device.updater.run(update(pushed, 1))
    assert device.updater.run(update(pushed, 2))
    device.serving.fail_self_test.add("1")  # back to 1, whose self-test fails now
    assert not device.updater.run(update(pushed, 1))
    shown = [status for report in reports for status in report]
    assert {(v, st) for v, st, runtime in shown if runtime is None} == {
        (1, "downloading"), (1, "verifying"), (1, "staged"), (1, "starting"),
        (2, "downloading"), (2, "verifying"), (2, "staged"), (2, "starting"),
        (1, "failed"), (1, "rolling_back"), (1, "rolled_back")}
    assert (2, "serving", "onnxruntime") in shown and (1, "self_test", "onnxruntime") in shown


def test_the_packages_batching_default_goes_into_the_control_body(pushed: Pushed,
                                                                   device: Device) -> None:
    assert device.updater.run(update(pushed, 1))
    assert "batching" not in device.serving.puts[-1]  # no default in its serving.json: off
    assert device.updater.run(update(pushed, 2))
    assert device.serving.puts[-1]["version"] == "2"
    assert device.serving.puts[-1]["batching"] == BATCHING
    saved = StateFile(device.data).load()  # a restart sends the same body again
    assert saved.serving["d"].primary.package_batching == BATCHING


def test_a_shadow_candidate_is_sent_with_its_copy_rate(pushed: Pushed, device: Device) -> None:
    assert device.updater.run(update(pushed, 1))
    assert device.updater.run(update(pushed, 2, role="candidate", traffic=10, shadow=True))
    loading, switched = device.serving.puts[-2:]
    # loaded beside the primary with nothing routed to it, then given its share of copies
    assert (loading["candidate"]["version"], loading["traffic"], loading["shadow"]) == \
        ("2", 0, False)
    assert (switched["candidate"]["version"], switched["traffic"], switched["shadow"]) == \
        ("2", 10, True)
    serving = device.state.serving["d"]
    assert (serving.candidate and serving.candidate.version, serving.traffic, serving.shadow) \
        == (2, 10, True)


def test_a_failed_self_test_rolls_back_to_the_old_version(pushed: Pushed,
                                                          device: Device) -> None:
    assert device.updater.run(update(pushed, 1))
    device.serving.fail_self_test.add("2")
    device.seen.clear()
    assert not device.updater.run(update(pushed, 2))
    assert device.seen == ["downloading", "verifying", "staged", "starting", "self_test",
                           "failed", "rolling_back", "rolled_back", "idle"]
    assert device.state.serving["d"].primary.version == 1
    restored = device.serving.puts[-1]
    assert restored["version"] == "1" and "candidate" not in restored
    failed = [s for s in device.state.statuses if s["version"] == 2]
    assert failed[0]["state"] == "rolled_back"
    assert "self-test of 'd:2' failed" in failed[0]["error"]


def test_an_update_that_cannot_download_fails_and_leaves_nothing_serving(
        pushed: Pushed, device: Device) -> None:
    broken = update(pushed, 1)
    broken.digest = "sha256:" + "0" * 64
    assert not device.updater.run(broken)
    assert device.seen[-3:] == ["rolling_back", "rolled_back", "idle"]
    assert device.state.serving == {} and device.serving.deleted == ["d"]


def test_an_update_saved_in_self_test_resumes_at_starting(pushed: Pushed,
                                                          device: Device) -> None:
    # A crash during the self-test: the serving process is new after a restart,
    # so the version is loaded again before it is tested.
    first = update(pushed, 1)
    assert device.updater.run(first)
    staged = device.state.serving["d"].primary
    device.state.serving.clear()
    device.seen.clear()
    resumed = update(pushed, 1, state=S.SELF_TEST)
    resumed.staged = staged
    assert device.updater.run(resumed)
    assert device.seen == ["starting", "self_test", "serving", "idle"]


def test_the_state_file_holds_each_state_before_its_step_runs(pushed: Pushed,
                                                              device: Device) -> None:
    on_disk: list[str] = []
    device.updater.report = lambda: on_disk.append(
        json.loads((device.data / "state.json").read_text())["update"]["state"]
        if device.state.update else "idle")
    assert device.updater.run(update(pushed, 1))
    assert on_disk == ["downloading", "verifying", "staged", "starting", "self_test",
                       "serving", "idle"]


def test_a_serving_side_that_is_down_is_waited_for_in_its_state(pushed: Pushed,
                                                                device: Device) -> None:
    device.serving.down_for = 2
    waiting: list[str] = []
    device.updater.report = lambda: waiting.extend(
        s["error"] for s in device.state.statuses if (s["error"] or "").startswith("waiting"))
    assert device.updater.run(update(pushed, 1))
    assert waiting and "engine is not running" in waiting[0]
    assert device.state.serving["d"].primary.version == 1


def test_a_serving_side_down_for_too_long_rolls_the_update_back(pushed: Pushed,
                                                                device: Device) -> None:
    device.serving.down_for = 100
    assert not device.updater.run(update(pushed, 1))
    [status] = device.state.statuses
    assert status["state"] == "rolled_back" and "engine is not running" in status["error"]
    assert device.serving.down_for == 100 - SERVING_ATTEMPTS - 1
