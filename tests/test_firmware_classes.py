"""Device classes as data: every file in firmware-images/classes/ reads, and the reader is
strict (unknown keys, wrong types, unknown runtimes or platforms are one line naming the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from contract.runtimes import RUNTIMES
from packager.firmware import classes


def test_every_shipped_class_reads() -> None:
    found = sorted(classes.CLASSES_DIR.glob("*.toml"))
    assert found, "no device classes shipped"
    for path in found:
        cls = classes.load(path)
        assert cls.name == path.stem
        assert set(cls.extras) <= {"agent", *(r.extra for r in RUNTIMES.values())}
    amd64 = classes.find("generic-amd64")
    assert amd64.disk_image and amd64.extras == ("agent", "onnx")
    assert dict(amd64.tags) == {"class": "generic-amd64"}
    arm64 = classes.find("generic-arm64")
    assert arm64.disk_image and arm64.debian_architecture == "arm64"


GOOD: dict[str, Any] = {"description": "d", "platform": "linux/arm64", "runtimes": ["litert"]}


@pytest.mark.parametrize(("change", "error"), [
    ({"platfrom": "linux/arm64"}, "unknown key 'platfrom'"),
    ({"platform": "linux/riscv64"}, "platform: 'linux/riscv64' is none of"),
    ({"platform": 64}, "platform: must be str, got int"),
    ({"runtimes": ["tensorrt"]}, "runtimes: 'tensorrt' is none of"),
    ({"runtimes": "onnxruntime"}, "runtimes: must be a list of strings"),
    ({"runtimes": ["litert", "litert"]}, "runtimes: lists an entry twice"),
    ({"accelerator_packages": ["rm -rf /"]}, "is no Debian package name"),
    ({"tags": {"class": "a\nb"}}, "tags: invalid tag value"),
    ({"tags": ["class=x"]}, "tags: must be a table"),
    ({"disk_image": "yes"}, "disk_image: must be true or false"),
    ({"platform": "linux/arm/v7", "runtimes": [], "disk_image": True},
     "raw disk images are made for linux/amd64, linux/arm64 only"),
])
def test_the_class_reader_is_strict(change: dict[str, Any], error: str) -> None:
    with pytest.raises(classes.ClassError) as caught:
        classes.parse("board", {**GOOD, **change})
    assert error in str(caught.value)


def test_a_missing_key_and_a_bad_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "board.toml"
    path.write_text('platform = "linux/arm64"\nruntimes = []\n')
    with pytest.raises(classes.ClassError, match=f"{path}: description: missing"):
        classes.load(path)
    path.write_text("platform = ")
    with pytest.raises(classes.ClassError, match=str(path)):
        classes.load(path)
    with pytest.raises(classes.ClassError, match="no device class 'nope'.*known: generic-amd64"):
        classes.find("nope")
    with pytest.raises(classes.ClassError, match="is no class name"):
        classes.find("../etc/passwd")
