"""What makes a package image runnable: edgefleet's serving code and what it imports.

A runnable image (container mode) is, bottom-up: a base with Python 3.11,
**deps** (the runtime's wheels plus `SERVE_REQUIREMENTS`, for the image's
platform), **edgefleet** (this layer), model and serving. The edgefleet
layer holds the packager's own copy of the packages `edgefleet serve`
imports, under /opt/edgefleet/python (the image's PYTHONPATH), and
/usr/local/bin/edgefleet, a launcher that runs only `edgefleet serve`: the
image needs no hub, no MQTT and no CLI. It is pure Python, so one blob
serves every platform, and it changes only when edgefleet does.

Layers that do not depend on the model version (the base, deps and this
one) are written with mtime LAYER_EPOCH, not the package's SOURCE_DATE_EPOCH:
so every version built with the same wheels and edgefleet shares their
blobs, and a model-only update downloads the model layer and a few kB. The
deps layer (~50 MB of gzip, most of a warm build's time) is also kept in a
cache beside the wheels, keyed by its tree's files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from contract.canonical import canonical_json
from contract.errors import PackageError
from contract.layers import APP
from contract.oci import Descriptor, OCILayout
from packager.layers import PYTHON_DIR, Layer, deps_layer, write_layer
from packager.tarball import EXEC_MODE, Entry, tree_entries

LAYER_EPOCH = 0
# What `edgefleet serve` imports besides the runtime's own requirements (kept in step with
# pyproject.toml's agent extra by tests/test_packager_image.py).
SERVE_REQUIREMENTS = (
    "click>=8.1", "fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6", "uvloop>=0.19",
    "orjson>=3.9",
)
# Our top-level packages the serving process imports (tests/test_imports.py keeps the agent
# off the packager's build side).
_PACKAGES = ("agent", "contract")
LAUNCHER = "usr/local/bin/edgefleet"
_LAUNCHER = b'''#!/usr/bin/env python3
"""edgefleet in a package image: only the serving process, `edgefleet serve [OPTIONS]`."""
import signal
import sys

# As a container's PID 1 this process ignores SIGTERM until it handles it: without this, a
# container stopped while still importing would wait for the engine's SIGKILL. The server
# installs its own graceful handler once it runs.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
if sys.argv[1:2] != ["serve"]:
    sys.exit("this image runs only `edgefleet serve`; see `edgefleet serve --help`")
from agent.serving.cli import serve

serve(sys.argv[2:], prog_name="edgefleet serve")
'''


def app_entries() -> list[Entry]:
    """The files of the edgefleet layer: our packages' sources and the launcher."""
    entries = [Entry(LAUNCHER, _LAUNCHER, EXEC_MODE)]
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        entries += [
            entry for entry in tree_entries(root, f"{PYTHON_DIR}/{name}")
            if "/__pycache__/" not in entry.path and not entry.path.endswith(".pyc")
        ]
    return entries


def app_layer(layout: OCILayout) -> Layer:
    return write_layer(layout, app_entries(), role=APP, compress=True, mtime=LAYER_EPOCH)


def default_layer_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgefleet" / "layers"


def cached_deps_layer(layout: OCILayout, tree: Path, cache_dir: Path) -> Layer:
    """`deps_layer` of TREE at LAYER_EPOCH, from CACHE_DIR when TREE's files were seen before."""
    cache = OCILayout.create(cache_dir)
    record = cache_dir / f"{_tree_key(tree)}.json"
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
            layer = Layer(Descriptor.from_dict(saved["descriptor"], what=str(record)),
                          str(saved["diff_id"]))
            layout.copy_from(cache, layer.descriptor, what=f"cached deps layer {record}")
            return layer
        except (OSError, ValueError, KeyError, PackageError):
            record.unlink(missing_ok=True)  # a broken cache entry is rebuilt, never trusted
    layer = deps_layer(cache, tree, mtime=LAYER_EPOCH)
    layout.copy_from(cache, layer.descriptor, what=f"deps layer of {tree}")
    partial = record.with_suffix(".tmp")
    partial.write_bytes(canonical_json(
        {"descriptor": layer.descriptor.to_dict(), "diff_id": layer.diff_id}))
    os.replace(partial, record)
    return layer


def _tree_key(tree: Path) -> str:
    """A hash of TREE's file names, sizes and modification times."""
    digest = hashlib.sha256(str(tree.resolve()).encode())
    for path in sorted(tree.rglob("*")):
        info = path.lstat()
        digest.update(f"{path.relative_to(tree)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return "deps-" + digest.hexdigest()[:32]
