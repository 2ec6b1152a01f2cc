"""What makes a package image runnable: edgefleet's serving code and what it imports.

A runnable image (container mode) is, bottom-up: a base with Python 3.11,
**deps** (the runtime's wheels plus `SERVE_REQUIREMENTS`, for the image's
platform), **edgefleet** (this layer), model and serving. The edgefleet
layer holds the packager's own copy of the packages `edgefleet serve`
imports, under /opt/edgefleet/python (the image's PYTHONPATH), and
/usr/local/bin/edgefleet, a launcher that runs only `edgefleet serve`: the
image needs no hub, no MQTT and no CLI. It is pure Python, so one blob
serves every platform, and it changes only when edgefleet does.

Its bytes depend only on the code (tars from `packager.tarball`, gzip with
mtime 0): the same edgefleet gives the same layer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from packager.layers import PYTHON_DIR, Layer, write_layer
from packager.oci import OCILayout
from packager.tarball import EXEC_MODE, Entry, tree_entries

APP = "edgefleet"  # the layer's role
# What `edgefleet serve` imports besides the runtime's own requirements (kept in step with
# pyproject.toml's agent extra by tests/test_packager_image.py).
SERVE_REQUIREMENTS = (
    "click>=8.1", "fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6", "flatbuffers>=24",
)
# Our top-level packages the serving process imports (contract: once issue 10 lands).
_PACKAGES = ("agent", "contract", "packager")
LAUNCHER = "usr/local/bin/edgefleet"
_LAUNCHER = b'''#!/usr/bin/env python3
"""edgefleet in a package image: only the serving process, `edgefleet serve [OPTIONS]`."""
import sys

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


def app_layer(layout: OCILayout, *, mtime: int) -> Layer:
    return write_layer(layout, app_entries(), role=APP, compress=True, mtime=mtime)
