"""Immutable packages and their variants, in process: a package's tag never moves (409
naming what uses it), a version's variants are separate named packages that deployments
and rollouts name, a build is checked against the inputs recorded on the package, and
versions that deployments, rollouts or rollbacks still need cannot be deleted.

Real parts: the hub's SQLite database, real packages built by the packager and pushed
into the hub's registry, the REST API through `create_app` (tests/hubapp.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from contract import oci
from contract.canonical import canonical_json
from contract.errors import PackageError
from contract.layers import BUILD, VARIANT
from contract.names import package_tag, parse_package_tag
from contract.runtimes import check_platforms
from hub import deployments, packages
from hub.oci_registry import RegistryError
from hub.rollouts import reads
from hub.rollouts.engine import Engine
from hub.storage.db import SCHEMA_VERSION, Database
from hubapp import InProcessHub
from modelgen import make_onnx
from packager.build import build_package
from packager.modelfile import inspect_model
from postgres import as_older_hub_left_it

DEVICES = ["dev-a", "dev-b"]
INT8_INPUTS = {"runtime": "onnxruntime", "optimize": "int8", "platforms": ["linux/amd64"]}


@pytest.fixture(scope="module")
def amd64_only(tmp_path_factory: pytest.TempPathFactory) -> oci.OCILayout:
    """tiny:2 built for linux/amd64 only, recording its variant and inputs (as the build
    pipeline does): another package of the same version."""
    base = tmp_path_factory.mktemp("variant")
    model = make_onnx(base / "model.onnx")
    build_package(base / "layout", name="tiny", version=2, files={"model.onnx": model},
                  info=inspect_model({"model.onnx": model}), platforms=["linux/amd64"],
                  deps=None, source_date_epoch=1_700_000_000, tag="2-int8",
                  index_annotations={VARIANT: "int8",
                                     BUILD: canonical_json(INT8_INPUTS).decode()})
    return oci.OCILayout(base / "layout")


@pytest.fixture
def hub(inproc: InProcessHub, amd64_only: oci.OCILayout) -> InProcessHub:
    """tiny:1-3 (default variants) and tiny:2's int8 variant, all signed; two devices at
    site=lab serving tiny:1."""
    for version in (1, 2, 3):
        inproc.publish("tiny", version)
    inproc.push("tiny", amd64_only, "2-int8", "2-int8")
    inproc.sign("tiny", 2, "int8")
    inproc.add_devices(DEVICES, site="lab")
    inproc.deploy(DEVICES, "tiny", 1, "tiny")
    return inproc


def test_package_tags_name_a_version_and_a_variant() -> None:
    assert package_tag(2) == "2" and package_tag(2, "int8") == "2-int8"
    assert parse_package_tag("2") == (2, "default")
    assert parse_package_tag("12-int8-arm") == (12, "int8-arm")
    for other in ("sha256-" + "a" * 64 + ".sig", "latest", "02", "2-", "2-default", "2-Int8"):
        assert parse_package_tag(other) is None, other


def test_platforms_no_agent_runs_on_are_refused() -> None:
    check_platforms(["linux/amd64", "linux/arm64/v8", "linux/arm/v7"])
    with pytest.raises(PackageError, match="'windows/amd64' is not one an edgefleet agent "
                                           "runs on; use --platform with linux/amd64"):
        check_platforms(["linux/amd64", "windows/amd64"])


def test_a_package_tag_never_moves(hub: InProcessHub) -> None:
    layout = oci.OCILayout(hub.built[3])
    with pytest.raises(RegistryError) as refused:
        hub.push("tiny", layout, "3", "1")
    assert refused.value.status == 409
    assert refused.value.message.startswith("tiny:1 already has a package (sha256:")
    assert "a package never changes; it is used by deployment tiny on dev-a, dev-b" in \
        refused.value.message
    original = oci.OCILayout(hub.built[1]).resolve("1").digest
    assert packages.resolve_package(hub.db, "tiny", 1).digest == original
    # Through the registry's own API, as `docker push` or skopeo would.
    index = layout.resolve("3")
    put = hub.client.put("/v2/models/tiny/manifests/1", content=layout.get(index.digest),
                         headers={"Content-Type": index.media_type})
    assert put.status_code == 409
    assert "tiny:1 already has a package" in put.json()["errors"][0]["message"]
    # Pushing the same package again under its own tag is no change, so it is fine.
    assert hub.push("tiny", layout, "3", "3") == index.digest


def test_variants_are_separate_packages_that_deployments_name(hub: InProcessHub) -> None:
    listed = hub.client.get("/api/v1/packages", params={"model": "tiny"}).json()
    assert sorted((p["version"], p["variant"], len(p["platforms"])) for p in listed) == [
        (1, "default", 2), (2, "default", 2), (2, "int8", 1), (3, "default", 2)]
    shown = hub.client.get("/api/v1/packages/tiny/2", params={"variant": "int8"}).json()
    assert shown["build"] == INT8_INPUTS and shown["platforms"] == ["linux/amd64"]
    default = packages.resolve_package(hub.db, "tiny", 2)
    int8 = packages.resolve_package(hub.db, "tiny", 2, "int8")
    assert default.digest != int8.digest

    answer = hub.client.post("/api/v1/devices/dev-a/deployments",
                             json={"model": "tiny", "version": 2, "variant": "int8"})
    assert answer.status_code == 201, answer.text
    deployment = answer.json()["deployment"]
    assert (deployment["variant"], deployment["digest"]) == ("int8", int8.digest)
    # Without a variant, the default one; a variant the version lacks is a 404 naming those
    # it has and how to build it.
    plain = hub.client.post("/api/v1/devices/dev-b/deployments",
                            json={"model": "tiny", "version": 2}).json()["deployment"]
    assert (plain["variant"], plain["digest"]) == ("default", default.digest)
    missing = hub.client.post("/api/v1/devices/dev-b/deployments",
                              json={"model": "tiny", "version": 2, "variant": "fp16"})
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        "tiny:2 variant fp16 has no package yet (it has default, int8); build one with "
        "`edgefleet package build tiny:2 --variant fp16`")
    bad = hub.client.post("/api/v1/devices/dev-b/deployments",
                          json={"model": "tiny", "version": 2, "variant": "Int 8"})
    assert bad.status_code == 422 and "invalid variant name" in bad.json()["detail"]
    # What uses a package is named per variant.
    shown = hub.client.get("/api/v1/packages/tiny/2", params={"variant": "int8"}).json()
    assert shown["used_by"] == ["deployment tiny on dev-a"]


def test_a_rollout_ships_a_variant_and_its_rollback_restores_the_one_before(
        hub: InProcessHub) -> None:
    engine = Engine(hub.db, hub.notify, clock=lambda: datetime.now(UTC))
    deployments.assign(hub.db, "dev-a", name="tiny", model="tiny", version=2, variant="int8")
    answer = hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 3, "target": {"site": "lab"}})
    assert answer.status_code == 201, answer.text
    first = answer.json()["id"]
    engine.tick()
    desired = {d: deployments.for_device(hub.db, d)[0] for d in DEVICES}
    assert {d: (r["version"], r["variant"]) for d, r in desired.items()} == {
        "dev-a": (3, "default"), "dev-b": (3, "default")}
    device_rows = {d["device_id"]: d for d in reads.show(hub.db, first, devices=True)["devices"]}
    assert (device_rows["dev-a"]["previous_version"],
            device_rows["dev-a"]["previous_variant"]) == (2, "int8")
    rolled = hub.client.post(f"/api/v1/rollouts/{first}/rollback").json()
    assert rolled["state"] == "rolled_back"
    back = {d: deployments.for_device(hub.db, d)[0] for d in DEVICES}
    assert {d: (r["version"], r["variant"]) for d, r in back.items()} == {
        "dev-a": (2, "int8"), "dev-b": (1, "default")}
    assert back["dev-a"]["digest"] == packages.resolve_package(hub.db, "tiny", 2, "int8").digest

    # A rollout names its variant; the listing and show say which.
    second = hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 2, "variant": "int8", "target": {"site": "lab"}}).json()
    assert second["variant"] == "int8"
    engine.tick()
    assert {deployments.for_device(hub.db, d)[0]["variant"] for d in DEVICES} == {"int8"}
    unknown = hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 3, "variant": "int8", "target": {"site": "lab"}})
    assert unknown.status_code == 404 and "tiny:3 variant int8 has no package" in unknown.text


def test_a_build_is_checked_against_the_inputs_on_the_package(hub: InProcessHub) -> None:
    def check(variant: str, build: dict[str, Any]) -> Any:
        return hub.client.get("/api/v1/packages/tiny/2/check",
                              params={"variant": variant, "build": json.dumps(build)})

    int8 = packages.resolve_package(hub.db, "tiny", 2, "int8")
    same = check("int8", INT8_INPUTS)
    assert same.json() == {"exists": True, "digest": int8.digest, "signed": True}
    assert check("fp16", INT8_INPUTS).json() == {"exists": False}
    deployments.assign(hub.db, "dev-b", name="tiny", model="tiny", version=2, variant="int8")
    other = check("int8", {**INT8_INPUTS, "platforms": ["linux/amd64", "windows/amd64"]})
    assert other.status_code == 409
    assert other.json()["detail"] == (
        f"tiny:2 variant int8 already has a package ({int8.digest[:19]}...) built from other "
        "inputs, and a package never changes; it is used by deployment tiny on dev-b; build "
        "this one under another --variant NAME")
    # The default variant here was built without recorded inputs: any build differs.
    assert check("default", INT8_INPUTS).status_code == 409
    not_inputs = hub.client.get("/api/v1/packages/tiny/2/check",
                                params={"variant": "int8", "build": "[1]"})
    assert not_inputs.status_code == 422


def test_a_version_a_rollout_or_its_rollback_needs_cannot_be_deleted(hub: InProcessHub) -> None:
    engine = Engine(hub.db, hub.notify, clock=lambda: datetime.now(UTC))
    rollout_id = hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 3, "target": {"site": "lab"}, "soak": "1h"}).json()["id"]
    engine.tick()
    # tiny:1 runs nowhere now, but rolling back would give it back to both devices.
    refused = hub.client.delete("/api/v1/models/tiny/versions/1")
    assert refused.status_code == 409
    assert refused.json()["detail"] == (
        f"tiny:1 is still needed: rollout {rollout_id}'s rollback on dev-a, dev-b; deploy "
        "another version there, or let those rollouts end (`edgefleet rollout abort ID`, or "
        "roll them back) first")
    shipped = hub.client.delete("/api/v1/models/tiny/versions/3")
    assert shipped.status_code == 409
    assert f"rollout {rollout_id} (running)" in shipped.json()["detail"]
    assert "deployment tiny on dev-a, dev-b" in shipped.json()["detail"]
    # A version nothing needs goes.
    assert hub.client.delete("/api/v1/models/tiny/versions/2").status_code == 204
    # Once the rollout is over (aborted: its devices keep tiny:3), tiny:1 may go.
    hub.client.post(f"/api/v1/rollouts/{rollout_id}/abort").raise_for_status()
    assert hub.client.delete("/api/v1/models/tiny/versions/1").status_code == 204


def test_a_database_from_before_variants_is_migrated(tmp_path: Path,
                                                     hub: InProcessHub) -> None:
    as_older_hub_left_it(
        hub.db, 2, columns=(("deployments", "variant"), ("deployments", "candidate_variant"),
                            ("rollout_devices", "previous_variant"),
                            ("oci_repo_blobs", "linked_at"), ("deployments", "settings"),
                            ("rollout_devices", "previous_settings")),
        tables=("telemetry_rollups", "telemetry_rolled",  # schema 4
                "webhook_deliveries", "webhooks", "events",  # 6
                "model_profiles",  # 7
                "drift_baselines", "drift_sketches", "drift_results",  # 8
                "device_commands"))  # 9
    db = Database(hub.db.target)
    assert db.query_one("SELECT value FROM meta WHERE key = 'schema_version'") == {
        "value": str(SCHEMA_VERSION)}
    assert {d["variant"] for d in deployments.for_device(db, "dev-a")} == {"default"}
    assert {r["variant"] for r in db.query("SELECT variant FROM deployments")} == {"default"}
    # And it runs: a deployment of a variant on the migrated database.
    deployments.assign(db, "dev-a", name="tiny", model="tiny", version=2, variant="int8")
    assert deployments.for_device(db, "dev-a")[0]["variant"] == "int8"
    assert db.query_one("SELECT COUNT(*) AS n FROM oci_repo_blobs WHERE linked_at IS NULL")[
        "n"] > 0  # linked before the column: long ago, as collection takes it


def _blobs_of(layout: oci.OCILayout, ref: str) -> set[str]:
    """Every blob a package in LAYOUT holds: index, manifests, configs, layers."""
    index = layout.resolve(ref)
    found = {index.digest}
    for entry in oci.parse_index(layout.get(index.digest), what="index"):
        manifest = oci.parse_manifest(layout.get(entry.digest), what="manifest")
        found |= {entry.digest, manifest.config.digest, *(d.digest for d in manifest.layers)}
    return found


def test_deleting_a_version_collects_its_packages_but_spares_a_push_in_progress(
        hub: InProcessHub, amd64_only: oci.OCILayout) -> None:
    blobs = hub.state.blobs
    two = _blobs_of(oci.OCILayout(hub.built[2]), "2") | _blobs_of(amd64_only, "2-int8")
    kept = _blobs_of(oci.OCILayout(hub.built[1]), "1") | _blobs_of(oci.OCILayout(hub.built[3]),
                                                                  "3")
    only_two = two - kept
    assert only_two and two & kept  # versions share their model layer, not their index
    with hub.db.transaction() as conn:  # everything pushed so far, pushed long ago
        conn.execute("UPDATE oci_repo_blobs SET linked_at = '2020-01-01T00:00:00.000000Z'")
        conn.execute("UPDATE oci_manifests SET created_at = '2020-01-01T00:00:00.000000Z'")
    # A push in progress: its blob is linked, the manifest that will reach it not yet put.
    pushing = packages.RepoStore(hub.db, blobs, "models/tiny").put(b"layer of a push", "x")

    assert hub.client.delete("/api/v1/models/tiny/versions/2").status_code == 204
    assert not [d for d in only_two if blobs.exists(d)]
    assert all(blobs.exists(d) for d in kept)
    assert blobs.exists(pushing.digest)
    assert hub.db.query_one("SELECT 1 FROM oci_repo_blobs WHERE repo = 'models/tiny' AND"
                            " digest = ?", (pushing.digest,))
    tags = {r["tag"] for r in hub.db.query("SELECT tag FROM oci_tags WHERE repo = 'models/tiny'")}
    assert {parse_package_tag(t) for t in tags} - {None} == {(1, "default"), (3, "default")}
    assert len(tags) == 4  # tiny:1 and tiny:3 with one signature each
    listed = hub.client.get("/api/v1/packages", params={"model": "tiny"}).json()
    assert sorted(p["version"] for p in listed) == [1, 3]
    # What is left still serves: deployable, its every blob there.
    deployments.assign(hub.db, "dev-b", name="tiny", model="tiny", version=3)
    assert hub.client.get("/v2/models/tiny/manifests/3").status_code == 200


def test_the_dashboard_lists_every_variant_of_a_version(hub: InProcessHub) -> None:
    from hub.ui.session import COOKIE

    hub.client.cookies.set(COOKIE, hub.client.headers["Authorization"].removeprefix("Bearer "))
    page = hub.client.get("/ui/models/tiny")
    assert page.status_code == 200
    int8 = packages.resolve_package(hub.db, "tiny", 2, "int8").digest
    default = packages.resolve_package(hub.db, "tiny", 2).digest
    assert f"variant int8: <span class=\"mono\">{int8[:19]}" in page.text
    assert default[:19] in page.text
