"""The hub's OpenAPI document tells the truth: schemathesis, the real client, fuzzes a real
hub through it with every credential role (admin, operator, viewer, a device) and checks
that nothing answers 5xx and every answer conforms (status code declared, content type,
body schema). Examples are bounded and the seed fixed, so a run is repeatable.

The figures of each run (requests, failures) are printed, and written to
$EDGEFLEET_ARTIFACTS when it is set."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from contract import signing
from hubproc import HubProcess

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
EXAMPLES = 10  # per operation and phase; the coverage phase adds its own edge cases
ROLES = ("admin", "operator", "viewer", "device")


@pytest.fixture(scope="module")
def credentials(hub: HubProcess) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {hub.admin_token}"}
    found = {"admin": hub.admin_token}
    with httpx.Client(base_url=hub.url, headers=admin) as api:
        for role in ("operator", "viewer"):
            answer = api.post("/api/v1/tokens", json={"name": f"fuzz-{role}", "role": role})
            found[role] = answer.raise_for_status().json()["token"]
        token = api.post("/api/v1/enrollment-tokens", json={}).raise_for_status().json()["token"]
        enrolled = api.post("/api/v1/enroll", headers={"Authorization": ""}, json={
            "token": token, "name": "fuzz-device",
            "public_key": signing.public_key_pem(signing.generate_private_key())})
        found["device"] = enrolled.raise_for_status().json()["device_token"]
    return found


@pytest.mark.parametrize("role", ROLES)
def test_the_hub_answers_as_its_openapi_says(hub: HubProcess, credentials: dict[str, str],
                                             role: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{hub.url}/openapi.json",
         "--checks", CHECKS, "--header", f"Authorization: Bearer {credentials[role]}",
         "--max-examples", str(EXAMPLES), "--seed", "1", "--workers", "1", "--no-shrink",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
         *(("--tls-verify", str(hub.ca_path)) if hub.tls else ()),
         "--report", "json", "--report-json-path", str(report)],
        # In tmp_path: schemathesis keeps a crash cache in its working directory.
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert report.exists(), run.stdout + run.stderr
    result = json.loads(report.read_text())
    assert result["operations"] is not None, run.stdout[-3000:] + run.stderr[-3000:]
    figures = {"role": role, "operations": result["operations"]["tested"],
               "requests": result["test_cases"]["generated"],
               "failures": result["test_cases"]["unique_failures"],
               "errors": len(result["errors"]), "seconds": round(result["running_time"], 1)}
    print(f"schemathesis: {figures}")
    artifacts = os.environ.get("EDGEFLEET_ARTIFACTS")
    if artifacts:
        Path(artifacts, f"schemathesis-{role}.json").write_text(json.dumps(figures))
    assert run.returncode == 0 and figures["failures"] == 0 and figures["errors"] == 0, run.stdout
    assert figures["operations"] == result["operations"]["selected"] > 30
    assert "Traceback" not in hub.log()


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send REQUEST and read one response (headers and the Content-Length body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0] + b" " + body


def test_errors_leave_the_connection_open(hub: HubProcess) -> None:
    """One kept-alive connection: an oversized body, a body with no token, deep JSON, a
    number out of range; each answered, and the next request on it answered too."""
    auth = f"Authorization: Bearer {hub.admin_token}\r\n".encode()
    big = b"x" * (5 << 20)
    deep = b"[" * 100 + b"]" * 100
    requests = [
        (b"POST /api/v1/tokens HTTP/1.1\r\nHost: x\r\n" + auth
         + f"Content-Length: {len(big)}\r\n\r\n".encode() + big, b"413"),
        (b"POST /api/v1/tokens HTTP/1.1\r\nHost: x\r\n"
         + f"Content-Length: {len(big)}\r\n\r\n".encode() + big, b"401"),
        (b"POST /api/v1/tokens HTTP/1.1\r\nHost: x\r\n" + auth
         + f"Content-Type: application/json\r\nContent-Length: {len(deep)}\r\n\r\n".encode()
         + deep, b"400"),
        (b"GET /api/v1/devices?offset=1e20 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", b"422"),
        (b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", b"200"),
    ]
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", hub.port), timeout=30))
        if isinstance(hub.verify, ssl.SSLContext):
            sock = stack.enter_context(hub.verify.wrap_socket(sock, server_hostname="127.0.0.1"))
        for request, status in requests:
            answer = _exchange(sock, request)
            assert answer.split(b" ")[1] == status, answer[:300]
