"""An in-process hub for cheap tests: a real database (SQLite; a module may ask for both,
tests/postgres.py) and blob store in a temp dir,
real signed packages built by the packager, and `create_app` behind FastAPI's TestClient.

No MQTT and no agents: tests that need devices add their rows (`add_devices`) and say
what they report (`report`), the way the ingest would write it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from contract import oci
from hub import deployments, packages, registry, tokens
from hub.api.app import create_app
from hub.api.state import HubState
from hub.keys import KeyRing
from hub.oci_registry import Uploads
from hub.settings import HubSettings
from hub.storage.blobs import FileBlobStore
from hub.storage.db import Database, now
from modelgen import make_onnx
from packager.build import build_package
from packager.modelfile import inspect_model

with warnings.catch_warnings():
    # Starlette asks for its httpx2 fork here; the httpx the hub's clients use works alike.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

PLATFORMS = ("linux/amd64", "linux/arm64")


@dataclass
class InProcessHub:
    state: HubState
    client: TestClient
    built: dict[int, Path]
    notified: list[str] = field(default_factory=list)

    @property
    def db(self) -> Database:
        return self.state.db

    def notify(self, devices: Sequence[str] | object) -> None:
        """Stands in for the publisher: the devices whose desired state changed."""
        self.notified.extend(devices)  # type: ignore[arg-type]

    def add_devices(self, ids: Sequence[str], *, platform: str | None = "linux/amd64",
                    **tags: str) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO devices (id, name, tags, platform, status, desired_generation,"
                " applied_generation, published_generation, enrolled_at)"
                " VALUES (?, ?, ?, ?, 'online', 0, 0, 0, ?)",
                [(d, d, json.dumps(tags), platform, now()) for d in ids])

    def publish(self, model: str, version: int) -> None:
        """Register MODEL's next version (it must be VERSION) with a real package, signed."""
        layout = oci.OCILayout(self.built[version])
        source = self.built[version].parent / "model.onnx"
        writer = self.state.blobs.writer()
        writer.write(source.read_bytes())
        digest, _ = writer.commit()
        record = registry.register_version(self.db, self.state.blobs, name=model,
                                           files=[("model.onnx", digest)], created_by="test")
        assert record["version"] == version
        self.push(model, layout, str(version), str(version))
        self.sign(model, version)

    def push(self, model: str, layout: oci.OCILayout, ref: str, tag: str) -> str:
        """Put LAYOUT's package REF into the hub's repository of MODEL under TAG, as the
        registry's push does; returns the index digest."""
        repo = packages.RepoStore(self.db, self.state.blobs, packages.repository(model))
        index = layout.resolve(ref)
        for entry in oci.parse_index(layout.get(index.digest), what="index"):
            manifest = oci.parse_manifest(layout.get(entry.digest), what="manifest")
            for blob in (manifest.config, *manifest.layers):
                repo.put(layout.get(blob.digest), blob.media_type)
            repo.put(layout.get(entry.digest), entry.media_type)
        repo.tag(tag, repo.put(layout.get(index.digest), index.media_type))
        return index.digest

    def sign(self, model: str, version: int, variant: str = "default") -> None:
        packages.sign(self.db, self.state.blobs, self.state.signing_key, model, version,
                      reference=f"testserver/{packages.repository(model)}", variant=variant)

    def deploy(self, devices: Sequence[str], model: str, version: int, name: str) -> None:
        deployments.assign_many(self.db, devices, name=name, model=model, version=version)
        self.applied(devices)
        self.report(devices, name, model, version, "serving")

    def applied(self, devices: Sequence[str]) -> None:
        """The devices have applied their newest desired state."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE devices SET applied_generation = desired_generation"
                         " WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(devices),))

    def report(self, devices: Sequence[str], name: str, model: str, version: int, state: str,
               error: str | None = None) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO deployment_status (device_id, name, model, version, state, error,"
                " since, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id,"
                " name, version) DO UPDATE SET model = excluded.model, state = excluded.state,"
                " error = excluded.error, since = excluded.since,"
                " updated_at = excluded.updated_at",
                [(d, name, model, version, state, error, now(), now()) for d in devices])

    def telemetry(self, device: str, *, at: str | None = None, **metrics: object) -> None:
        with self.db.transaction() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM telemetry WHERE"
                               " device_id = ?", (device,)).fetchone()[0]
            conn.execute("INSERT INTO telemetry (device_id, seq, at, kind, metrics)"
                         " VALUES (?, ?, ?, 'inference', ?)",
                         (device, seq, at or now(), json.dumps(metrics)))


@pytest.fixture(scope="session")
def built_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Real packages of versions 1-4 of one tiny ONNX model, built once (no deps layer)."""
    base = tmp_path_factory.mktemp("packages")
    model = make_onnx(base / "model.onnx")
    info = inspect_model({"model.onnx": model})
    built = {}
    for version in (1, 2, 3, 4):
        layout = base / f"v{version}"
        build_package(layout, name="tiny", version=version, files={"model.onnx": model},
                      info=info, platforms=PLATFORMS, deps=None, source_date_epoch=1_700_000_000)
        built[version] = layout
    return built


@pytest.fixture
def hub_db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A fresh hub database in a temp file (WAL needs a file; it is still only SQLite), or
    with EDGEFLEET_TEST_DATABASE=postgresql a fresh database on the tests' PostgreSQL
    (tests/postgres.py): every in-process test on PostgreSQL."""
    if os.environ.get("EDGEFLEET_TEST_DATABASE") == "postgresql":
        return Database(request.getfixturevalue("postgres_url"))
    return Database(tmp_path / "hub.db")


def bare_state(tmp_path: Path, db: Database) -> HubState:
    """What the server hands the REST API, on DB and a blob store under TMP_PATH; no
    broker, fleet link or background threads."""
    settings = HubSettings(data_dir=tmp_path, port=0, mqtt_port=0)
    blobs = FileBlobStore(tmp_path / "blobs")
    return HubState(settings=settings, db=db, blobs=blobs,
                    keys=KeyRing(settings.signing_key_path), mqtt_url="", uploads=Uploads(blobs))


@pytest.fixture
def inproc(tmp_path: Path, hub_db: Database,
           built_packages: dict[int, Path]) -> Iterator[InProcessHub]:
    """The hub's REST API in process (create_app + TestClient as admin) on its own data."""
    state = bare_state(tmp_path, hub_db)
    _, secret = tokens.create(hub_db, name="admin", role="admin", created_by="test")
    with TestClient(create_app(state), headers={"Authorization": f"Bearer {secret}"}) as client:
        yield InProcessHub(state, client, built_packages)

