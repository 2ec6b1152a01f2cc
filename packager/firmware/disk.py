"""A raw GPT disk image from a root filesystem directory, without loop devices or mounts.

Layout: 1 MiB for the GPT, an EFI system partition (FAT32: systemd-boot as the
removable-media loader EFI/BOOT/BOOT<arch>.EFI, its loader entry, the kernel and the
initrd, and edgefleet/ where the enrollment file goes), then the ext4 root made from
the directory by `mkfs.ext4 -d`. One layout for every platform in BOOT_PLATFORMS; what
differs (the loader's name, the root partition's type, the kernel package, the serial
console) is that table's. The FAT partition is built with mkfs.vfat and mtools,
the table with sfdisk, and the partitions copied into place: nothing needs root's
mount, so it builds in containers too. Partition and filesystem ids come from the class
name and the epoch (uuid5), so a rebuild has the same ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from contract.errors import PackageError

ESP_MOUNT = "/boot/efi"
ESP_MIB = 256
ROOT_SPARE_MIB = 768  # room for model packages and logs beyond what the image holds
SECTOR = 512
MIB = 1 << 20
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ENROLLMENT_DIR = "edgefleet"
ENROLLMENT_NAME = "enrollment.conf"
_README = """\
Put the enrollment file here as enrollment.conf (edgefleet agent install's format:
hub=https://..., token=efe_... (the whole token: it pins the hub's CA), optional
name=, serving_api_key=). At the next
boot the device moves it to /etc/edgefleet (root only), deletes it here, and enrolls.
"""


class DiskError(PackageError):
    """The disk image could not be made or changed; the message says why."""


@dataclass(frozen=True)
class BootPlatform:
    """What a UEFI disk needs per CPU architecture."""

    efi_arch: str  # UEFI's name: the loader is EFI/BOOT/BOOT<EFI_ARCH>.EFI
    root_type: str  # the Discoverable Partitions root type for this architecture
    kernel_package: str  # Debian's kernel metapackage
    console: str  # the serial console of UEFI machines (and QEMU's) of this kind
    # The initramfs's kernel modules: () for Debian's MODULES=most (every storage and
    # filesystem driver), else MODULES=list with these (and what they depend on), where
    # most costs too much: an arm64 initramfs built through qemu-user (a process, so a
    # qemu-user start, per module) took 39 min with most.
    initramfs_modules: tuple[str, ...] = ()

    @property
    def loader(self) -> str:
        """systemd-boot's binary in the root filesystem (Debian's systemd-boot-efi)."""
        return f"usr/lib/systemd/boot/efi/systemd-boot{self.efi_arch.lower()}.efi"


BOOT_PLATFORMS = {
    "linux/amd64": BootPlatform(efi_arch="X64", root_type="4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
                                kernel_package="linux-image-amd64", console="ttyS0"),
    # The virt machine's and most servers' PL011 UART.
    "linux/arm64": BootPlatform(efi_arch="AA64", root_type="B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
                                kernel_package="linux-image-arm64", console="ttyAMA0",
                initramfs_modules=(
                    # Root on ext4 (crc32c: its checksums, a soft dependency modprobe
                    # misses here) on virtio (QEMU, clouds), NVMe, SATA, USB mass storage
                    # or an SD card (generic SDHCI, the Pi's iProc one).
                    "ext4", "crc32c", "virtio_pci", "virtio_mmio", "virtio_blk",
                    "virtio_scsi", "sd_mod", "nvme", "ahci", "ahci_platform", "xhci_pci",
                    "xhci_plat_hcd", "usb_storage", "uas", "mmc_block", "sdhci_pci",
                    "sdhci_of_arasan", "sdhci_iproc")),
}


def boot_platform(platform: str) -> BootPlatform:
    try:
        return BOOT_PLATFORMS[platform]
    except KeyError:
        raise DiskError(f"no disk images for {platform} (only {', '.join(BOOT_PLATFORMS)})"
                        ) from None


def _ids(name: str, epoch: int) -> dict[str, str]:
    def make(part: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"edgefleet-firmware:{name}:{epoch}:{part}"))

    return {part: make(part) for part in ("disk", "esp", "root", "rootfs")}


def fstab(name: str, epoch: int) -> str:
    ids = _ids(name, epoch)
    # umask 0077: the enrollment file sits here until first boot; FAT has no owners.
    return (f"PARTUUID={ids['root']} / ext4 errors=remount-ro 0 1\n"
            f"PARTUUID={ids['esp']} {ESP_MOUNT} vfat umask=0077,shortname=winnt 0 2\n")


def kernel_command_line(name: str, epoch: int, platform: str) -> str:
    return (f"root=PARTUUID={_ids(name, epoch)['root']} rw console=tty0 "
            f"console={boot_platform(platform).console},115200 systemd.show_status=1")


def make_disk(rootfs: Path, image: Path, work: Path, *, name: str, epoch: int,
              platform: str) -> None:
    boot = boot_platform(platform)
    ids = _ids(name, epoch)
    kernel = _one(rootfs, "boot/vmlinuz-*")
    initrd = _one(rootfs, "boot/initrd.img-*")
    loader = _one(rootfs, boot.loader)
    env = {"SOURCE_DATE_EPOCH": str(epoch), "E2FSPROGS_FAKE_TIME": str(epoch),
           "MTOOLS_SKIP_CHECK": "1"}

    esp = work / "esp.img"
    _run(["mkfs.vfat", "-F", "32", "-n", "EFI", "--invariant", "-i",
          ids["esp"].replace("-", "")[:8], "-C", str(esp), str(ESP_MIB * 1024)], env)
    staged = work / "esp"
    files = {
        f"EFI/BOOT/BOOT{boot.efi_arch}.EFI": loader.read_bytes(),
        "loader/loader.conf": b"timeout 0\ndefault edgefleet.conf\n",
        "loader/entries/edgefleet.conf": (
            f"title edgefleet ({name})\nlinux /vmlinuz\ninitrd /initrd.img\n"
            f"options {kernel_command_line(name, epoch, platform)}\n").encode(),
        "vmlinuz": kernel.read_bytes(),
        "initrd.img": initrd.read_bytes(),
        f"{ENROLLMENT_DIR}/README.txt": _README.encode(),
    }
    for path, data in files.items():
        target = staged / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    for directory, _, names in os.walk(staged):
        for entry in (directory, *(os.path.join(directory, n) for n in names)):
            os.utime(entry, (epoch, epoch))
    _run(["mcopy", "-i", str(esp), "-s", "-m", "-Q",
          *(str(p) for p in sorted(staged.iterdir())), "::/"], env)

    root = work / "root.img"
    used_mib = _du_mib(rootfs)
    root_mib = int(used_mib * 1.25) + ROOT_SPARE_MIB
    _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", ids["rootfs"],
          "-E", f"hash_seed={ids['rootfs']},root_owner=0:0", "-d", str(rootfs), str(root),
          f"{root_mib}M"], env)

    esp_start = MIB // SECTOR
    root_start = esp_start + ESP_MIB * MIB // SECTOR
    total = root_start * SECTOR + root_mib * MIB + MIB  # the backup GPT at the end
    with image.open("wb") as f:
        f.truncate(total)
    table = (f"label: gpt\nlabel-id: {ids['disk']}\nunit: sectors\n"
             f"start={esp_start}, size={ESP_MIB * MIB // SECTOR}, type={ESP_TYPE}, "
             f"uuid={ids['esp']}, name=\"ESP\"\n"
             f"start={root_start}, size={root_mib * MIB // SECTOR}, type={boot.root_type}, "
             f"uuid={ids['root']}, name=\"root\"\n")
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)], env, table)
    _copy_into(esp, image, esp_start * SECTOR)
    _copy_into(root, image, root_start * SECTOR)


def write_enrollment(image: Path, config_text: str) -> None:
    """Put an enrollment file on IMAGE's EFI system partition (before flashing)."""
    offset = _esp_offset(image)
    env = {"MTOOLS_SKIP_CHECK": "1"}
    with_offset = f"{image}@@{offset}"
    staged = image.parent / f".{image.name}.{ENROLLMENT_NAME}"
    staged.write_text(config_text)
    staged.chmod(0o600)
    try:
        _run(["mcopy", "-o", "-i", with_offset, str(staged),
              f"::/{ENROLLMENT_DIR}/{ENROLLMENT_NAME}"], env)
    finally:
        staged.unlink()


def list_enrollment_dir(image: Path) -> list[str]:
    """The names in the boot partition's edgefleet/ directory of IMAGE."""
    done = _run(["mdir", "-b", "-i", f"{image}@@{_esp_offset(image)}", f"::/{ENROLLMENT_DIR}"],
                {"MTOOLS_SKIP_CHECK": "1"})
    return sorted(line.rstrip("/").rpartition("/")[2] for line in done.stdout.splitlines()
                  if line.strip())


def _esp_offset(image: Path) -> int:
    done = _run(["sfdisk", "--json", str(image)], {})
    try:
        table = json.loads(done.stdout)["partitiontable"]
        sector = table.get("sectorsize", SECTOR)
        for part in table["partitions"]:
            if part["type"].upper() == ESP_TYPE:
                return int(part["start"]) * int(sector)
    except (ValueError, KeyError, TypeError):
        pass
    raise DiskError(f"{image} has no EFI system partition: is it an edgefleet disk image?")


def _copy_into(source: Path, image: Path, offset: int) -> None:
    """SOURCE's bytes at OFFSET in IMAGE, leaving runs of zeros as holes (images are sparse)."""
    block = MIB
    zero = bytes(block)
    with source.open("rb") as src, image.open("r+b") as dst:
        position = offset
        while chunk := src.read(block):
            if chunk != zero[: len(chunk)]:
                dst.seek(position)
                dst.write(chunk)
            position += len(chunk)


def _one(rootfs: Path, pattern: str) -> Path:
    found = sorted(rootfs.glob(pattern))
    if len(found) != 1:
        raise DiskError(f"expected one {pattern} in the root filesystem, found {len(found)}")
    return found[0]


def _du_mib(path: Path) -> int:
    done = _run(["du", "-s", "--block-size=1M", str(path)], {})
    return int(done.stdout.split()[0])


def _run(command: Sequence[str], env: dict[str, str],
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(command[0]) is None:
        raise DiskError(f"{command[0]} is not installed (apt-get install dosfstools mtools fdisk"
                        " e2fsprogs)")
    done = subprocess.run(list(command), input=stdin, capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)
    if done.returncode != 0:
        raise DiskError(f"{command[0]} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done
