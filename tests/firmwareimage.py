"""The device images the firmware tests share: built once per session by `edgefleet firmware
build` (which copies an image built before from the same inputs out of
~/.cache/edgefleet/firmware, and builds for real otherwise), or the image named by
EDGEFLEET_FIRMWARE_IMAGE (amd64) / EDGEFLEET_FIRMWARE_IMAGE_ARM64. Also a reader for
files in an image's root partition (debugfs on the ext4 at its offset: no mounts)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hubproc import EDGEFLEET
from packager.firmware import disk

AMD64_CLASS = "generic-amd64"
ARM64_CLASS = "generic-arm64"
# A build (~10 min on a loaded 2-core machine, longer for arm64 through qemu-user) or a QEMU
# boot needs more than the suite's per-test timeout; a test that may be the first to use an
# image is marked with this.
BUILD_TIMEOUT = 3600
_GIVEN = {AMD64_CLASS: "EDGEFLEET_FIRMWARE_IMAGE", ARM64_CLASS: "EDGEFLEET_FIRMWARE_IMAGE_ARM64"}
# The arm64 disk image's build runs dpkg's maintainer scripts, mkinitramfs and pip through
# qemu-user (~35 min on the loaded 2-core machine, see firmware-images/README.md) and its
# boot under TCG takes ~7 min: too long for every CI run.
ARM64_OPT_IN = "EDGEFLEET_FIRMWARE_ARM64"
arm64_opt_in = pytest.mark.skipif(
    os.environ.get(ARM64_OPT_IN) != "1",
    reason=f"the arm64 disk image takes ~35 min to build here (through qemu-user) "
           f"and ~7 min to boot under TCG: opt in with {ARM64_OPT_IN}=1 (or give an image "
           f"with {_GIVEN[ARM64_CLASS]}=PATH as well); see firmware-images/README.md")


@pytest.fixture(scope="session")
def firmware_image(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """CLASS -> its disk image, built (or copied from the cache) at the first ask."""
    built: dict[str, Path] = {}

    def image(cls: str) -> Path:
        given = os.environ.get(_GIVEN[cls])
        if given:
            return Path(given)
        if cls not in built:
            out = tmp_path_factory.mktemp(cls)
            started = time.monotonic()
            done = subprocess.run([*EDGEFLEET, "firmware", "build", cls, "--out", str(out)],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            assert done.returncode == 0, done.stderr
            cached = "cached image" in done.stderr
            print(f"\nfirmware build {cls}{' (cached)' if cached else ''}: "
                  f"{time.monotonic() - started:.0f} s; {done.stdout.strip()}")
            built[cls] = out / f"{cls}.img"
        return built[cls]

    return image


@pytest.fixture(scope="session")
def amd64_image(firmware_image: Callable[[str], Path]) -> Path:
    return firmware_image(AMD64_CLASS)


@pytest.fixture(scope="session")
def arm64_image(firmware_image: Callable[[str], Path]) -> Path:
    return firmware_image(ARM64_CLASS)


class RootPartition:
    """Files in a disk image's ext4 root partition, read with debugfs."""

    def __init__(self, image: Path) -> None:
        table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True,
                                          capture_output=True, text=True).stdout)
        [root] = [p for p in table["partitiontable"]["partitions"]
                  if p["type"] != disk.ESP_TYPE]
        self.type = root["type"]
        self._device = f"{image}?offset={int(root['start']) * disk.SECTOR}"

    def _debugfs(self, request: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["debugfs", "-R", request, self._device], capture_output=True,
                              check=True)

    def exists(self, path: str) -> bool:
        return b"File not found" not in self._debugfs(f"stat /{path}").stderr

    def read(self, path: str) -> bytes:
        assert self.exists(path), path
        return self._debugfs(f"cat /{path}").stdout

    def names(self, directory: str) -> list[str]:
        """The entries of DIRECTORY (ls -p: /inode/mode/uid/gid/name/size/)."""
        lines = self._debugfs(f"ls -p /{directory}").stdout.decode().splitlines()
        return sorted(n for line in lines if line.count("/") >= 6
                      for n in [line.split("/")[5]] if n not in (".", ".."))
