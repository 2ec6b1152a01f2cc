"""What the CLI prints for people, against a real hub: hostile text stays text, and
wrong URLs, tokens and files fail with one clear line.

Names, tags and errors come from devices and other users: a device named `[/]`
must not crash a table (Rich markup), and a terminal escape in a name must be
shown, not obeyed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import Cli
from hub.cli.output import printable, safe
from hubproc import EDGEFLEET, HubProcess
from modelgen import make_onnx
from mosquitto import start_mosquitto

MARKUP = "[/]"
ESCAPE = "red\x1b[31m alarm\x07 [link=https://evil.example]click[/link]"
# Tag values refuse C0 controls at the hub; C1 CSI and bidi overrides get through.
TAG_VALUE = "[bold]x[/bold] \u202eevil \x9b31m"


def _enroll(hub: HubProcess, api: httpx.Client, name: str) -> str:
    token = api.post("/api/v1/enrollment-tokens", json={"tags": {"site": "lab"}}).json()["token"]
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    answer = httpx.post(f"{hub.url}/api/v1/enroll",
                        json={"token": token, "public_key": key, "name": name})
    answer.raise_for_status()
    return str(answer.json()["device"]["id"])


@pytest.fixture(scope="module")
def hostile(hub: HubProcess) -> Iterator[dict[str, str]]:
    """Two enrolled devices with hostile names, one with a hostile tag value."""
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    with httpx.Client(base_url=hub.url, headers=headers) as api:
        markup = _enroll(hub, api, MARKUP)
        escape = _enroll(hub, api, ESCAPE)
        api.patch(f"/api/v1/devices/{escape}/tags",
                  json={"set": {"note": TAG_VALUE}}).raise_for_status()
        yield {"markup": markup, "escape": escape}


def assert_shown_not_obeyed(out: str) -> None:
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "\u202e" not in out
    assert "\\x1b[31m" in out and "[link=https://evil.example]click[/link]" in out


def test_device_list_prints_hostile_names_as_text(cli: Cli, hostile: dict[str, str]) -> None:
    done = cli.run("device", "list")
    assert MARKUP in done.stdout and "Traceback" not in done.stderr
    assert_shown_not_obeyed(done.stdout)
    assert "\\u202eevil \\x9b31m" in done.stdout and "[bold]x[/bold]" in done.stdout


def test_device_show_and_tag_print_hostile_text_as_text(
    cli: Cli, hostile: dict[str, str]
) -> None:
    shown = cli.run("device", "show", hostile["markup"])
    assert f"name: {MARKUP}" in shown.stdout
    shown = cli.run("device", "show", hostile["escape"])
    assert_shown_not_obeyed(shown.stdout)
    tagged = cli.run("device", "tag", hostile["escape"], f"other={MARKUP}")
    assert f"other={MARKUP}" in tagged.stdout and "\\u202e" in tagged.stdout
    # JSON for scripts is left exactly as the hub sent it.
    assert cli.json("device", "show", hostile["escape"])["name"] == ESCAPE  # type: ignore[index]


def test_model_tags_and_hub_errors_are_text(cli: Cli, tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "model.onnx")
    cli.run("model", "register", str(model), "--name", "hostile", "--tag", f"note={MARKUP}")
    assert f"note={MARKUP}" in cli.run("model", "list", "hostile").stdout
    assert f"note={MARKUP}" in cli.run("model", "show", "hostile:1").stdout
    # The hub's error quotes the id it was given: escaped on the way to stderr too.
    missing = cli.run("device", "show", "dev-\x1b[2Jgone", ok=False)
    assert missing.returncode == 1 and "\x1b" not in missing.stderr
    assert "Traceback" not in missing.stderr


def test_safe_escapes_controls_and_format_characters_only() -> None:
    assert printable("plain [b] name ünïcode 名前") == "plain [b] name ünïcode 名前"
    assert printable("a\x1bb\u202ec\u2028d\x00\t") == "a\\x1bb\\u202ec\\u2028d\\x00\\x09"
    text = safe({"k": "[/]\x1b"})
    assert text.plain == "k=[/]\\x1b" and [s.style for s in text.spans] == ["reverse"]
    assert safe(None).plain == "" and safe(["a", 1]).plain == "a, 1"


def test_device_telemetry_works_without_kind(cli: Cli, hostile: dict[str, str]) -> None:
    assert cli.json("device", "telemetry", hostile["markup"]) == []


def test_missing_token_is_one_hint(cli: Cli) -> None:
    done = cli.run("model", "list", ok=False, env={"EDGEFLEET_TOKEN": ""})
    assert done.returncode == 1 and done.stderr.count("edgefleet login") == 1
    assert "no API token" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("given", "says"), [
    ("127.0.0.1:{port}", "has no scheme; did you mean http://127.0.0.1:{port}?"),
    ("http://127.0.0.1:{port}/api/v1", "has a path (/api/v1); give the hub's base URL: "
                                       "http://127.0.0.1:{port}"),
    ("ftp://127.0.0.1:{port}", "is not an http:// or https:// URL"),
])
def test_hub_urls_that_cannot_work_are_refused(
    cli: Cli, hub: HubProcess, given: str, says: str
) -> None:
    done = cli.run("model", "list", "--hub", given.format(port=hub.port), ok=False)
    assert done.returncode == 2 and says.format(port=hub.port) in done.stderr


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_an_mqtt_port_is_not_a_hub_and_fails_with_one_line(
    cli: Cli, hub: HubProcess, tmp_path: Path, broker: str
) -> None:
    """The hub's embedded broker reads an HTTP request and never answers; Mosquitto
    drops the connection. Either way: one line, in seconds, not a 60 s timeout."""
    mosquitto = start_mosquitto(tmp_path / "mosquitto") if broker == "mosquitto" else None
    port = mosquitto.port if mosquitto else hub.mqtt_port
    try:
        done = subprocess.run(
            [*EDGEFLEET, "model", "list", "--hub", f"http://127.0.0.1:{port}"],
            env=cli.env, capture_output=True, text=True, timeout=30,
        )
    finally:
        if mosquitto:
            mosquitto.stop()
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert f"http://127.0.0.1:{port} does not answer HTTP like an edgefleet hub" in done.stderr
    assert "MQTT broker" in done.stderr


def test_files_without_a_model_are_refused_unless_allowed(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04\x95\x00")
    refused = cli.run("model", "register", str(tmp_path / "model.pkl"), "--name", "pickled",
                      ok=False)
    assert refused.returncode == 1 and "none of the files (model.pkl) is a model" in refused.stderr
    assert "--allow-non-model" in refused.stderr
    assert cli.run("model", "list", "pickled", ok=False).returncode == 1  # nothing registered
    kept = cli.json("model", "register", str(tmp_path / "model.pkl"), "--name", "pickled",
                    "--allow-non-model")
    assert kept["framework"] is None  # type: ignore[index]


def test_help_examples_are_not_wrapped(cli: Cli) -> None:
    done = cli.run("device", "token", "create", "--help", env={"COLUMNS": "60"})
    assert ("Example: edgefleet device token create --tag site=berlin --expires 7d "
            "--max-uses 50") in done.stdout
