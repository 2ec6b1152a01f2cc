"""The OCI format module: canonical JSON, digests, descriptors, layouts, archives, blob checks."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

import pytest

from contract.errors import BlobNotFound, FormatError, PackageError, RefNotFound, VerificationError
from contract.oci import (
    CONFIG,
    INDEX,
    LAYER_TAR,
    MANIFEST,
    REF_NAME,
    Descriptor,
    OCIArchive,
    OCILayout,
    Platform,
    canonical_json,
    check_digest,
    copy_blob,
    open_image,
    parse_index,
    read_blob,
    sha256_digest,
)
from packager.archive import write_archive


def test_canonical_json_sorts_keys_without_spaces_in_utf8() -> None:
    assert canonical_json({"b": [1, {"d": None, "c": "é"}], "a": True}) == (
        '{"a":true,"b":[1,{"c":"é","d":null}]}'.encode()
    )


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../etc/passwd",
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 128,
        "sha256:abc",
        "a" * 64,
    ],
)
def test_check_digest_refuses_anything_but_sha256_hex(digest: str) -> None:
    with pytest.raises(FormatError, match="is not a sha256 digest"):
        check_digest(digest)


def test_platform_parse_print_and_match() -> None:
    arm = Platform.parse("linux/arm/v7")
    assert (arm.os, arm.architecture, arm.variant) == ("linux", "arm", "v7")
    assert str(arm) == "linux/arm/v7"
    assert arm.to_dict() == {"architecture": "arm", "os": "linux", "variant": "v7"}
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert not Platform("linux", "arm64").matches(Platform("linux", "amd64"))
    with pytest.raises(PackageError, match="os/architecture"):
        Platform.parse("arm64")


def test_descriptor_round_trips_and_rejects_bad_fields() -> None:
    d = Descriptor(CONFIG, sha256_digest(b"{}"), 2, {"k": "v"}, Platform("linux", "arm64"))
    assert Descriptor.from_dict(d.to_dict(), what="test") == d
    bad = d.to_dict() | {"size": -1}
    with pytest.raises(FormatError, match="test: descriptor size -1 is not a byte count"):
        Descriptor.from_dict(bad, what="test")


def test_layout_stores_blobs_by_digest_and_tags_them(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "layout")
    descriptor = layout.put(b'{"a":1}', CONFIG)
    assert descriptor.digest == "sha256:" + hashlib.sha256(b'{"a":1}').hexdigest()
    assert layout.get(descriptor.digest) == b'{"a":1}'
    assert layout.blob_path(descriptor.digest).stat().st_mode & 0o777 == 0o644
    layout.tag("v1", descriptor)
    other = layout.put(b'{"a":2}', CONFIG)
    layout.tag("v1", other)
    layout.tag("v0", descriptor)
    assert layout.resolve("v1").digest == other.digest
    index = json.loads((layout.root / "index.json").read_bytes())
    assert [m["annotations"][REF_NAME] for m in index["manifests"]] == ["v0", "v1"]
    with pytest.raises(RefNotFound, match=r"no tag 'v2' .* \(tags there: v0, v1\)"):
        layout.resolve("v2")
    with pytest.raises(BlobNotFound):
        layout.open(sha256_digest(b"nothing"))
    # No temporary files are left behind next to the blobs.
    assert [p.name for p in (layout.root / "blobs").iterdir()] == ["sha256"]


def _image(layout: OCILayout, layers: list[bytes]) -> Descriptor:
    """An index of one manifest with LAYERS, all in LAYOUT."""
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": layout.put(b"{}", CONFIG).to_dict(),
                "layers": [layout.put(data, LAYER_TAR).to_dict() for data in layers]}
    entry = layout.put(canonical_json(manifest), MANIFEST)
    return layout.put(canonical_json({"schemaVersion": 2, "mediaType": INDEX,
                                      "manifests": [entry.to_dict()]}), INDEX)


def test_untag_then_collect_garbage_deletes_only_what_no_tag_reaches(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "layout")
    layout.tag("old", _image(layout, [b"shared", b"old only"]))
    layout.tag("new", _image(layout, [b"shared", b"new only"]))
    partial = layout.blob_path(sha256_digest(b"coming")).with_suffix(".part")
    partial.write_bytes(b"com")  # a download in progress
    assert layout.collect_garbage() == 0  # both tagged: everything is reachable
    layout.untag(["old", "no such tag"])
    assert set(layout.refs()) == {"new"}
    assert layout.collect_garbage() > 0
    assert [layout.has(sha256_digest(b)) for b in (b"shared", b"new only", b"old only", b"{}")] == [
        True, True, False, True]
    assert partial.exists()
    assert layout.collect_garbage() == 0


def test_layout_refuses_a_directory_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "file").write_text("x")
    with pytest.raises(FormatError, match="has no oci-layout file"):
        OCILayout(tmp_path / "stuff")
    with pytest.raises(PackageError, match="neither empty nor an OCI layout"):
        OCILayout.create(tmp_path / "stuff")


def test_a_failed_write_leaves_no_blob(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "layout")
    with pytest.raises(RuntimeError), layout.writer() as blob:
        blob.write(b"half")
        raise RuntimeError("interrupted")
    assert list((layout.root / "blobs" / "sha256").iterdir()) == []
    assert [p.name for p in (layout.root / "blobs").iterdir()] == ["sha256"]


def test_copy_blob_names_what_is_wrong(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "layout")
    good = layout.put(b"0123456789", CONFIG)
    what = "blob of layer 2 (model) of linux/arm64"
    assert read_blob(layout, good, what=what) == b"0123456789"
    cases = {
        "size mismatch, the descriptor says 11 bytes, the blob has 10": Descriptor(
            CONFIG, good.digest, 11
        ),
        "longer than the 9 bytes": Descriptor(CONFIG, good.digest, 9),
    }
    for problem, descriptor in cases.items():
        with pytest.raises(
            VerificationError,
            match=re.escape(f"{what} does not match its descriptor: ") + ".*" + re.escape(problem),
        ):
            copy_blob(layout, descriptor, None, what=what)
    layout.blob_path(good.digest).write_bytes(b"0123456780")
    with pytest.raises(VerificationError, match="digest mismatch, its content hashes to sha256:"):
        copy_blob(layout, good, None, what=what)
    layout.blob_path(good.digest).unlink()
    with pytest.raises(VerificationError, match=re.escape(f"{what} is missing from OCI layout")):
        copy_blob(layout, good, None, what=what)


def test_parse_index_checks_schema_and_media_type() -> None:
    with pytest.raises(FormatError, match="schemaVersion 1, not 2"):
        parse_index(b'{"schemaVersion":1,"manifests":[]}', what="index")
    with pytest.raises(FormatError, match="has media type 'text/plain'"):
        parse_index(b'{"schemaVersion":2,"mediaType":"text/plain","manifests":[]}', what="index")
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_index(b"{", what="index")


def test_archive_is_reproducible_and_readable_in_place(tmp_path: Path) -> None:
    layout = OCILayout.create(tmp_path / "layout")
    index = layout.put(
        canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": []}), INDEX
    )
    layout.tag("1", index)
    (layout.root / "blobs" / ".incoming-leftover").write_bytes(b"junk")
    write_archive(layout, tmp_path / "a.tar", mtime=5)
    write_archive(layout, tmp_path / "b.tar", mtime=5)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == [
            "blobs",
            "blobs/sha256",
            f"blobs/sha256/{index.digest.removeprefix('sha256:')}",
            "index.json",
            "oci-layout",
        ]
        assert {m.mtime for m in tar.getmembers()} == {5}
    with open_image(tmp_path / "a.tar") as archive:
        assert isinstance(archive, OCIArchive)
        assert archive.resolve("1") == layout.resolve("1")
        assert read_blob(archive, index, what="index") == layout.get(index.digest)
    with open_image(layout.root) as same:
        assert isinstance(same, OCILayout)


def test_archive_reader_refuses_other_files(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a tar")
    with pytest.raises(FormatError, match="neither an OCI layout directory nor a tar archive"):
        OCIArchive(tmp_path / "model.onnx")
