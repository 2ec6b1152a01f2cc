"""The agent itself as a multi-platform OCI image, for container hosts and the Kubernetes agent.

Built like a runnable model package (packager/build.py), from the same parts:
bottom-up, the Debian base (`packager.base`, mmdebstrap, cached), the agent's and
the runtimes' wheels for each platform (`packager.deps`, cached; one layer, cached
by its files), and edgefleet's own code: the packages `edgefleet agent run` imports
(agent, contract, the registry client and the command root), under
/opt/edgefleet/python. Every time stamp is the build's epoch, so the same sources
and wheels give the same index digest; it is signed like a package
(`contract.cosign.sign_package`, repository `edgefleet/agent`), so a device or a
cluster checks it with the hub's public key.

The image runs `edgefleet agent run --data-dir /var/lib/edgefleet --enrollment-file
/run/secrets/edgefleet-enrollment --serve-host 0.0.0.0`: mount the enrollment file
(`agent install`'s format) as a secret and a volume at /var/lib/edgefleet.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.canonical import canonical_json
from contract.cosign import sign_package
from contract.errors import PackageError
from contract.layers import APP, PYTHON_DIR
from contract.oci import CONFIG, INDEX, MANIFEST, Descriptor, OCILayout, Platform, open_image
from contract.runtimes import RUNTIMES
from packager.base import DebianBase
from packager.build import base_image_layers
from packager.deps import DepsProvider, PipDeps
from packager.image import cached_deps_layer, default_layer_cache
from packager.layers import Layer, write_layer
from packager.tarball import Entry, tree_entries

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

REPOSITORY = "edgefleet/agent"
STATE_DIR = "/var/lib/edgefleet"
ENROLLMENT_SECRET = "/run/secrets/edgefleet-enrollment"
# What `edgefleet agent run` imports besides the runtimes (pyproject.toml's core and agent
# extra; tests/test_agent_image.py keeps them in step).
AGENT_REQUIREMENTS = (
    "click>=8.1", "rich>=13", "httpx>=0.27", "cryptography>=42", "psutil>=5.9",
    "numpy>=1.26", "fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6", "uvloop>=0.19",
    "orjson>=3.9",
)
# Our code the agent runs: whole packages, and single modules of others.
_PACKAGES = ("agent", "contract")
_MODULES = ("edgefleet/__init__.py", "edgefleet/__main__.py", "edgefleet/cli.py",
            "packager/__init__.py", "packager/distribution.py")
Log = Callable[[str], None]


@dataclass(frozen=True)
class AgentImage:
    layout: Path
    tag: str
    index: Descriptor
    manifests: dict[str, Descriptor]


def requirements(runtimes: Sequence[str]) -> list[str]:
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise PackageError(f"unknown runtime {unknown[0]!r}; known: {', '.join(RUNTIMES)}")
    extra = sorted({req for r in runtimes for req in RUNTIMES[r].requirements})
    return sorted({*AGENT_REQUIREMENTS, *extra})


def app_entries() -> list[Entry]:
    """edgefleet's code the agent runs, under /opt/edgefleet/python."""
    root = _source_root()
    entries = []
    for name in _PACKAGES:
        entries += [e for e in tree_entries(root / name, f"{PYTHON_DIR}/{name}")
                    if "/__pycache__/" not in e.path and not e.path.endswith(".pyc")]
    entries += [Entry(f"{PYTHON_DIR}/{module}", root / module) for module in _MODULES]
    return sorted(entries, key=lambda e: e.path)


def build_agent_image(
    layout: Path, platforms: Sequence[str], *, runtimes: Sequence[str] = ("onnxruntime",),
    epoch: int = 0, tag: str = "latest", key: ec.EllipticCurvePrivateKey | None = None,
    debian: DebianBase | None = None, deps: DepsProvider | None = None,
    layer_cache: Path | None = None, log: Log = lambda _: None,
) -> AgentImage:
    """Build the agent image for PLATFORMS into LAYOUT, tagged TAG; signed with KEY if given."""
    targets = [Platform.parse(p) for p in platforms]
    if not targets:
        raise PackageError("no platforms given for the agent image")
    needs = requirements(runtimes)
    provider = deps or PipDeps()
    trees = {}
    for platform in targets:
        log(f"wheels for {platform}")
        trees[platform] = provider(needs, platform)
    log("Debian base image")
    base_root, base_ref = (debian or DebianBase())([str(p) for p in targets])
    store = OCILayout.create(layout)
    created = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    app = write_layer(store, app_entries(), role=APP, compress=True, mtime=epoch)
    manifests: dict[str, Descriptor] = {}
    with open_image(base_root) as base:
        for platform in targets:
            log(f"image for {platform}")
            base_layers, base_config = base_image_layers(store, base, base_ref, platform)
            deps_layer = cached_deps_layer(store, trees[platform],
                                           layer_cache or default_layer_cache())
            layers = [*base_layers, deps_layer, app]
            config = _config(base_config, platform, layers, created)
            manifests[str(platform)] = _put_manifest(store, config, layers, platform)
    index = store.put(canonical_json({
        "schemaVersion": 2, "mediaType": INDEX,
        "manifests": [d.to_dict() for d in manifests.values()],
    }), INDEX)
    store.tag(tag, index)
    if key is not None:
        sign_package(store, index.digest, key, REPOSITORY)
    return AgentImage(layout, tag, index, manifests)


def _config(base: dict[str, Any], platform: Platform, layers: Sequence[Layer],
            created: str) -> dict[str, Any]:
    run = dict(base.get("config") or {})
    env = [e for e in run.get("Env") or [] if not e.startswith("PYTHONPATH=")]
    env += [f"PYTHONPATH=/{PYTHON_DIR}", "PYTHONUNBUFFERED=1"]
    run.update(
        Env=env,
        Entrypoint=["python3", "-m", "edgefleet", "agent", "run"],
        Cmd=["--data-dir", STATE_DIR, "--enrollment-file", ENROLLMENT_SECRET,
             "--serve-host", "0.0.0.0"],
        ExposedPorts={"8500/tcp": {}},
        Volumes={STATE_DIR: {}},
        StopSignal="SIGTERM",
    )
    config = {k: v for k, v in base.items() if k != "variant"}
    config.update(platform.to_dict())
    config.update(
        created=created, config=run,
        rootfs={"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        history=[*(base.get("history") or []),
                 {"created": created, "created_by": "edgefleet agent image: deps layer"},
                 {"created": created, "created_by": "edgefleet agent image: edgefleet layer"}],
    )
    return config


def _put_manifest(store: OCILayout, config: dict[str, Any], layers: Sequence[Layer],
                  platform: Platform) -> Descriptor:
    config_descriptor = store.put(canonical_json(config), CONFIG)
    manifest = store.put(canonical_json({
        "schemaVersion": 2, "mediaType": MANIFEST, "config": config_descriptor.to_dict(),
        "layers": [layer.descriptor.to_dict() for layer in layers],
    }), MANIFEST)
    return Descriptor(manifest.media_type, manifest.digest, manifest.size, platform=platform)


def _source_root() -> Path:
    spec = importlib.util.find_spec("agent")
    if spec is None or not spec.submodule_search_locations:
        raise PackageError("edgefleet's agent package is not importable here")
    return Path(next(iter(spec.submodule_search_locations))).parent
