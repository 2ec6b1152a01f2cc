"""The disk image assembly with the real tools (mkfs.vfat, mtools, mkfs.ext4, sfdisk) on a
small stand-in root filesystem: a GPT with the EFI and root partitions, the same bytes from
the same inputs, and the enrollment file put on the boot partition and refused when bad;
then the same layout on the session's real amd64 image (tests/firmwareimage.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from firmwareimage import BUILD_TIMEOUT
from hubproc import EDGEFLEET
from packager.firmware import disk

TOKEN = "efe_" + "t0ken" * 6 + "." + "ab" * 32  # pins the hub's CA


def fake_rootfs(root: Path, platform: str = "linux/amd64") -> Path:
    for path, data in {"boot/vmlinuz-6.1.0-1": b"kernel",
                       "boot/initrd.img-6.1.0-1": b"initrd",
                       disk.BOOT_PLATFORMS[platform].loader: b"MZ loader",
                       "etc/hostname": b"edgefleet\n"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    # mkfs.ext4 -d copies each file's atime, which a read moves while atime <= mtime
    # (relatime): a recent atime above an old mtime stays put, so two builds see the same.
    for entry in (root, *root.rglob("*")):
        os.utime(entry, (time.time(), 1_600_000_000))
    return root


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    work = tmp_path_factory.mktemp("disk")
    rootfs = fake_rootfs(work / "rootfs")
    made = []
    for name in ("one", "two"):
        (work / name).mkdir()
        image = work / f"{name}.img"
        disk.make_disk(rootfs, image, work / name, name="test-class", epoch=1_700_000_000,
                       platform="linux/amd64")
        made.append(image)
    return made


def check_layout(image: Path, name: str, epoch: int, platform: str) -> None:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    root_type = disk.BOOT_PLATFORMS[platform].root_type
    assert [p["type"] for p in table["partitions"]] == [disk.ESP_TYPE, root_type]
    root_uuid = table["partitions"][1]["uuid"].lower()
    assert f"PARTUUID={root_uuid} / ext4" in disk.fstab(name, epoch)
    assert f"root=PARTUUID={root_uuid}" in disk.kernel_command_line(name, epoch, platform)
    assert disk.list_enrollment_dir(image) == ["README.txt"]


def esp_file(image: Path, path: str) -> bytes:
    offset = int(json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True,
                                           capture_output=True, text=True).stdout
                            )["partitiontable"]["partitions"][0]["start"]) * disk.SECTOR
    return subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::/{path}"], check=True,
                          capture_output=True, env={"MTOOLS_SKIP_CHECK": "1"}).stdout


def test_the_disk_has_an_efi_and_a_root_partition_with_fixed_ids(images: list[Path]) -> None:
    check_layout(images[0], "test-class", 1_700_000_000, "linux/amd64")
    assert esp_file(images[0], "EFI/BOOT/BOOTX64.EFI") == b"MZ loader"
    assert b"console=ttyS0," in esp_file(images[0], "loader/entries/edgefleet.conf")


def test_an_arm64_disk_has_its_loader_root_type_and_console(tmp_path: Path) -> None:
    rootfs = fake_rootfs(tmp_path / "rootfs", "linux/arm64")
    (tmp_path / "work").mkdir()
    image = tmp_path / "arm64.img"
    disk.make_disk(rootfs, image, tmp_path / "work", name="arm", epoch=1_700_000_000,
                   platform="linux/arm64")
    check_layout(image, "arm", 1_700_000_000, "linux/arm64")
    assert esp_file(image, "EFI/BOOT/BOOTAA64.EFI") == b"MZ loader"
    assert b"console=ttyAMA0," in esp_file(image, "loader/entries/edgefleet.conf")


def test_a_platform_without_a_boot_setup_is_refused(tmp_path: Path) -> None:
    with pytest.raises(disk.DiskError, match="no disk images for linux/arm/v7"):
        disk.make_disk(fake_rootfs(tmp_path), tmp_path / "x.img", tmp_path, name="x", epoch=1,
                       platform="linux/arm/v7")


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_built_amd64_image_has_the_same_layout_and_no_enrollment(amd64_image: Path) -> None:
    info = json.loads(amd64_image.with_suffix(".json").read_text())
    assert info["image"] == amd64_image.name and info["sha256"] == sha256(amd64_image)
    check_layout(amd64_image, info["class"], info["source_date_epoch"], info["platform"])


def test_the_same_inputs_give_the_same_disk(images: list[Path]) -> None:
    assert sha256(images[0]) == sha256(images[1])


def test_an_enrollment_file_goes_on_the_boot_partition_and_a_bad_one_is_refused(
        images: list[Path], tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(images[0]), str(image)], check=True)
    done = subprocess.run([*EDGEFLEET, "firmware", "enroll", str(image), "-"],
                          input="hub=https://hub.lan:8443\n", capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: enrollment file: token: missing"
    done = subprocess.run([*EDGEFLEET, "firmware", "enroll", str(image), "-"],
                          input=f"hub=http://hub.lan:8080\ntoken={TOKEN}\n",
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == ("Error: enrollment file: token: the token pins the hub's "
                                   "CA, but http://hub.lan:8080 is plain HTTP: use https://")
    done = subprocess.run([*EDGEFLEET, "firmware", "enroll", str(image), "-"],
                          input=f"hub=https://hub.lan:8443\ntoken={TOKEN}\n",
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert disk.list_enrollment_dir(image) == ["README.txt", "enrollment.conf"]
    not_a_disk = tmp_path / "zeros.img"
    not_a_disk.write_bytes(bytes(1 << 20))
    with pytest.raises(disk.DiskError):
        disk.write_enrollment(not_a_disk, "hub=http://h:1\n")
