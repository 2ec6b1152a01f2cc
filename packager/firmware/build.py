"""`edgefleet firmware build CLASS`: a device's bootable disk image or root filesystem.

Steps, each cached or cheap on a second run (cache: ~/.cache/edgefleet/firmware):

1. wheels: edgefleet's own wheel, built from this source tree, and every wheel
   `edgefleet[agent,<runtime extras>]` needs for the class's platform (pip download
   for CPython 3.11 manylinux, as packager/deps.py chooses them), cached by platform,
   extras and pyproject.toml;
2. root filesystem: mmdebstrap (minbase + systemd, Python, the kernel and
   systemd-boot for disk images, the class's accelerator packages); its .debs are
   kept in the cache, so a warm build downloads nothing. The initramfs is built once,
   after every package is in (_initramfs_hooks). In the chroot a venv at
   /opt/edgefleet gets the wheels, offline (their bytecode compiled by this Python);
3. the agent as a service: `edgefleet agent install --root ROOTFS --first-boot-file
   /boot/efi/edgefleet/enrollment.conf` (the same installer as on a running machine),
   networkd with DHCP on every wired interface, an empty machine-id (each device makes
   its own at first boot), /etc/edgefleet/image.json (class and build);
4. outputs in OUT: CLASS.img for a class with disk_image (amd64 or arm64; GPT: EFI
   system partition with systemd-boot, kernel and initrd; ext4 root) or CLASS-rootfs.tar,
   CLASS.packages.txt (every Debian package and Python distribution with its version)
   and CLASS.json (what was built, sizes, sha256).

A built image is kept in the cache too (images/CLASS/KEY/), KEY a hash of every input: the
class, the contents of edgefleet's wheel, this build code, the Debian package selection,
suite, mirrors and epoch, and the dependency wheels' key. A build whose inputs hash to a
kept KEY copies the kept image instead of running mmdebstrap (`--rebuild` builds anyway);
one image per class is kept. The mirror's contents are no input: a kept image has the
package versions of the day it was built (CLASS.packages.txt lists them).

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
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
# A bootable disk: Debian's kernel (the platform's, disk.BOOT_PLATFORMS) and initramfs, and
# systemd-boot's EFI binary.
DISK_PACKAGES = ("initramfs-tools", "systemd-boot-efi")
TIMEOUT = 60 * 60
DONE = "complete"  # written last into a kept image's directory
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
    rebuild: bool = False  # build even when the image cache holds this build's inputs

    @property
    def packages(self) -> tuple[str, ...]:
        cls = self.device_class
        disk_packages = ((disk.boot_platform(cls.platform).kernel_package, *DISK_PACKAGES)
                         if cls.disk_image else ())
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
    with tempfile.TemporaryDirectory(prefix="edgefleet-firmware-") as work_name:
        work = Path(work_name)
        started = time.monotonic()
        log(f"wheels for {cls.platform} (edgefleet[{','.join(cls.extras)}])")
        wheels, deps_key = _wheels(settings, work / "wheels")
        wheels_seconds = time.monotonic() - started
        kept = settings.cache_dir / "images" / cls.name / image_key(settings, wheels, deps_key)
        if not settings.rebuild and (kept / DONE).is_file():
            log(f"cached image {kept} (built before from the same inputs)")
            _copy_outputs(kept, settings.out_dir, cls)
            return _result(settings.out_dir, cls, {})
        seconds = {"wheels": wheels_seconds, **_build(settings, work, wheels, log)}
    image = settings.out_dir / _image_name(cls)
    (settings.out_dir / f"{cls.name}.json").write_text(json.dumps({
        "class": cls.name, "platform": cls.platform, "suite": settings.suite,
        "mirror": settings.mirror, "source_date_epoch": settings.epoch,
        "image": image.name, "size": image.stat().st_size,
        "allocated": image.stat().st_blocks * 512, "sha256": _sha256(image),
        "enrollment_file": FIRST_BOOT_FILE if cls.disk_image else None,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }, indent=2, sort_keys=True) + "\n")
    _keep(settings.out_dir, kept, cls)
    return _result(settings.out_dir, cls, seconds)


def _build(settings: BuildSettings, work: Path, wheels: Path, log: Log) -> dict[str, float]:
    """The root filesystem, then the image and its package list in OUT; seconds per step."""
    cls = settings.device_class
    seconds: dict[str, float] = {}
    started = time.monotonic()
    rootfs = work / "rootfs"
    log(f"root filesystem: mmdebstrap {settings.suite} {cls.debian_architecture}")
    _mmdebstrap(settings, rootfs, wheels)
    _configure(settings, rootfs)
    seconds["rootfs"] = time.monotonic() - started
    (settings.out_dir / f"{cls.name}.packages.txt").write_text(_manifest(rootfs))
    started = time.monotonic()
    image = settings.out_dir / _image_name(cls)
    if cls.disk_image:
        log(f"disk image {image}")
        disk.make_disk(rootfs, image, work, name=cls.name, epoch=settings.epoch,
                       platform=cls.platform)
    else:
        log(f"root filesystem archive {image}")
        _tar(rootfs, image, settings.epoch)
    seconds["image"] = time.monotonic() - started
    shutil.rmtree(rootfs)
    return seconds


def _image_name(cls: DeviceClass) -> str:
    return f"{cls.name}.img" if cls.disk_image else f"{cls.name}-rootfs.tar"


def _outputs(cls: DeviceClass) -> tuple[str, ...]:
    return _image_name(cls), f"{cls.name}.packages.txt", f"{cls.name}.json"


def _result(out_dir: Path, cls: DeviceClass, seconds: dict[str, float]) -> BuildResult:
    image, packages, info = (out_dir / name for name in _outputs(cls))
    return BuildResult(image, packages, info, seconds)


def image_key(settings: BuildSettings, wheels: Path, deps_key: str) -> str:
    """The hash of every input of a build but the mirror's contents (see the docstring)."""
    [own] = wheels.glob("edgefleet-*.whl")
    code = sorted([*Path(__file__).parent.glob("*.py"),
                   SOURCE_ROOT / "agent" / "install.py", SOURCE_ROOT / "packager" / "deps.py"])
    return hashlib.sha256(canonical_json({
        "class": asdict(settings.device_class), "suite": settings.suite,
        "mirror": settings.mirror, "security_mirror": settings.security_mirror,
        "packages": list(settings.packages), "epoch": settings.epoch,
        "dependencies": deps_key, "wheel": _wheel_digest(own),
        "code": {p.relative_to(SOURCE_ROOT).as_posix(): _sha256(p) for p in code},
    })).hexdigest()[:32]


def _wheel_digest(wheel: Path) -> str:
    """SHA-256 over a wheel's member names and contents (not its zip time stamps)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(archive.namelist()):
            digest.update(member.encode() + b"\0")
            digest.update(hashlib.sha256(archive.read(member)).digest())
    return digest.hexdigest()


def _copy_outputs(source: Path, target: Path, cls: DeviceClass) -> None:
    for name in _outputs(cls):
        # --sparse=always: a disk image is mostly holes, and stays so.
        _run(["cp", "--sparse=always", str(source / name), str(target / name)],
             what=f"copying {name}")


def _keep(out_dir: Path, kept: Path, cls: DeviceClass) -> None:
    """OUT's image in the cache as KEPT, replacing the class's older ones (they are large)."""
    for old in kept.parent.glob("*"):
        shutil.rmtree(old, ignore_errors=True)
    kept.mkdir(parents=True)
    _copy_outputs(out_dir, kept, cls)
    (kept / DONE).write_text("")  # last: an interrupted copy is no cache entry


def _wheels(settings: BuildSettings, into: Path) -> tuple[Path, str]:
    """edgefleet's wheel (built now) beside its dependencies' (cached) in one directory, and
    the dependencies' cache key."""
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
    return own, key


def _mmdebstrap(settings: BuildSettings, rootfs: Path, wheels: Path) -> None:
    cls = settings.device_class
    debs = settings.cache_dir / "debs" / f"{settings.suite}-{cls.debian_architecture}"
    debs.mkdir(parents=True, exist_ok=True)
    mirrors = [f"deb {settings.mirror} {settings.suite} main"]
    if settings.security_mirror:
        mirrors.append(f"deb {settings.security_mirror} {settings.suite}-security main")
    extras = ",".join(cls.extras)
    # The venv's bytecode: compiled by this (host) interpreter when it is the target's
    # version (same bytecode), since pip compiling it through qemu-user takes minutes.
    host_compiles = f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON_VERSION
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
        *(_initramfs_hooks(cls) if cls.disk_image else ()),
        # The agent: a venv with the wheels, installed offline.
        f'--customize-hook=mkdir -p "$1"/tmp/wheels && cp {wheels}/*.whl "$1"/tmp/wheels/',
        f'--customize-hook=chroot "$1" python3 -m venv {VENV}',
        f'--customize-hook=chroot "$1" {VENV}/bin/pip install --quiet --no-index '
        f"--no-cache-dir --disable-pip-version-check --find-links /tmp/wheels "
        f"{'--no-compile ' if host_compiles else ''}'edgefleet[{extras}]'",
        *((f'--customize-hook={_host_compile("$1")}',) if host_compiles else ()),
        '--customize-hook=rm -rf "$1"/tmp/wheels "$1"/var/lib/apt/lists/* "$1"/var/log/*',
        settings.suite, str(rootfs), *mirrors,
    ]  # fmt: skip
    _run(command, what="mmdebstrap", env={"SOURCE_DATE_EPOCH": str(settings.epoch)})


def _initramfs_hooks(cls: DeviceClass) -> tuple[str, ...]:
    """mmdebstrap options that build the initramfs once, after every package is installed.

    Installing them builds it twice (the kernel's postinst hook, then initramfs-tools'
    trigger), each run ~40 min for arm64 through qemu-user: while the packages install,
    update-initramfs is diverted to a no-op (host dpkg-divert on the tree, no emulation);
    then the real one is back and runs once, with the platform's module set
    (disk.BootPlatform.initramfs_modules) in conf.d, where a later kernel upgrade on the
    device finds it too.
    """
    command = "/usr/sbin/update-initramfs"
    divert = f'dpkg-divert --root="$1" --local --rename --divert {command}.edgefleet'
    hooks = [
        f"--essential-hook={divert} --add {command} && "
        f"printf '#!/bin/sh\\nexit 0\\n' > \"$1\"{command} && chmod 755 \"$1\"{command}",
        f'--customize-hook=rm "$1"{command} && {divert} --remove {command}',
    ]
    modules = disk.boot_platform(cls.platform).initramfs_modules
    if modules:
        hooks.append(
            "--customize-hook=echo MODULES=list > \"$1\"/etc/initramfs-tools/conf.d/edgefleet"
            " && mkdir -p \"$1\"/usr/share/initramfs-tools/modules.d && "
            f"printf '%s\\n' {' '.join(modules)} > "
            '"$1"/usr/share/initramfs-tools/modules.d/edgefleet')
    hooks.append('--customize-hook=chroot "$1" update-initramfs -c -k all')
    return tuple(hooks)


def _host_compile(root: str) -> str:
    """The command compiling the venv's modules in the tree ROOT as pip would on the device:
    checked-hash .pyc files (valid whatever the files' times), named by their path there. A
    module that does not compile (a file for another Python) is skipped, as pip skips it."""
    return (f"{sys.executable} -m compileall -q -j 0 --invalidation-mode checked-hash "
            f'-s "{root}" -p / "{root}"{VENV}/lib || true')


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
