"""A runtime's Python packages for one platform, installed by pip for that platform.

`PipDeps` runs `pip install --target` with `--platform <manylinux tags>
--only-binary=:all: --python-version 3.11 --implementation cp`, so the
build host can be anything: only wheels are used, nothing is compiled.

Installed trees are cached by (requirements, platform, Python, glibc) under
the cache directory. The first build of a combination fixes the versions it
gets, so later builds are fast, offline and byte-identical; pin versions in
the requirements, or delete the cache directory, to move to newer ones.

The tree is normalised for reproducibility: no bytecode (`--no-compile`), and
no `bin/` console scripts, whose shebang is the build host's interpreter path
(useless in the image and different on every host), nor their RECORD lines.

A build can skip this (native-mode packages) or be handed any other provider
of a directory: the build API takes any `DepsProvider`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from contract.canonical import canonical_json
from contract.errors import PackageError
from contract.oci import Platform

PYTHON_VERSION = "3.11"
# Devices are expected to run glibc 2.31 or newer (Debian 11, Ubuntu 20.04, Raspberry Pi OS
# bullseye); a wheel built for a newer glibc would not load there, so none is chosen.
MAX_GLIBC_MINOR = 31
MIN_GLIBC_MINOR = 5
# Old wheels carry only the pre-PEP 600 name of their glibc level.
_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
PIP_ARCHITECTURES = {"linux/amd64": "x86_64", "linux/arm64": "aarch64", "linux/arm/v7": "armv7l"}
PIP_TIMEOUT = 30 * 60

# (requirements, platform) -> directory of installed packages to lay under /opt/edgefleet/python.
DepsProvider = Callable[[Sequence[str], Platform], Path]


class PlatformUnavailable(PackageError):
    """One platform cannot be built (no wheel, no base image for it); the others may be."""


class DepsError(PackageError):
    """pip failed for a reason other than a missing wheel."""


class UnavailableWheel(PlatformUnavailable):
    def __init__(self, package: str, platform: Platform) -> None:
        self.package = package
        self.platform = platform
        super().__init__(
            f"no {package} wheel for {platform} (CPython {PYTHON_VERSION}, glibc <= "
            f"2.{MAX_GLIBC_MINOR}) on the package index; leave {platform} out of --platform or "
            "pass --skip-unavailable (a native-mode package, without --image, needs no wheels)"
        )


def pip_platform_tags(platform: Platform) -> list[str]:
    """pip --platform values for PLATFORM: every manylinux level up to MAX_GLIBC_MINOR."""
    arch = PIP_ARCHITECTURES.get(str(platform))
    if arch is None:
        raise PlatformUnavailable(
            f"no Python wheels are chosen for {platform}; supported: {', '.join(PIP_ARCHITECTURES)}"
        )
    tags = []
    for minor in range(MAX_GLIBC_MINOR, MIN_GLIBC_MINOR - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in _LEGACY_MANYLINUX:
            tags.append(f"{_LEGACY_MANYLINUX[minor]}_{arch}")
    return tags


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgefleet" / "deps"


@dataclass(frozen=True)
class PipDeps:
    """Installs requirements for a platform with pip, caching the installed tree."""

    cache_dir: Path | None = None

    def __call__(self, requirements: Sequence[str], platform: Platform) -> Path:
        tags = pip_platform_tags(platform)
        cache = self.cache_dir or default_cache_dir()
        key = hashlib.sha256(
            canonical_json(
                {
                    "glibc": MAX_GLIBC_MINOR,
                    "platform": str(platform),
                    "python": PYTHON_VERSION,
                    "requirements": sorted(requirements),
                }
            )
        ).hexdigest()[:32]
        tree = cache / "site-packages" / key
        if tree.is_dir():
            return tree
        tree.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".installing-"))
        try:
            _pip_install(requirements, platform, tags, staging, cache / "pip")
            _normalise(staging)
            try:
                staging.rename(tree)
            except OSError:
                # Another build installed the same tree first; theirs is as good as ours.
                if not tree.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return tree


def _pip_install(
    requirements: Sequence[str], platform: Platform, tags: list[str], target: Path, pip_cache: Path
) -> None:
    command = [
        sys.executable, "-m", "pip", "install",
        "--target", str(target),
        "--only-binary=:all:",
        "--python-version", PYTHON_VERSION,
        "--implementation", "cp",
        *(f"--platform={tag}" for tag in tags),
        "--no-compile",
        "--no-input",
        "--disable-pip-version-check",
        "--cache-dir", str(pip_cache),
        *requirements,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise DepsError(
            f"pip did not finish installing {' '.join(requirements)} for {platform} in "
            f"{PIP_TIMEOUT}s; check the network and try again"
        ) from None
    if done.returncode != 0:
        raise _pip_error(done.stderr, requirements, platform)


def _pip_error(stderr: str, requirements: Sequence[str], platform: Platform) -> PackageError:
    if "Retrying (Retry(" in stderr or "Could not fetch URL" in stderr:
        return DepsError(
            f"pip could not reach the package index to install {' '.join(requirements)} for "
            f"{platform}; check the network or the pip index settings:\n{_tail(stderr)}"
        )
    missing = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", stderr)
    if missing:
        return UnavailableWheel(missing.group(1), platform)
    return DepsError(
        f"pip failed to install {' '.join(requirements)} for {platform}:\n{_tail(stderr)}"
    )


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _normalise(target: Path) -> None:
    shutil.rmtree(target / "bin", ignore_errors=True)
    for cache in list(target.rglob("__pycache__")):
        shutil.rmtree(cache)
    for record in target.glob("*.dist-info/RECORD"):
        # Lines for files outside the target (the removed scripts) carry host-specific hashes.
        lines = record.read_text(encoding="utf-8").splitlines(keepends=True)
        record.write_text(
            "".join(line for line in lines if not line.lstrip('"').startswith("../")),
            encoding="utf-8",
        )
