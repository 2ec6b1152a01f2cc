"""Device classes as data: one TOML file per class under firmware-images/classes/.

A class says what a kind of device runs: its OCI platform, the inference runtimes
(contract/runtimes.py names; their pip extras are installed), Debian packages for its
accelerators, the tags its devices start with, and whether a raw disk image is made
(a UEFI disk, for the platforms packager/firmware/disk.py boots) instead of a root
filesystem archive. A new class is a new file; unknown keys are refused so a
typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.names import InvalidName, tag
from contract.runtimes import RUNTIMES
from packager.base import DEBIAN_ARCHITECTURES
from packager.firmware.disk import BOOT_PLATFORMS

CLASSES_DIR = Path(__file__).resolve().parents[2] / "firmware-images" / "classes"
_CLASS_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9.+-]+")
_KEYS = {"description", "platform", "runtimes", "accelerator_packages", "tags", "disk_image"}


class ClassError(ValueError):
    """A class file is missing or wrong; the message names the file and the key."""


@dataclass(frozen=True)
class DeviceClass:
    name: str
    description: str
    platform: str  # an OCI platform, e.g. linux/arm64
    runtimes: tuple[str, ...]
    accelerator_packages: tuple[str, ...]
    tags: tuple[tuple[str, str], ...]
    disk_image: bool

    @property
    def extras(self) -> tuple[str, ...]:
        """pip extras for `edgefleet[...]`: the agent and each runtime's."""
        return ("agent", *sorted({RUNTIMES[r].extra for r in self.runtimes}))

    @property
    def debian_architecture(self) -> str:
        return DEBIAN_ARCHITECTURES[self.platform]


def find(name_or_path: str, classes_dir: Path = CLASSES_DIR) -> DeviceClass:
    """The class NAME in CLASSES_DIR, or the class file at a path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if not _CLASS_NAME.fullmatch(name_or_path):
            raise ClassError(f"{name_or_path!r} is no class name (lower-case words joined by -)")
        path = classes_dir / f"{name_or_path}.toml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in classes_dir.glob("*.toml"))) or "none"
            raise ClassError(f"no device class {name_or_path!r} in {classes_dir} (known: {known})")
    return load(path)


def load(path: Path) -> DeviceClass:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClassError(f"{path}: {exc}") from None
    try:
        return parse(path.stem, data)
    except ClassError as exc:
        raise ClassError(f"{path}: {exc}") from None


def parse(name: str, data: dict[str, Any]) -> DeviceClass:
    if not _CLASS_NAME.fullmatch(name):
        raise ClassError(f"{name!r} is no class name (lower-case words joined by -)")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ClassError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    platform = _typed(data, "platform", str)
    if platform not in DEBIAN_ARCHITECTURES:
        raise ClassError(f"platform: {platform!r} is none of {', '.join(DEBIAN_ARCHITECTURES)}")
    runtimes = _strings(data, "runtimes")
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            raise ClassError(f"runtimes: {runtime!r} is none of {', '.join(RUNTIMES)}")
        if platform not in RUNTIMES[runtime].platforms:
            raise ClassError(f"runtimes: {runtime} has no wheels for {platform}")
    packages = _strings(data, "accelerator_packages", required=False)
    for package in packages:
        if not _DEBIAN_PACKAGE.fullmatch(package):
            raise ClassError(f"accelerator_packages: {package!r} is no Debian package name")
    tags = data.get("tags", {})
    if not isinstance(tags, dict):
        raise ClassError("tags: must be a table of key = \"value\"")
    try:
        checked = tuple(sorted(tag(k, v) for k, v in tags.items()))
    except InvalidName as exc:
        raise ClassError(f"tags: {exc}") from None
    disk_image = data.get("disk_image", False)
    if not isinstance(disk_image, bool):
        raise ClassError("disk_image: must be true or false")
    if disk_image and platform not in BOOT_PLATFORMS:
        raise ClassError(f"disk_image: raw disk images are made for {', '.join(BOOT_PLATFORMS)}"
                         " only")
    return DeviceClass(name=name, description=_typed(data, "description", str),
                       platform=platform, runtimes=runtimes, accelerator_packages=packages,
                       tags=checked, disk_image=disk_image)


def _typed(data: dict[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise ClassError(f"{key}: missing")
    if not isinstance(data[key], kind):
        raise ClassError(f"{key}: must be {kind.__name__}, got {type(data[key]).__name__}")
    return data[key]


def _strings(data: dict[str, Any], key: str, *, required: bool = True) -> tuple[str, ...]:
    value = data.get(key, None if required else [])
    if value is None:
        raise ClassError(f"{key}: missing")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClassError(f"{key}: must be a list of strings")
    if len(set(value)) != len(value):
        raise ClassError(f"{key}: lists an entry twice")
    return tuple(value)
