"""`edgefleet hub serve` itself: first start, restart, secrets, shutdown, broker."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import httpx
import pytest

from bench.harness import enrollment_token, wait_for
from contract import signing
from hub.server import Bound, advertised
from hub.settings import HubSettings
from hubproc import start_hub
from smalldisk import small_disk


def test_first_start_creates_secrets_and_restart_reuses_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # made beforehand, readable by all: the hub closes it
    hub = start_hub(data)
    try:
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        key = data / "keys" / "hub-signing.key"
        token_file = data / "admin-token"
        for secret in (key, token_file):
            assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert str(token_file) in hub.log() and str(key) in hub.log()
        # the secrets themselves never reach the log
        assert hub.admin_token not in hub.log() and "PRIVATE KEY" not in hub.log()
        # the managed broker accepts MQTT connections; its logins are the owner's only
        with socket.create_connection(("127.0.0.1", hub.mqtt_port), timeout=5):
            pass
        for private in (data / "broker", data / "broker" / "crl.pem",
                        data / "tls", data / "tls" / "ca.key",
                        data / "tls" / "server.key", data / "tls" / "hub-client.key"):
            assert stat.S_IMODE(os.stat(private).st_mode) & 0o077 == 0, private
        first_key, first_token = key.read_bytes(), hub.admin_token
    finally:
        assert hub.stop(signal.SIGTERM) == 0
    again = start_hub(data)
    try:
        assert key.read_bytes() == first_key and again.admin_token == first_token
        assert "Created" not in again.log().split("Uvicorn running")[-1]
        ok = httpx.get(f"{again.url}/api/v1/whoami",
                       headers={"Authorization": f"Bearer {first_token}"})
        assert ok.json()["role"] == "admin"
        assert httpx.get(f"{again.url}/docs").status_code == 200
        assert "/api/v1/models" in httpx.get(f"{again.url}/openapi.json").json()["paths"]
    finally:
        assert again.stop(signal.SIGINT) == 0


def test_external_broker_url_skips_the_managed_one(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "data", extra_args=("--mqtt-url", "mqtt://127.0.0.1:1"))
    try:
        assert httpx.get(f"{hub.url}/api/v1/health").json()["mqtt_url"] == "mqtt://127.0.0.1:1"
        assert "external broker" in hub.log()
        assert not (tmp_path / "data" / "broker").exists()
    finally:
        assert hub.stop() == 0


def test_bad_mqtt_url_is_a_usage_error(tmp_path: Path) -> None:
    import subprocess

    from hubproc import EDGEFLEET

    done = subprocess.run(
        [*EDGEFLEET, "hub", "serve", "--data-dir", str(tmp_path), "--mqtt-url", "tcp://x"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "mqtt://HOST:PORT" in done.stderr


def test_a_second_hub_on_the_same_data_dir_or_port_exits_with_one_line(tmp_path: Path) -> None:
    import subprocess

    from hubproc import EDGEFLEET

    data = tmp_path / "data"
    first = start_hub(data)
    try:
        def second(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*EDGEFLEET, "hub", "serve", *args], capture_output=True,
                                  text=True, timeout=60)

        same_dir = second("--data-dir", str(data), "--port", "0", "--mqtt-port", "0")
        assert same_dir.returncode == 1, same_dir.stderr
        assert same_dir.stderr.strip() == (
            f"error: another hub (pid {first.process.pid}) is using {data}; stop it, or give "
            "this one another --data-dir")
        for flag, port in (("--port", first.port), ("--mqtt-port", first.mqtt_port)):
            ports = {"--port": "0", "--mqtt-port": "0", flag: str(port)}
            taken = second("--data-dir", str(tmp_path / f"other{flag}"),
                           *(part for option in ports.items() for part in option))
            assert taken.returncode == 1, taken.stderr
            assert taken.stderr.strip().endswith(f"choose another with {flag}"), taken.stderr
            assert "Traceback" not in taken.stderr and "REST API on" not in taken.stdout
        assert httpx.get(f"{first.url}/api/v1/health").status_code == 200
    finally:
        first.stop()
    # The lock dies with its process: the next start takes the data dir again.
    start_hub(data).stop()


def test_a_full_disk_is_a_507_that_stores_nothing_and_the_hub_goes_on(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "4m") as data:
        hub = start_hub(data)
        try:
            headers = {"Authorization": f"Bearer {hub.admin_token}"}
            too_big = os.urandom(6 * 2**20)
            full = httpx.post(f"{hub.url}/api/v1/blobs", content=too_big, headers=headers,
                              timeout=60)
            assert full.status_code == 507, full.text
            assert full.json()["error"] == "insufficient storage"
            assert "disk is full" in full.json()["detail"]
            assert list((data / "blobs" / "tmp").iterdir()) == []  # the partial upload is gone
            small = httpx.post(f"{hub.url}/api/v1/blobs", content=b"fits", headers=headers)
            assert small.status_code in (200, 201), small.text
        finally:
            assert hub.stop(signal.SIGTERM) == 0, hub.log()


def test_devices_get_reachable_addresses_never_a_wildcard(tmp_path: Path) -> None:
    machine = socket.gethostname()
    bound = Bound("http://0.0.0.0:8080", "mqtt://0.0.0.0:1883", managed_broker=True)
    plain = HubSettings(data_dir=tmp_path, host="0.0.0.0")
    assert advertised(plain, bound) == (f"http://{machine}:8080", f"mqtt://{machine}:1883")
    public = HubSettings(data_dir=tmp_path, host="0.0.0.0", public_url="https://hub.lan:443/")
    assert advertised(public, bound) == ("https://hub.lan:443", "mqtt://hub.lan:1883")
    both = HubSettings(data_dir=tmp_path, public_url="http://hub.lan:8080",
                       mqtt_public_url="mqtts://mq.lan:8883")
    loopback = Bound("http://127.0.0.1:8080", "mqtt://127.0.0.1:1883", managed_broker=True)
    assert advertised(both, loopback) == ("http://hub.lan:8080", "mqtts://mq.lan:8883")
    assert advertised(HubSettings(data_dir=tmp_path), loopback) == (
        "http://127.0.0.1:8080", "mqtt://127.0.0.1:1883")
    for flag, bad in (("public_url", "http://0.0.0.0:8080"), ("public_url", "hub.lan:8080"),
                      ("public_url", "http://hub.lan:8080/api/v1"),
                      ("public_url", "http://hub.lan"),
                      ("mqtt_public_url", "http://hub.lan:1883"),
                      ("mqtt_public_url", "mqtt://[::]:1883")):
        with pytest.raises(ValueError, match="must be an address devices reach"):
            HubSettings(data_dir=tmp_path, **{flag: bad})


def test_a_hub_on_every_interface_hands_devices_its_public_addresses(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "data", extra_args=("--host", "0.0.0.0"))
    try:
        told = httpx.get(f"{hub.url}/api/v1/health").json()["mqtt_url"]
        assert told == f"mqtts://{socket.gethostname()}:{hub.mqtt_port}"
        announced = [line for line in hub.log().splitlines()
                     if line.startswith(("REST API on", "MQTT on", "Log in with"))]
        assert len(announced) == 3 and f"MQTT on {told}" in announced[1]
        assert not any("0.0.0.0" in line for line in announced)
    finally:
        assert hub.stop(signal.SIGTERM) == 0
    hub = start_hub(tmp_path / "data", extra_args=(
        "--host", "0.0.0.0", "--public-url", "https://hub.example:9999"))
    try:
        token = enrollment_token(hub)
        key = signing.public_key_pem(signing.generate_private_key())
        enrolled = httpx.post(f"{hub.url}/api/v1/enroll", json={
            "token": token, "public_key": key, "name": "far", "platform": "linux/amd64"})
        assert enrolled.json()["mqtt"]["url"] == f"mqtts://hub.example:{hub.mqtt_port}"
        assert "edgefleet login --hub https://hub.example:9999" in hub.log()
    finally:
        assert hub.stop(signal.SIGTERM) == 0


def test_a_full_disk_is_answered_cleanly_and_the_lost_audit_said_once(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "8m") as data:
        hub = start_hub(data)
        try:
            with httpx.Client(base_url=hub.url, timeout=60,
                              headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
                filler = os.open(data / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    while os.write(filler, bytes(1 << 16)):
                        pass
                except OSError:
                    pass
                finally:
                    os.close(filler)
                for i in range(5):  # on one kept-alive connection
                    full = api.post("/api/v1/tokens", json={"name": f"t{i}", "role": "viewer"})
                    assert full.status_code == 507, full.text
                    assert full.json()["error"] == "insufficient storage"
                assert api.get("/api/v1/whoami").status_code == 200
                (data / "filler").unlink()
                after = api.post("/api/v1/tokens", json={"name": "after", "role": "viewer"})
                assert after.status_code == 201, after.text
            # The audit entry is written after the answer is sent: its log line may come later.
            log = wait_for(lambda: (text := hub.log()) and "audit entries are written again; 5"
                           " were lost" in text and text, what="the audit written again")
            assert log.count("audit entries cannot be written") == 1, log
            assert "Traceback" not in log
        finally:
            assert hub.stop(signal.SIGTERM) == 0, hub.log()
