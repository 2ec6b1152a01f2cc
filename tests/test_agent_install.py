"""`edgefleet agent install` into a temporary root with the real systemd tools (sysusers,
systemctl --root, userdel --root, systemd-analyze verify), the enrollment file's strict
reader, and a real agent enrolling from an enrollment file against a real hub."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from agent import install as installer
from agent.identity import reachable_broker
from agentproc import enrollment_token, start_agent
from conftest import Cli
from contract import enrollment, tls
from hubproc import EDGEFLEET, HubProcess, stop_process

TOKEN = "efe_" + "s3cr3t-token_" * 3  # for a hub run with --insecure
PINNED = f"{TOKEN}.{'ab' * 32}"  # for a TLS hub: the token pins its CA


def edgefleet(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*EDGEFLEET, *args], capture_output=True, text=True, timeout=120)
    if ok and done.returncode != 0:
        raise AssertionError(done.stderr)
    return done


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def install_into(root: Path, token_file: Path) -> subprocess.CompletedProcess[str]:
    return edgefleet("agent", "install", "--root", str(root), "--hub", "https://10.0.2.2:8080/",
                     "--token-file", str(token_file), "--name", "shelf-7")


needs_systemd_tools = pytest.mark.skipif(
    not shutil.which("systemd-sysusers") or not shutil.which("systemctl"),
    reason="needs systemd's tools (systemd package)")


@needs_systemd_tools
def test_install_writes_a_root_only_enrollment_file_a_user_and_an_enabled_unit(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(PINNED + "\n")
    install_into(root, token_file)

    config = root / "etc/edgefleet/enrollment.conf"
    assert mode(config) == 0o600 and mode(config.parent) == 0o700
    assert (config.stat().st_uid, config.stat().st_gid) == (0, 0)
    assert enrollment.parse(config.read_text()) == enrollment.EnrollmentConfig(
        hub="https://10.0.2.2:8080", token=PINNED, name="shelf-7")
    unit = root / "etc/systemd/system/edgefleet-agent.service"
    text = unit.read_text()
    assert mode(unit) == 0o644 and TOKEN not in text
    assert "User=edgefleet" in text and "StateDirectory=edgefleet" in text
    assert "LoadCredential=enrollment:/etc/edgefleet/enrollment.conf" in text
    assert "Restart=on-failure" in text
    wanted = root / "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service"
    assert os.readlink(wanted) == "/etc/systemd/system/edgefleet-agent.service"
    passwd = (root / "etc/passwd").read_text()
    assert "edgefleet:x:" in passwd and ":/var/lib/edgefleet:/usr/sbin/nologin" in passwd
    # Every file the token is in is root's and 0600.
    for path in root.rglob("*"):
        if path.is_file() and TOKEN in path.read_text(errors="replace"):
            assert path == config

    if shutil.which("systemd-analyze"):
        verified = subprocess.run(["systemd-analyze", "verify", str(unit)],
                                  capture_output=True, text=True)
        assert verified.returncode == 0, verified.stderr


@needs_systemd_tools
def test_uninstall_reverses_install_and_keeps_the_identity_unless_purged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(PINNED)
    install_into(root, token_file)
    state = root / "var/lib/edgefleet"
    state.mkdir(parents=True)
    (state / "identity.json").write_text("{}")

    said = edgefleet("agent", "install", "--uninstall", "--root", str(root)).stdout
    assert "kept /var/lib/edgefleet" in said
    assert not (root / "etc/edgefleet").exists()
    assert not (root / "etc/systemd/system/edgefleet-agent.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service"
                ).is_symlink()
    assert not (root / "usr/lib/sysusers.d/edgefleet.conf").exists()
    assert "edgefleet:" not in (root / "etc/passwd").read_text()
    assert state.exists()

    edgefleet("agent", "install", "--uninstall", "--purge", "--root", str(root))
    assert not state.exists()


def test_install_on_this_machine_runs_systemctl_as_given(tmp_path: Path) -> None:
    """Root `/` drives the live systemd: daemon-reload, then enable --now (here a recorder)."""
    calls: list[list[str]] = []
    root = tmp_path / "root"
    config = enrollment.EnrollmentConfig(hub="http://hub:8080", token=TOKEN)
    settings = installer.UnitSettings(python="/opt/edgefleet/bin/python")
    installer.install(root, config, settings, systemctl=["systemctl"],
                      run=lambda argv: calls.append(list(argv)))
    assert calls[1:] == [["systemctl", f"--root={root}", "enable", installer.UNIT_NAME]]
    assert calls[0][0] == "systemd-sysusers"


def test_the_token_is_never_an_argument_and_bad_options_are_one_line(tmp_path: Path) -> None:
    done = edgefleet("agent", "install", "--root", str(tmp_path), "--hub", "http://h:1",
                     "--token", TOKEN, ok=False)
    assert done.returncode == 2 and "No such option '--token'" in done.stderr
    token_file = tmp_path / "token"
    token_file.write_text("not-a-token")
    done = edgefleet("agent", "install", "--root", str(tmp_path), "--hub", "http://h:1",
                     "--token-file", str(token_file), ok=False)
    assert done.returncode == 2 and "token: not an enrollment token" in done.stderr
    token_file.write_text(TOKEN)
    done = edgefleet("agent", "install", "--root", str(tmp_path), "--hub", "ftp://h",
                     "--token-file", str(token_file), ok=False)
    assert "hub: 'ftp://h' is no http(s)://host[:port] URL" in done.stderr
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("python", ["relative/python", "/root/venv/bin/python",
                                    "/opt/e f/bin/python", "/opt/%n/python"])
def test_unit_settings_refuse_what_the_service_could_not_run(python: str) -> None:
    with pytest.raises(installer.InstallError):
        installer.UnitSettings(python=python)


@pytest.mark.parametrize(("text", "error"), [
    ("", "hub: missing"),
    ("hub=http://h:1\nhub=http://h:2\n", "line 2: hub given twice"),
    ("hub=http://h:1\ntokn=efe_abcdefghij\n", "line 2: unknown key 'tokn'"),
    ("hub=http://h:1\njust a line\n", "line 2: expected key=value"),
    ("hub=http://h:1/api\n", "is no http(s)://host[:port] URL"),
    (f"hub=https://h:1\nca_fingerprint={'ab' * 32}\n", "line 2: no ca_fingerprint key: the token"),
    (f"hub=https://h:1\ntoken={TOKEN}\n", "token: this enrollment token pins no CA"),
    (f"hub=http://h:1\ntoken={PINNED}\n", "token: the token pins the hub's CA, but"),
    (f"hub=https://h:1\ntoken={TOKEN}.{'ab' * 31}\n", "token: the enrollment token's CA"),
    ("hub=http://h:1\ntoken=efe_short\n", "token: not an enrollment token"),
    ("hub=http://h:1\nname=../etc\n", "name: '../etc' is no device name"),
])
def test_the_enrollment_file_reader_is_strict(text: str, error: str) -> None:
    with pytest.raises(enrollment.EnrollmentFileError, match=None) as caught:
        enrollment.parse(text)
    assert error in str(caught.value)


def test_a_refused_token_is_never_repeated_in_the_error() -> None:
    with pytest.raises(enrollment.EnrollmentFileError) as caught:
        enrollment.parse("hub=http://h:1\ntoken=efe_" + "x" * 300 + "\n")
    assert "xxxx" not in str(caught.value)


def test_the_file_reads_back_as_written_with_comments_and_spaces() -> None:
    config = enrollment.parse(f"# provisioned\n hub = https://hub:8443 \ntoken={PINNED}\n")
    assert config.token == PINNED
    assert enrollment.parse(enrollment.render(config)) == config
    assert "token" not in enrollment.render(config.without_token())


def test_a_device_enrolls_from_the_file_tells_systemd_and_the_token_is_then_removed(
        hub: HubProcess, tmp_path: Path) -> None:
    token = enrollment_token(hub)
    config = tmp_path / "enrollment.conf"
    config.write_text(enrollment.render(enrollment.EnrollmentConfig(hub=hub.url, token=token,
                                                                    name="from-file")))
    config.chmod(0o600)
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(60)
        agent = start_agent(hub, tmp_path / "data", extra_args=("--enrollment-file", str(config)),
                            env={"NOTIFY_SOCKET": str(notify)})
        try:
            assert listener.recv(64) == b"READY=1"
            cmdline = Path(f"/proc/{agent.process.pid}/cmdline").read_bytes()
            assert token.encode() not in cmdline
            assert "Enrolled as" in agent.log()
        finally:
            stop_process(agent.process)
    edgefleet("agent", "forget-token", "--config", str(config), "--data-dir", str(agent.data_dir))
    assert mode(config) == 0o600
    assert enrollment.parse(config.read_text()).token is None
    assert enrollment.parse(config.read_text()).hub == hub.url


def test_a_bad_enrollment_file_is_one_line_and_an_unreachable_hub_is_retried(
        tmp_path: Path) -> None:
    config = tmp_path / "enrollment.conf"
    config.write_text("hub=http://127.0.0.1:9\ntoken=efe_abc\n")
    done = edgefleet("agent", "run", "--data-dir", str(tmp_path / "d"), "--enrollment-file",
                     str(config), ok=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: enrollment file {config}: token: not an enrollment token (efe_...)"]

    config.write_text(f"hub=http://127.0.0.1:9\ntoken={TOKEN}\n")
    with subprocess.Popen([*EDGEFLEET, "agent", "run", "--data-dir", str(tmp_path / "d"),
                           "--enrollment-file", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stderr is not None
            line = process.stderr.readline()
            assert "cannot reach the hub at http://127.0.0.1:9" in line and "trying again" in line
            assert process.poll() is None
        finally:
            stop_process(process)
    # At a terminal (--hub and --token) an unreachable hub is one line, not a wait.
    done = edgefleet("agent", "run", "--data-dir", str(tmp_path / "d"), "--hub",
                     "http://127.0.0.1:9", "--token", TOKEN, ok=False)
    assert done.returncode == 1
    assert done.stderr.startswith("warning: --token shows in the process list")
    assert done.stderr.splitlines()[1].startswith(
        "Error: cannot reach the hub at http://127.0.0.1:9")


def test_the_token_comes_from_stdin_or_the_environment_without_a_warning(
    tmp_path: Path,
) -> None:
    for how, extra, env in (("stdin", ("--token-file", "-"), {}),
                            ("env", (), {"EDGEFLEET_ENROLL_TOKEN": TOKEN})):
        done = subprocess.run(
            [*EDGEFLEET, "agent", "run", "--data-dir", str(tmp_path / how), "--hub",
             "http://127.0.0.1:9", *extra], input=TOKEN, capture_output=True, text=True,
            timeout=60, env={**os.environ, **env})
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("Error: cannot reach the hub at http://127.0.0.1:9"), how
    empty = subprocess.run(
        [*EDGEFLEET, "agent", "run", "--data-dir", str(tmp_path / "e"), "--hub",
         "http://127.0.0.1:9", "--token-file", "-"], input="", capture_output=True, text=True,
        timeout=60)
    assert empty.returncode == 2 and "the file holds no token" in empty.stderr


@pytest.mark.parametrize(("broker", "hub_url", "reached"), [
    ("mqtt://127.0.0.1:1883", "http://10.0.2.2:8080", "mqtt://10.0.2.2:1883"),
    ("mqtt://0.0.0.0:1883", "http://hub.lan:8080", "mqtt://hub.lan:1883"),
    ("mqtt://127.0.0.1:1883", "http://127.0.0.1:8080", "mqtt://127.0.0.1:1883"),
    ("mqtt://broker.lan:1883", "http://10.0.2.2:8080", "mqtt://broker.lan:1883"),
])
def test_a_broker_announced_on_loopback_is_reached_where_the_hub_was(
        broker: str, hub_url: str, reached: str) -> None:
    assert reachable_broker(broker, hub_url) == reached


def test_the_hub_cli_writes_an_enrollment_file_for_images(cli: Cli, hub: HubProcess,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "enrollment.conf"
    cli.run("device", "token", "create", "--max-uses", "5", "--image-config", str(path),
            "--device-hub", f"https://10.0.2.2:{hub.port}/")
    assert mode(path) == 0o600
    config = enrollment.parse(path.read_text())
    assert config.hub == f"https://10.0.2.2:{hub.port}" and config.token is not None
    assert tls.split_token(config.token)[1] == tls.fingerprint(hub.ca_path.read_text())
    done = cli.run("device", "token", "create", "--image-config", str(tmp_path / "plain.conf"),
                   "--device-hub", "http://10.0.2.2:8080", ok=False)
    assert done.returncode == 2 and "http://10.0.2.2:8080 is http, but the hub" in done.stderr
    assert not (tmp_path / "plain.conf").exists()
    cli.run("device", "token", "create", "--image-config", str(tmp_path / "default.conf"))
    assert enrollment.parse((tmp_path / "default.conf").read_text()).hub == hub.url
    done = cli.run("device", "token", "create", "--image-config", str(tmp_path / "bad.conf"),
                   "--device-hub", "ftp://x", ok=False)
    assert done.returncode == 2 and "--device-hub: hub: 'ftp://x' is no" in done.stderr
