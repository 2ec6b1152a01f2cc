"""Enrollment tokens, enrollment, and the device list through the CLI."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from conftest import Cli
from contract import signing


def enroll(hub_url: str, token: str, name: str) -> httpx.Response:
    key = signing.public_key_pem(signing.generate_private_key())
    return httpx.post(
        f"{hub_url}/api/v1/enroll",
        json={"token": token, "public_key": key, "name": name, "platform": "linux/amd64"},
    )


def test_enrollment_token_lifecycle_and_device_tags(cli: Cli, api: httpx.Client) -> None:
    made = cli.json("device", "token", "create", "--tag", "site=berlin", "--max-uses", "2")
    assert made["token"].startswith("efe_") and made["tags"] == {"site": "berlin"}
    hub_url = str(api.base_url)
    first = enroll(hub_url, made["token"], "cam-1")
    assert first.status_code == 201, first.text
    answer = first.json()
    assert answer["hub_public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert answer["device"]["tags"] == {"site": "berlin"}
    assert enroll(hub_url, made["token"], "cam-2").status_code == 201
    spent = enroll(hub_url, made["token"], "cam-3")
    assert spent.status_code == 401 and "already used 2 times" in spent.json()["detail"]

    device_id = answer["device"]["id"]
    listed = cli.json("device", "list", "--tag", "site=berlin")
    assert {d["name"] for d in listed} >= {"cam-1", "cam-2"}
    cli.run("device", "tag", device_id, "arch=arm64", "site-")
    shown = cli.json("device", "show", device_id)
    assert shown["tags"] == {"arch": "arm64"}
    assert device_id not in {d["id"] for d in cli.json("device", "list", "--tag", "site=berlin")}
    tokens = {t["id"]: t for t in cli.json("device", "token", "list")}
    assert tokens[made["id"]]["uses"] == 2 and "token" not in tokens[made["id"]]


def test_expired_revoked_and_unknown_tokens_are_refused(cli: Cli, api: httpx.Client) -> None:
    hub_url = str(api.base_url)
    short = api.post("/api/v1/enrollment-tokens", json={"expires_in": 1}).json()
    time.sleep(1.2)
    expired = enroll(hub_url, short["token"], "late")
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    revoked = cli.json("device", "token", "create")
    cli.run("device", "token", "revoke", revoked["id"])
    assert "revoked" in enroll(hub_url, revoked["token"], "x").json()["detail"]
    assert enroll(hub_url, "efe_unknown", "x").status_code == 401
    malformed = httpx.post(f"{hub_url}/api/v1/enroll", json={"token": 5})
    assert malformed.status_code == 422


def test_device_errors(cli: Cli, api: httpx.Client) -> None:
    missing = cli.run("device", "show", "dev-nope", ok=False)
    assert "no device with id 'dev-nope'" in missing.stderr
    bad_tag = api.patch("/api/v1/devices/dev-nope/tags", json={"set": {"": "x"}})
    assert bad_tag.status_code == 422
    bad_duration = cli.run("device", "token", "create", "--expires", "soon", ok=False)
    assert "30m, 12h or 7d" in bad_duration.stderr


def test_enrollment_refuses_a_public_key_that_is_no_p256_key(cli: Cli, api: httpx.Client) -> None:
    made = cli.json("device", "token", "create", "--max-uses", "1")
    refused = httpx.post(f"{api.base_url}/api/v1/enroll", json={
        "token": made["token"], "public_key": "not a key", "name": "liar"})
    assert refused.status_code == 422 and "public_key" in refused.json()["detail"]
    # Nothing was used up: the token still enrolls a device with a real key.
    assert enroll(str(api.base_url), made["token"], "honest").status_code == 201


def test_an_agent_whose_serving_port_is_taken_says_so_before_enrolling(
        cli: Cli, api: httpx.Client, tmp_path: Path) -> None:
    made = cli.json("device", "token", "create")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = cli.run("agent", "run", "--hub", str(api.base_url), "--token-file", "-",
                         "--data-dir", str(tmp_path / "agent"), "--name", "second-agent",
                         "--serve-host", "127.0.0.1", "--serve-port", str(port), ok=False,
                         input=made["token"])
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"Error: port {port} on 127.0.0.1 is taken (another agent on this machine?); stop "
        "what uses it, or choose another with --serve-port"]
    # Nothing was enrolled: no orphan device, the token unused, no identity on disk.
    assert "second-agent" not in {d["name"] for d in cli.json("device", "list")}
    assert {t["id"]: t for t in cli.json("device", "token", "list")}[made["id"]]["uses"] == 0
    assert not (tmp_path / "agent" / "identity.json").exists()


def test_device_delete_asks_first_and_decommissions(cli: Cli, api: httpx.Client) -> None:
    made = cli.json("device", "token", "create", "--max-uses", "2")
    first = enroll(str(api.base_url), made["token"], "to-go").json()["device"]["id"]
    second = enroll(str(api.base_url), made["token"], "also-to-go").json()["device"]["id"]
    kept = cli.run("device", "delete", first, input="n\n", ok=False)
    assert kept.returncode == 1 and "Aborted" in kept.stderr
    assert cli.json("device", "show", first)["id"] == first
    gone = cli.run("device", "delete", first, input="y\n")
    assert f"Delete device {first} (to-go)?" in gone.stdout
    assert f"Deleted device {first} (to-go)" in gone.stdout
    assert "no device with id" in cli.run("device", "show", first, ok=False).stderr
    needs_yes = cli.run("device", "delete", second, "--json", ok=False)
    assert needs_yes.returncode == 2 and "add --yes" in needs_yes.stderr
    assert cli.json("device", "delete", second, "--yes") == {
        "id": second, "name": "also-to-go", "deleted": True}
    audit = api.get("/api/v1/audit").json()
    assert {(a["action"], a["target"]) for a in audit} >= {
        ("device.delete", first), ("device.delete", second)}
    missing = cli.run("device", "delete", "dev-nope", "--yes", ok=False)
    assert missing.stderr.count("\n") == 1 and "no device with id 'dev-nope'" in missing.stderr
