"""Roles and tokens: viewer reads, operator writes, admin manages tokens."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest

from conftest import Cli
from hubproc import HubProcess


def client_for(hub: HubProcess, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=hub.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def role_tokens(hub: HubProcess) -> dict[str, str]:
    with client_for(hub, hub.admin_token) as admin:
        return {
            role: admin.post(
                "/api/v1/tokens", json={"name": f"t-{role}", "role": role}
            ).json()["token"]
            for role in ("viewer", "operator")
        }


def test_missing_or_unknown_token_is_401(hub: HubProcess) -> None:
    with client_for(hub, None) as anonymous:
        response = anonymous.get("/api/v1/models")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["detail"]
    with client_for(hub, "eft_made-up") as stranger:
        assert stranger.get("/api/v1/models").status_code == 401
    with client_for(hub, None) as anonymous:
        assert anonymous.get("/api/v1/health").status_code == 200


def test_viewer_reads_but_cannot_write(hub: HubProcess, role_tokens: dict[str, str]) -> None:
    with client_for(hub, role_tokens["viewer"]) as viewer:
        assert viewer.get("/api/v1/models").status_code == 200
        assert viewer.get("/api/v1/devices").status_code == 200
        denied = viewer.post("/api/v1/blobs", content=b"x")
        assert denied.status_code == 403
        assert "operator role" in denied.json()["detail"]
        assert viewer.post("/api/v1/enrollment-tokens", json={}).status_code == 403
        assert viewer.delete("/api/v1/models/any/versions/1").status_code == 403


def test_operator_writes_but_only_admin_manages_tokens(
    hub: HubProcess, role_tokens: dict[str, str]
) -> None:
    with client_for(hub, role_tokens["operator"]) as operator:
        digest = operator.post("/api/v1/blobs", content=b"op").json()["digest"]
        made = operator.post(
            "/api/v1/models/by-operator/versions", json={"files": [{"path": "w", "digest": digest}]}
        )
        assert made.status_code == 201 and made.json()["created_by"] == "t-operator"
        denied = operator.post("/api/v1/tokens", json={"name": "x", "role": "admin"})
        assert denied.status_code == 403 and "admin role" in denied.json()["detail"]
        assert operator.get("/api/v1/tokens").status_code == 403


def test_revoked_token_stops_working(hub: HubProcess, cli: Cli) -> None:
    made = cli.json("token", "create", "short-lived", "--role", "viewer")
    assert made["token"].startswith("eft_")
    with client_for(hub, made["token"]) as c:
        assert c.get("/api/v1/whoami").json()["role"] == "viewer"
        cli.run("token", "revoke", made["id"])
        revoked = c.get("/api/v1/whoami")
        assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    listed = {t["id"]: t for t in cli.json("token", "list")}
    assert listed[made["id"]]["revoked_at"]
    assert all("token_hash" not in t and "token" not in t for t in listed.values())


def test_tokens_take_an_expiry(hub: HubProcess, cli: Cli) -> None:
    made = cli.json("token", "create", "for-a-month", "--expires", "30d")
    assert made["expires_at"][:4].isdigit()
    with client_for(hub, made["token"]) as c:
        assert c.get("/api/v1/whoami").json()["name"] == "for-a-month"
    listed = {t["id"]: t for t in cli.json("token", "list")}
    assert listed[made["id"]]["expires_at"] == made["expires_at"]
    bad = cli.run("token", "create", "x", "--expires", "soon", ok=False)
    assert bad.returncode == 2 and "--expires" in bad.stderr and "30m, 12h or 7d" in bad.stderr


def test_unknown_role_is_rejected(cli: Cli, api: httpx.Client) -> None:
    response = api.post("/api/v1/tokens", json={"name": "x", "role": "root"})
    assert response.status_code == 422 and "unknown role" in response.json()["detail"]
    bad = cli.run("token", "create", "x", "--role", "root", ok=False)
    assert bad.returncode == 2 and "root" in bad.stderr


def test_login_saves_config_and_later_commands_use_it(
    hub: HubProcess, cli: Cli, tmp_path: Path
) -> None:
    env = {"EDGEFLEET_HUB": "", "EDGEFLEET_TOKEN": ""}
    cli.run("login", "--hub", hub.url, "--token-file", str(hub.data_dir / "admin-token"), env=env)
    config = Path(cli.env["EDGEFLEET_CONFIG"])
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    clean = {k: v for k, v in cli.env.items() if k not in ("EDGEFLEET_HUB", "EDGEFLEET_TOKEN")}
    cli.env = clean
    assert cli.json("token", "list")
    wrong = cli.run("login", "--hub", hub.url, "--token", "eft_wrong", ok=False)
    assert "unknown API token" in wrong.stderr


def test_audit_log_records_who_did_what(cli: Cli, api: httpx.Client, role_tokens: dict[str, str],
                                        hub: HubProcess) -> None:
    with client_for(hub, role_tokens["viewer"]) as viewer:
        viewer.post("/api/v1/enrollment-tokens", json={})
    api.post("/api/v1/tokens", json={"name": "audited", "role": "viewer"})
    entries = cli.json("audit", "--limit", "200")
    denied = [e for e in entries if e["actor"] == "t-viewer" and e["result"] == "denied"]
    assert denied and denied[0]["status"] == 403
    created = [e for e in entries if e["action"] == "token.create" and e["target"] == "audited"]
    assert created and created[0]["actor"] == "admin" and created[0]["result"] == "ok"
    assert all({"at", "actor", "action", "target", "result"} <= set(e) for e in entries)
    assert cli.json("audit", "--action", "token.")[0]["action"].startswith("token.")
