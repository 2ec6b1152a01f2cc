"""The package build pipeline called in-process (no CLI subprocess) against a real hub:
download, prepare, build, push and sign, with its progress events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from agent.runtimes import run_on_cpu
from contract.signing import load_public_key
from contract.verify import verify_package
from hub.cli.client import HubClient
from hub.cli.config import Connection
from hub.cli.package_build import BuildEvent, BuildOptions, Stage, build_version
from hubproc import HubProcess
from modelgen import make_onnx
from packager.distribution import Registry, RemoteImage

ONE_PLATFORM = BuildOptions(platforms=("linux/amd64",))


@pytest.fixture(scope="module")
def hub_client(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubClient]:
    """A client of the hub, which holds pipe:1, a tiny ONNX model beside a labels file."""
    model = make_onnx(tmp_path_factory.mktemp("pipe") / "model.onnx")
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers) as api:
        refs = [{"path": path, "digest": api.post("/api/v1/blobs", content=data).json()["digest"]}
                for path, data in (("model.onnx", model.read_bytes()),
                                   ("assets/labels.txt", b"low\nhigh\n"))]
        api.post("/api/v1/models/pipe/versions", json={"files": refs}).raise_for_status()
    with HubClient(Connection(hub.url, hub.admin_token)) as client:
        yield client


def test_build_version_pushes_and_the_hub_signs(hub: HubProcess, hub_client: HubClient) -> None:
    events: list[BuildEvent] = []
    built = build_version(hub_client, "pipe", "latest", ONE_PLATFORM, run=run_on_cpu,
                          progress=events.append)
    assert (built.model, built.version, built.platforms) == ("pipe", 1, ("linux/amd64",))
    assert built.pushed == "models/pipe:1" and built.signature and built.layout is None
    # Stages in order, each reported at least once.
    order = [e.stage for i, e in enumerate(events) if i == 0 or events[i - 1].stage != e.stage]
    assert order == [Stage.DOWNLOAD, Stage.PREPARE, Stage.BUILD, Stage.PUSH, Stage.SIGN]
    downloads = {e.text: e.total for e in events if e.stage is Stage.DOWNLOAD}
    assert set(downloads) == {"download model.onnx", "download assets/labels.txt"}
    assert downloads["download assets/labels.txt"] == len(b"low\nhigh\n")
    pushes = [e for e in events if e.stage is Stage.PUSH]
    assert sum(e.advance for e in pushes) == pushes[0].total
    # What was pushed verifies with the hub's key, as an agent checks it.
    pem = hub_client.get("/api/v1/signing-key")["public_key"]
    with Registry(hub.url, hub.admin_token) as registry:
        source = RemoteImage(registry, "models/pipe")
        verified = verify_package(source, source.resolve("1"), public_key=load_public_key(pem))
    assert sorted(verified.images) == ["linux/amd64"]
    assert built.to_json()["pushed"] == "models/pipe:1"


def test_build_version_to_a_layout_pushes_nothing(
    hub_client: HubClient, tmp_path: Path
) -> None:
    events: list[BuildEvent] = []
    built = build_version(hub_client, "pipe", "1", ONE_PLATFORM, run=run_on_cpu,
                          out=tmp_path / "layout", progress=events.append)
    assert built.layout == tmp_path / "layout" and (tmp_path / "layout" / "index.json").is_file()
    assert built.pushed is None and "pushed" not in built.to_json()
    assert {e.stage for e in events} == {Stage.DOWNLOAD, Stage.PREPARE, Stage.BUILD}


def test_build_version_errors_are_the_packagers(hub_client: HubClient) -> None:
    from contract.errors import PackageError

    with pytest.raises(PackageError, match="sparc"):
        build_version(hub_client, "pipe", "1", BuildOptions(platforms=("sparc",)),
                      run=run_on_cpu)


def test_a_package_never_changes_and_variants_keep_both(hub_client: HubClient) -> None:
    import click

    first = build_version(hub_client, "pipe", "1", ONE_PLATFORM, run=run_on_cpu)
    # The same inputs again: nothing is built or pushed, and the digest is the same.
    events: list[BuildEvent] = []
    again = build_version(hub_client, "pipe", "1", ONE_PLATFORM, run=run_on_cpu,
                          progress=events.append)
    assert again.unchanged and again.digest == first.digest and not events
    # Other inputs under the same name: refused by the hub before any work, naming the way.
    two = BuildOptions(platforms=("linux/amd64", "linux/arm64"))
    events.clear()
    with pytest.raises(click.ClickException) as refused:
        build_version(hub_client, "pipe", "1", two, run=run_on_cpu, progress=events.append)
    assert "pipe:1 already has a package" in refused.value.message
    assert "--variant NAME" in refused.value.message and "[HTTP 409]" in refused.value.message
    assert not events
    # Under a variant name of its own, both packages stay.
    both = build_version(hub_client, "pipe", "1", replace(two, variant="two"), run=run_on_cpu)
    assert both.pushed == "models/pipe:1-two" and both.digest != first.digest
    listed = hub_client.get("/api/v1/packages", params={"model": "pipe"})
    assert {(p["variant"], p["digest"], p["signed"]) for p in listed} >= {
        ("default", first.digest, True), ("two", both.digest, True)}
    assert hub_client.get("/api/v1/packages/pipe/1")["digest"] == first.digest
    # The push of a dozen requests is one row of the audit log, named by its tag.
    rows = [(a["action"], a["target"]) for a in hub_client.get("/api/v1/audit",
                                                               params={"limit": 1000})
            if "models/pipe" in a["target"] or "/v2/" in a["action"]]
    assert rows.count(("registry.push", "models/pipe:1-two")) == 1
    assert not [r for r in rows if r[0] != "registry.push"], rows


def test_a_platform_no_agent_runs_on_is_refused_before_any_work(hub_client: HubClient) -> None:
    from contract.errors import PackageError

    events: list[BuildEvent] = []
    with pytest.raises(PackageError, match="'windows/amd64' is not one an edgefleet agent"):
        build_version(hub_client, "pipe", "1",
                      BuildOptions(platforms=("linux/amd64", "windows/amd64"), variant="win"),
                      run=run_on_cpu, progress=events.append)
    assert not events


def test_the_batching_default_is_measured_off_or_given(hub_client: HubClient,
                                                       tmp_path: Path) -> None:
    from agent.runtimes import time_on_cpu

    def notes(options: BuildOptions, out: str) -> list[str]:
        built = build_version(hub_client, "pipe", "1", options, run=run_on_cpu,
                              timer=time_on_cpu, out=tmp_path / out)
        return [n for n in built.notes if n.startswith("batching")]

    # The tiny model: 32 rows cost about what one does.
    assert notes(ONE_PLATFORM, "auto")[0].startswith("batching: on by default (32 rows")
    assert notes(replace(ONE_PLATFORM, batching="off"), "off") == []
    assert notes(replace(ONE_PLATFORM, batching=8), "eight") == ["batching: on, 8 rows"]
    # A chosen setting is an input of the package; the default keeps the inputs as they were.
    assert "batching" not in ONE_PLATFORM.inputs("onnxruntime", {})
    assert replace(ONE_PLATFORM, batching="off").inputs("onnxruntime", {})["batching"] == "off"
