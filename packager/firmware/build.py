"""`edgefleet firmware build CLASS`: a device's root filesystem, and for amd64 a bootable disk.

Steps, each cached or cheap on a second run (cache: ~/.cache/edgefleet/firmware):

1. wheels: edgefleet's own wheel, built from this source tree, and every wheel
   `edgefleet[agent,<runtime extras>]` needs for the class's platform (pip download
   for CPython 3.11 manylinux, as packager/deps.py chooses them), cached by platform,
   extras and pyproject.toml;
2. root filesystem: mmdebstrap (minbase + systemd, Python, the kernel and
   systemd-boot for disk images, the class's accelerator packages); its .debs are
   kept in the cache, so a warm build downloads nothing. In the chroot a venv at
   /opt/edgefleet gets the wheels, offline;
3. the agent as a service: `edgefleet agent install --root ROOTFS --first-boot-file
   /boot/efi/edgefleet/enrollment.conf` (the same installer as on a running machine),
   networkd with DHCP on every wired interface, an empty machine-id (each device makes
   its own at first boot), /etc/edgefleet/image.json (class and build);
4. outputs in OUT: CLASS.img (GPT: EFI system partition with systemd-boot, kernel and
   initrd; ext4 root) or CLASS-rootfs.tar, CLASS.packages.txt (every Debian package and
   Python distribution with its version) and CLASS.json (what was built, sizes, sha256).

Reproducible as far as Debian allows: SOURCE_DATE_EPOCH clamps every time stamp,
partition and filesystem ids are derived from the class and the epoch, but the package
versions are whatever the mirror serves that day (pin --mirror to a snapshot URL to fix
them). Byte-identical rebuilds are not claimed: bytecode and ext4 internals vary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from contract.canonical import canonical_json
from contract.errors import PackageError
from contract.oci import Platform
from packager.base import check_debian_platform
from packager.deps import PYTHON_VERSION, pip_platform_tags
from packager.firmware import disk
from packager.firmware.classes import DeviceClass

SOURCE_ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
VENV = "/opt/edgefleet"
FIRST_BOOT_FILE = f"{disk.ESP_MOUNT}/edgefleet/enrollment.conf"
BASE_PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "python3",
                 "python3-venv", "ca-certificates")
# A bootable disk: Debian's kernel and initramfs, and systemd-boot's EFI binary.
DISK_PACKAGES = ("linux-image-amd64", "initramfs-tools", "systemd-boot-efi")
TIMEOUT = 60 * 60
Log = Callable[[str], None]


class FirmwareError(PackageError):
    """A firmware build failed; the message says where and what to do."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgefleet" / "firmware"


@dataclass(frozen=True)
class BuildSettings:
    device_class: DeviceClass
    out_dir: Path
    epoch: int
    cache_dir: Path = field(default_factory=default_cache_dir)
    mirror: str = MIRROR
    security_mirror: str | None = SECURITY_MIRROR
    suite: str = SUITE

    @property
    def packages(self) -> tuple[str, ...]:
        disk_packages = DISK_PACKAGES if self.device_class.disk_image else ()
        return (*BASE_PACKAGES, *disk_packages, *self.device_class.accelerator_packages)


@dataclass(frozen=True)
class BuildResult:
    image: Path  # CLASS.img or CLASS-rootfs.tar
    packages: Path
    info: Path
    seconds: dict[str, float]


def build(settings: BuildSettings, log: Log) -> BuildResult:
    cls = settings.device_class
    check_debian_platform(Platform.parse(cls.platform))
    if shutil.which("mmdebstrap") is None:
        raise FirmwareError("mmdebstrap is not installed: apt-get install mmdebstrap")
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-firmware-") as work_name:
        work = Path(work_name)
        started = time.monotonic()
        log(f"wheels for {cls.platform} (edgefleet[{','.join(cls.extras)}])")
        wheels = _wheels(settings, work / "wheels")
        seconds["wheels"] = time.monotonic() - started

        started = time.monotonic()
        rootfs = work / "rootfs"
        log(f"root filesystem: mmdebstrap {settings.suite} {cls.debian_architecture}")
        _mmdebstrap(settings, rootfs, wheels)
        _configure(settings, rootfs)
        seconds["rootfs"] = time.monotonic() - started

        packages = settings.out_dir / f"{cls.name}.packages.txt"
        packages.write_text(_manifest(rootfs))
        started = time.monotonic()
        if cls.disk_image:
            image = settings.out_dir / f"{cls.name}.img"
            log(f"disk image {image}")
            disk.make_disk(rootfs, image, work, name=cls.name, epoch=settings.epoch)
        else:
            image = settings.out_dir / f"{cls.name}-rootfs.tar"
            log(f"root filesystem archive {image}")
            _tar(rootfs, image, settings.epoch)
        seconds["image"] = time.monotonic() - started
        shutil.rmtree(rootfs)
    info = settings.out_dir / f"{cls.name}.json"
    info.write_text(json.dumps({
        "class": cls.name, "platform": cls.platform, "suite": settings.suite,
        "mirror": settings.mirror, "source_date_epoch": settings.epoch,
        "image": image.name, "size": image.stat().st_size,
        "allocated": image.stat().st_blocks * 512, "sha256": _sha256(image),
        "enrollment_file": FIRST_BOOT_FILE if cls.disk_image else None,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }, indent=2, sort_keys=True) + "\n")
    return BuildResult(image, packages, info, seconds)


def _wheels(settings: BuildSettings, into: Path) -> Path:
    """edgefleet's wheel (built now) beside its dependencies' (cached) in one directory."""
    cls = settings.device_class
    requirement = f"edgefleet[{','.join(cls.extras)}]"
    own = into / "own"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
          "--quiet", "--wheel-dir", str(own), str(SOURCE_ROOT)],
         what="building edgefleet's wheel", env={"SOURCE_DATE_EPOCH": str(settings.epoch)})
    key = hashlib.sha256(canonical_json({
        "platform": cls.platform, "requirement": requirement, "python": PYTHON_VERSION,
        "pyproject": hashlib.sha256((SOURCE_ROOT / "pyproject.toml").read_bytes()).hexdigest(),
    })).hexdigest()[:32]
    deps = settings.cache_dir / "wheels" / key
    if not deps.is_dir():
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=settings.cache_dir, prefix=".wheels-"))
        try:
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(staging),
                  "--only-binary=:all:", "--python-version", PYTHON_VERSION,
                  "--implementation", "cp",
                  *(f"--platform={t}" for t in pip_platform_tags(Platform.parse(cls.platform))),
                  "--find-links", str(own), "--cache-dir", str(settings.cache_dir / "pip"),
                  requirement], what=f"downloading wheels for {cls.platform}")
            for ours in staging.glob("edgefleet-*.whl"):
                ours.unlink()  # the next build brings its own
            deps.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(deps)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for wheel in deps.glob("*.whl"):
        shutil.copy2(wheel, own / wheel.name)
    return own


def _mmdebstrap(settings: BuildSettings, rootfs: Path, wheels: Path) -> None:
    cls = settings.device_class
    debs = settings.cache_dir / "debs" / f"{settings.suite}-{cls.debian_architecture}"
    debs.mkdir(parents=True, exist_ok=True)
    mirrors = [f"deb {settings.mirror} {settings.suite} main"]
    if settings.security_mirror:
        mirrors.append(f"deb {settings.security_mirror} {settings.suite}-security main")
    extras = ",".join(cls.extras)
    command = [
        "mmdebstrap", "--variant=minbase", f"--architectures={cls.debian_architecture}",
        f"--include={','.join(settings.packages)}",
        "--aptopt=APT::Install-Recommends \"false\"",
        # No fsync per file: the tree is only mkfs's or tar's input, thrown away if interrupted.
        "--dpkgopt=force-unsafe-io",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        # The .debs stay in the cache between builds: a warm build downloads nothing.
        "--skip=download/empty", "--skip=essential/unlink",
        f'--setup-hook=mkdir -p "$1"/var/cache/apt/archives && cp -a {debs}/. '
        '"$1"/var/cache/apt/archives/',
        f'--customize-hook=cp -a "$1"/var/cache/apt/archives/*.deb {debs}/ 2>/dev/null; '
        'rm -f "$1"/var/cache/apt/archives/*.deb',
        # The agent: a venv with the wheels, installed offline.
        f'--customize-hook=mkdir -p "$1"/tmp/wheels && cp {wheels}/*.whl "$1"/tmp/wheels/',
        f'--customize-hook=chroot "$1" python3 -m venv {VENV}',
        f'--customize-hook=chroot "$1" {VENV}/bin/pip install --quiet --no-index '
        f"--no-cache-dir --disable-pip-version-check --find-links /tmp/wheels "
        f"'edgefleet[{extras}]'",
        '--customize-hook=rm -rf "$1"/tmp/wheels "$1"/var/lib/apt/lists/* "$1"/var/log/*',
        settings.suite, str(rootfs), *mirrors,
    ]  # fmt: skip
    _run(command, what="mmdebstrap", env={"SOURCE_DATE_EPOCH": str(settings.epoch)})


def _configure(settings: BuildSettings, rootfs: Path) -> None:
    cls = settings.device_class
    env = {"PYTHONPATH": str(SOURCE_ROOT)}
    _run([sys.executable, "-m", "edgefleet", "agent", "install", "--root", str(rootfs),
          "--python", f"{VENV}/bin/python", "--first-boot-file", FIRST_BOOT_FILE,
          # A device serves its models to the network (the API key guards it).
          "--serve-host", "0.0.0.0"], what="edgefleet agent install", env=env)
    network = rootfs / "etc/systemd/network/20-wired.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text("[Match]\nType=ether\n\n[Network]\nDHCP=yes\n")
    _run(["systemctl", f"--root={rootfs}", "enable", "systemd-networkd.service",
          "systemd-networkd-wait-online.service"], what="enabling systemd-networkd")
    (rootfs / "etc/hostname").write_text("edgefleet\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 edgefleet\n")
    # Empty: systemd makes a new id at each device's first boot (clones differ too).
    (rootfs / "etc/machine-id").write_text("")
    if cls.disk_image:
        (rootfs / "etc/fstab").write_text(disk.fstab(cls.name, settings.epoch))
        (rootfs / disk.ESP_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/edgefleet").mkdir(mode=0o700, exist_ok=True)
    (rootfs / "etc/edgefleet/image.json").write_text(json.dumps({
        "class": cls.name, "platform": cls.platform, "source_date_epoch": settings.epoch,
        "tags": dict(cls.tags)}, indent=2, sort_keys=True) + "\n")
    _clamp_times(rootfs, settings.epoch)


def _clamp_times(root: Path, epoch: int) -> None:
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(directory, name)
            if os.lstat(path).st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)


def _manifest(rootfs: Path) -> str:
    done = _run(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W",
                 "-f=${Package}\t${Version}\t${Architecture}\n"], what="listing packages")
    lines = ["# Debian packages: name, version, architecture"]
    lines += sorted(done.stdout.splitlines())
    lines.append(f"# Python distributions in {VENV}: name, version")
    site = next((rootfs / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    for info in sorted(site.glob("*.dist-info")):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        lines.append(f"{name}\t{version}")
    return "\n".join(lines) + "\n"


def _tar(rootfs: Path, out: Path, epoch: int) -> None:
    _run(["tar", "--create", "--file", str(out), "--directory", str(rootfs), "--sort=name",
          "--numeric-owner", "--xattrs", f"--mtime=@{epoch}", "--clamp-mtime", "."],
         what="archiving the root filesystem")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: Sequence[str], *, what: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=TIMEOUT,
                              env={**os.environ, **(env or {})}, check=False)
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"{what} did not finish in {TIMEOUT} s") from None
    except FileNotFoundError:
        raise FirmwareError(f"{what}: {command[0]} is not installed") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise FirmwareError(f"{what} failed:\n{tail}")
    return done


def default_epoch() -> int:
    """SOURCE_DATE_EPOCH if set, else the time of this source tree's last commit."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    done = subprocess.run(["git", "-C", str(SOURCE_ROOT), "log", "-1", "--format=%ct"],
                          capture_output=True, text=True, check=False)
    return int(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else 0
