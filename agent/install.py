"""`edgefleet agent install`: the agent as a systemd service on an existing Linux machine.

What is installed, all under ROOT (`/` on a device; a temporary directory in tests):

    etc/systemd/system/edgefleet-agent.service   the unit (unit_text)
    etc/edgefleet/enrollment.conf                hub, token (pins the CA): root, 0600
    usr/lib/sysusers.d/edgefleet.conf            the `edgefleet` system user

The agent runs as `edgefleet`, which cannot read the root-only enrollment file:
systemd hands it over with `LoadCredential=` as a private copy only the service sees,
so the token is never in a command line, the environment or a world-readable file.
The unit is `Type=notify`: the agent says READY once it has an identity, and only
then does `ExecStartPost=+` (as root) take the token out of the enrollment file.
State is `StateDirectory=edgefleet` (/var/lib/edgefleet, 0700, owned by the user).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from contract import enrollment
from contract.files import write_atomic, write_secret

UNIT_NAME = "edgefleet-agent.service"
FIRST_BOOT_UNIT = "edgefleet-enrollment.service"
USER = "edgefleet"
STATE_DIR = Path("/var/lib/edgefleet")
CONFIG_PATH = Path("/etc/edgefleet/enrollment.conf")
UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME
SYSUSERS_PATH = Path("/usr/lib/sysusers.d/edgefleet.conf")
FIRST_BOOT_PATH = Path("/etc/systemd/system") / FIRST_BOOT_UNIT
CREDENTIAL = "enrollment"

Runner = Callable[[Sequence[str]], None]


class InstallError(Exception):
    """The install or uninstall could not be done; the message says what to do."""


def run_command(argv: Sequence[str]) -> None:
    """Run ARGV; a failure is an InstallError naming the command and its last words."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise InstallError(f"{argv[0]} not found: this needs a systemd machine") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise InstallError(f"`{' '.join(argv)}` failed: {said[-1] if said else done.returncode}")


# Every option here was checked with the agent running under it (tests/test_firmware_boot.py
# boots it in the device image): it writes only its state directory and /tmp, binds a TCP
# port above 1024, talks TCP and unix sockets, and the serving child needs no new privileges.
# MemoryDenyWriteExecute stays off: onnxruntime and OpenVINO JIT-compile kernels.
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "CapabilityBoundingSet=",
    "UMask=0077",
)


@dataclass(frozen=True)
class UnitSettings:
    python: str  # the interpreter whose environment holds edgefleet
    serve_host: str = "127.0.0.1"
    serve_port: int = 8500
    # A device image: the enrollment file comes from this file on the boot partition at
    # first boot, and the agent's messages go to the console too (no one is logged in).
    first_boot_file: Path | None = None

    def __post_init__(self) -> None:
        for value in (self.python, self.serve_host, str(self.first_boot_file or "")):
            # A unit file is line-based and systemd expands % and $: refuse what would change it.
            if any(c in value for c in "\n\r%$\"' \\"):
                raise InstallError(f"{value!r} cannot be written into a unit file")
        if self.first_boot_file is not None and not self.first_boot_file.is_absolute():
            raise InstallError(f"the first-boot file must be absolute: {self.first_boot_file}")
        if not Path(self.python).is_absolute():
            raise InstallError(f"the interpreter path must be absolute, got {self.python!r}")
        if self.python.startswith(("/home/", "/root/", "/run/user/")):
            # ProtectHome= hides these from the service.
            raise InstallError(f"{self.python} is in a home directory, which the service cannot"
                               " see: install edgefleet in a venv such as /opt/edgefleet")
        if not 1 <= self.serve_port <= 65535:
            raise InstallError(f"serve port {self.serve_port} is out of range")


def unit_text(settings: UnitSettings) -> str:
    """The systemd unit; its paths are those of the machine it runs on (not ROOT)."""
    edgefleet = f"{settings.python} -m edgefleet"
    lines = [
        "# Written by `edgefleet agent install`; `edgefleet agent install --uninstall` removes it.",
        "[Unit]",
        "Description=edgefleet device agent",
        "Documentation=https://github.com/edgefleet/edgefleet",
        "Wants=network-online.target",
        "After=network-online.target time-sync.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"User={USER}",
        f"Group={USER}",
        f"StateDirectory={STATE_DIR.name}",
        "StateDirectoryMode=0700",
        f"LoadCredential={CREDENTIAL}:{CONFIG_PATH}",
        f"ExecStart={edgefleet} agent run --data-dir {STATE_DIR}"
        f" --enrollment-file %d/{CREDENTIAL}"
        f" --serve-host {settings.serve_host} --serve-port {settings.serve_port}",
        # '+': as root, to rewrite the root-only file; runs once the agent said READY.
        f"ExecStartPost=+{edgefleet} agent forget-token --config {CONFIG_PATH}"
        f" --data-dir {STATE_DIR}",
        "Restart=on-failure",
        "RestartSec=15s",
        # Waiting for the network or a hub at first boot is no failure to start.
        "TimeoutStartSec=infinity",
        "Environment=PYTHONUNBUFFERED=1",
        *(["StandardOutput=journal+console"] if settings.first_boot_file else []),
        *HARDENING,
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def first_boot_text(settings: UnitSettings) -> str:
    """The oneshot that moves the boot partition's enrollment file to the root-only one."""
    assert settings.first_boot_file is not None
    source = settings.first_boot_file
    return "\n".join([
        "# Written by `edgefleet agent install --first-boot-file` for device images.",
        "[Unit]",
        "Description=edgefleet: take the enrollment file from the boot partition",
        f"Before={UNIT_NAME}",
        f"RequiresMountsFor={source.parent}",
        f"ConditionPathExists={source}",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={settings.python} -m edgefleet agent take-enrollment --from {source}"
        f" --to {CONFIG_PATH}",
        "StandardOutput=journal+console",
        "StandardError=journal+console",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def sysusers_text() -> str:
    return f'u {USER} - "edgefleet device agent" {STATE_DIR} /usr/sbin/nologin\n'


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def install(
    root: Path, config: enrollment.EnrollmentConfig | None, settings: UnitSettings,
    *, systemctl: Sequence[str], run: Runner = run_command, start: bool = True,
) -> list[str]:
    """Write the unit, the user and the enrollment file under ROOT, then enable (and start).

    Returns what was done, one line each. ROOT other than / only writes files and tells
    systemctl `--root`, for images and tests. CONFIG None: a device image, whose
    enrollment file comes from the boot partition (settings.first_boot_file)."""
    done = []
    units = [UNIT_NAME]
    if config is None:
        if settings.first_boot_file is None:
            raise InstallError("an enrollment token is needed: give --token-file")
        first_boot = _under(root, FIRST_BOOT_PATH)
        first_boot.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(first_boot, first_boot_text(settings).encode())
        units.append(FIRST_BOOT_UNIT)
        done.append(f"wrote {FIRST_BOOT_PATH} (takes {settings.first_boot_file} at boot)")
    else:
        config_path = _under(root, CONFIG_PATH)
        config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_path.parent.chmod(0o700)
        write_secret(config_path, enrollment.render(config))
        done.append(f"wrote {CONFIG_PATH} (root only)")
    sysusers = _under(root, SYSUSERS_PATH)
    sysusers.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(sysusers, sysusers_text().encode())
    run(["systemd-sysusers", *_root_flag(root), str(sysusers)])
    done.append(f"user {USER} ({SYSUSERS_PATH})")
    unit = _under(root, UNIT_PATH)
    unit.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(unit, unit_text(settings).encode())
    done.append(f"wrote {UNIT_PATH}")
    if root == Path("/"):
        run([*systemctl, "daemon-reload"])
        run([*systemctl, "enable", *(["--now"] if start else []), *units])
        done.append(f"enabled {UNIT_NAME}" + (" and started it" if start else ""))
    else:
        run([*systemctl, *_root_flag(root), "enable", *units])
        done.append(f"enabled {', '.join(units)} (starts at the next boot)")
    return done


def uninstall(
    root: Path, *, systemctl: Sequence[str], run: Runner = run_command, purge: bool = False,
) -> list[str]:
    """Stop and disable the service and remove what `install` wrote; PURGE also removes the
    state (the device's identity: it must then enroll again with a new token)."""
    done = []
    for name, path in ((UNIT_NAME, UNIT_PATH), (FIRST_BOOT_UNIT, FIRST_BOOT_PATH)):
        unit = _under(root, path)
        if not unit.exists():
            continue
        if root == Path("/"):
            run([*systemctl, "disable", "--now", name])
        else:
            run([*systemctl, *_root_flag(root), "disable", name])
        unit.unlink()
        done.append(f"disabled and removed {name}")
    if root == Path("/") and done:
        run([*systemctl, "daemon-reload"])
    for path in (CONFIG_PATH, SYSUSERS_PATH):
        target = _under(root, path)
        if target.exists():
            target.unlink()
            done.append(f"removed {path}")
    config_dir = _under(root, CONFIG_PATH.parent)
    if config_dir.is_dir() and not any(config_dir.iterdir()):
        config_dir.rmdir()
    if _user_exists(root):
        run(["userdel", *(["--root", str(root)] if root != Path("/") else []), USER])
        done.append(f"removed user {USER}")
    state = _under(root, STATE_DIR)
    if purge and state.exists():
        shutil.rmtree(state)
        done.append(f"removed {STATE_DIR} (this device's identity)")
    elif state.exists():
        done.append(f"kept {STATE_DIR} (the device's identity; --purge removes it)")
    return done


def _root_flag(root: Path) -> list[str]:
    return [] if root == Path("/") else [f"--root={root}"]


def _user_exists(root: Path) -> bool:
    passwd = _under(root, Path("/etc/passwd"))
    return passwd.exists() and any(
        line.split(":", 1)[0] == USER for line in passwd.read_text().splitlines())

