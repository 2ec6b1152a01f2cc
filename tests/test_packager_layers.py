"""Reproducible tars and layers: same files, same bytes, whatever the disk says about them."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from contract.errors import PackageError
from contract.layers import ROLE
from contract.oci import LAYER_TAR, LAYER_TAR_GZIP, OCILayout
from packager.layers import deps_layer, model_layer, serving_layer
from packager.tarball import Entry, check_relative_path, tree_entries, write_tar


def tar_bytes(entries: list[Entry], mtime: int = 7) -> bytes:
    sink = io.BytesIO()
    write_tar(sink, entries, mtime=mtime)
    return sink.getvalue()


def write_files(root: Path, *, mtime: int, mode: int) -> dict[str, Path]:
    files = {"model.onnx": b"\x08\x07weights" * 100, "sub/dir/vocab.txt": b"a\nb\n"}
    paths = {}
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
        paths[name] = path
    return paths


def test_same_files_give_the_same_tar_whatever_their_mtime_and_mode(tmp_path: Path) -> None:
    one = write_files(tmp_path / "one", mtime=1_000, mode=0o600)
    two = write_files(tmp_path / "two", mtime=2_000_000, mode=0o664)
    a = tar_bytes([Entry(f"opt/{name}", path) for name, path in one.items()])
    b = tar_bytes([Entry(f"opt/{name}", path) for name, path in reversed(two.items())])
    assert a == b


def test_tar_headers_are_normalised(tmp_path: Path) -> None:
    files = write_files(tmp_path, mtime=123, mode=0o600)
    data = tar_bytes([Entry(f"opt/edgefleet/model/{n}", p) for n, p in files.items()], mtime=42)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [(m.name, m.isdir()) for m in members] == [
        ("opt", True),
        ("opt/edgefleet", True),
        ("opt/edgefleet/model", True),
        ("opt/edgefleet/model/model.onnx", False),
        ("opt/edgefleet/model/sub", True),
        ("opt/edgefleet/model/sub/dir", True),
        ("opt/edgefleet/model/sub/dir/vocab.txt", False),
    ]
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 42)
        assert m.mode == (0o755 if m.isdir() else 0o644)
        assert m.pax_headers == {}


def test_long_and_unicode_names_use_pax_without_timestamps() -> None:
    name = "opt/" + "d" * 120 + "/modèle.onnx"
    data = tar_bytes([Entry(name, b"x")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember(name)
    assert member.pax_headers == {"path": name}
    assert data == tar_bytes([Entry(name, b"x")])


@pytest.mark.parametrize("name", ["", "/etc/passwd", "a/../b", "./a", "a//b", "a\\b", "a/"])
def test_unclean_names_are_refused(name: str) -> None:
    with pytest.raises(PackageError, match="not a clean relative path"):
        check_relative_path(name)


def test_clashing_entries_are_refused() -> None:
    with pytest.raises(PackageError, match="two files would be written to a"):
        tar_bytes([Entry("a", b"1"), Entry("a", b"2")])
    with pytest.raises(PackageError, match="a is both a file and a directory"):
        tar_bytes([Entry("a", b"1"), Entry("a/b", b"2")])


def test_tree_entries_keep_the_exec_bit_and_refuse_symlinks(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "lib.so").write_bytes(b"elf")
    (tmp_path / "pkg" / "lib.so").chmod(0o775)
    (tmp_path / "pkg" / "mod.py").write_text("")
    (tmp_path / "pkg" / "empty").mkdir()
    entries = tree_entries(tmp_path, "opt/python")
    assert [(e.path, e.mode) for e in entries] == [
        ("opt/python/pkg/lib.so", 0o755),
        ("opt/python/pkg/mod.py", 0o644),
    ]
    (tmp_path / "pkg" / "link").symlink_to("mod.py")
    with pytest.raises(PackageError, match="is not a regular file"):
        tree_entries(tmp_path, "opt/python")


def test_model_layer_is_a_plain_tar_whose_digest_is_its_diff_id(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "layout")
    files = write_files(tmp_path / "files", mtime=0, mode=0o644)
    layer = model_layer(layout, files, mtime=0)
    assert layer.descriptor.media_type == LAYER_TAR
    assert layer.descriptor.annotations == {ROLE: "model"}
    assert layer.diff_id == layer.descriptor.digest
    with tarfile.open(layout.blob_path(layer.descriptor.digest)) as tar:
        assert "opt/edgefleet/model/sub/dir/vocab.txt" in tar.getnames()


def test_gzip_layers_have_a_fixed_header_and_the_uncompressed_diff_id(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "layout")
    layer = serving_layer(layout, b'{"schema":"edgefleet.serving/v1"}', mtime=9)
    assert layer.descriptor.media_type == LAYER_TAR_GZIP
    blob = layout.get(layer.descriptor.digest)
    # Bytes 3..8 of a gzip header: flags (no file name) and mtime (zero).
    assert blob[3:8] == b"\x00\x00\x00\x00\x00"
    assert layer.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    again = serving_layer(layout, b'{"schema":"edgefleet.serving/v1"}', mtime=9)
    assert again == layer


def test_deps_layer_lays_the_tree_under_opt_edgefleet_python(tmp_path: Path) -> None:
    (tmp_path / "site" / "numpy").mkdir(parents=True)
    (tmp_path / "site" / "numpy" / "__init__.py").write_text("")
    layout = OCILayout.create(tmp_path / "layout")
    layer = deps_layer(layout, tmp_path / "site", mtime=0)
    assert layer.role == "deps"
    with tarfile.open(layout.blob_path(layer.descriptor.digest)) as tar:
        assert tar.getnames()[-1] == "opt/edgefleet/python/numpy/__init__.py"
