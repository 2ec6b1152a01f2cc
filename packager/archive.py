"""Writing a layout as an OCI archive (skopeo's oci-archive:), reproducibly.

Reading archives is the contract's (contract/oci.py `OCIArchive`); writing one
needs the packager's reproducible tar writer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from contract.oci import OCILayout
from packager.tarball import Entry, write_tar


def write_archive(layout: OCILayout, dest: Path, *, mtime: int = 0) -> None:
    """Write LAYOUT as an OCI archive at DEST: the same layout gives the same bytes.

    Only the layout's own files go in (oci-layout, index.json, blobs), not
    leftovers such as lock files or interrupted uploads.
    """
    entries = [
        Entry("oci-layout", layout.root / "oci-layout"),
        Entry("index.json", layout.root / "index.json"),
        *(Entry(f"blobs/sha256/{p.name}", p) for p in layout.blob_files()),
    ]
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write_tar(f, entries, mtime=mtime)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
