"""The layers a package adds on top of its base image, and where their files go.

A package image, bottom-up: the base image's layers, then

- **deps**: the runtime's Python packages for the platform, under
  /opt/edgefleet/python (the image's PYTHONPATH). gzip-compressed: wheels'
  contents shrink to about a third, and this layer is the one that differs
  per platform, so its bytes are the ones devices download most often.
- **model**: the registered model files under /opt/edgefleet/model/, at
  their registered relative names. An *uncompressed* tar: weights barely
  compress, every device would pay for decompressing them, and a tar of the
  same files is byte-identical on every platform, so it is stored and
  downloaded once and an agent can check it without unpacking anything.
- **serving**: /opt/edgefleet/serving.json. gzip-compressed, since a sample
  request for an image model is megabytes of repeated values.

The paths and roles are the contract's (contract/layers.py). Each layer
descriptor carries the annotation `dev.edgefleet.layer` naming its role, so
an agent in native mode fetches only the model and serving layers.

Reproducibility: tars come from `packager.tarball` (sorted, owner 0, fixed
modes, every mtime = SOURCE_DATE_EPOCH), and gzip streams have mtime 0, no
file name and a fixed level. The uncompressed model layer depends on nothing
but the files; a gzip layer also depends on the zlib version, so identical
gzip bytes are promised for one build host (zlib changes its output rarely).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from contract.layers import DEPS, MODEL, MODEL_DIR, PYTHON_DIR, ROLE, SERVING, SERVING_FILE
from contract.oci import LAYER_TAR, LAYER_TAR_GZIP, Descriptor, HashingWriter, OCILayout
from packager.tarball import Entry, check_relative_path, tree_entries, write_tar

# Level 6 is zlib's default trade-off; fixed because the level changes the bytes.
GZIP_LEVEL = 6


@dataclass(frozen=True)
class Layer:
    """A layer blob stored in a layout: its descriptor (with its role) and its diff_id."""

    descriptor: Descriptor
    diff_id: str

    @property
    def role(self) -> str | None:
        return self.descriptor.annotations.get(ROLE)


def model_layer(layout: OCILayout, files: Mapping[str, Path], *, mtime: int) -> Layer:
    """FILES (registered relative name -> file on disk) under /opt/edgefleet/model/."""
    entries = [
        Entry(f"{MODEL_DIR}/{check_relative_path(name)}", path) for name, path in files.items()
    ]
    return write_layer(layout, entries, role=MODEL, compress=False, mtime=mtime)


def serving_layer(layout: OCILayout, serving_json: bytes, *, mtime: int) -> Layer:
    return write_layer(
        layout, [Entry(SERVING_FILE, serving_json)], role=SERVING, compress=True, mtime=mtime
    )


def deps_layer(layout: OCILayout, site_packages: Path, *, mtime: int) -> Layer:
    """The installed packages in SITE_PACKAGES under /opt/edgefleet/python."""
    entries = tree_entries(site_packages, PYTHON_DIR)
    return write_layer(layout, entries, role=DEPS, compress=True, mtime=mtime)


def write_layer(
    layout: OCILayout, entries: Iterable[Entry], *, role: str, compress: bool, mtime: int
) -> Layer:
    with layout.writer() as blob:
        if compress:
            # No file name and mtime 0 in the gzip header: both would vary between builds.
            with gzip.GzipFile(
                filename="",
                mode="wb",
                fileobj=cast(IO[bytes], blob),  # GzipFile only calls write() on it
                compresslevel=GZIP_LEVEL,
                mtime=0,
            ) as stream:
                tar = HashingWriter(stream)
                write_tar(tar, entries, mtime=mtime)
            diff_id = tar.digest
        else:
            write_tar(blob, entries, mtime=mtime)
            diff_id = blob.digest
    media_type = LAYER_TAR_GZIP if compress else LAYER_TAR
    return Layer(blob.descriptor(media_type, {ROLE: role}), diff_id)
