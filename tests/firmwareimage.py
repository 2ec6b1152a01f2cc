"""The amd64 device image the firmware tests share: built once per session by `edgefleet
firmware build` (which copies an image built before from the same inputs out of
~/.cache/edgefleet/firmware, and builds for real otherwise), or the image named by
EDGEFLEET_FIRMWARE_IMAGE."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hubproc import EDGEFLEET

AMD64_CLASS = "generic-amd64"
# A build (~10 min on a loaded 2-core machine) or a QEMU boot needs more than the suite's
# per-test timeout; a test that may be the first to use the image is marked with this.
BUILD_TIMEOUT = 3600


@pytest.fixture(scope="session")
def amd64_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("EDGEFLEET_FIRMWARE_IMAGE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("firmware")
    started = time.monotonic()
    done = subprocess.run([*EDGEFLEET, "firmware", "build", AMD64_CLASS, "--out", str(out)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, done.stderr
    cached = "cached image" in done.stderr
    print(f"\nfirmware build{' (cached)' if cached else ''}: "
          f"{time.monotonic() - started:.0f} s; {done.stdout.strip()}")
    return out / f"{AMD64_CLASS}.img"
