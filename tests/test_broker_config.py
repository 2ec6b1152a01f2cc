"""The managed broker's files, as built (Mosquitto reading them: tests/test_fleet_*.py)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path

from hub import broker_config
from hub.broker_config import BrokerConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_the_password_file_keeps_existing_devices_only_and_makes_the_hubs_login_afresh(
        ) -> None:
    hub = broker_config.hub_username("s3cret")
    old = broker_config.password_file({"dev-a": "$7$101$c2FsdA==$aGFzaA==",
                                       "dev-deleted": "$7$101$c2FsdA==$aGFzaA=="},
                                      hub_password="s3cret", canary="c1")
    logins = broker_config.parse_password_file(old + "garbage line\n\n")
    assert set(logins) == {hub, "edgefleet-canary", "dev-a", "dev-deleted"}
    kept = broker_config.device_logins(logins, {"dev-a", "dev-c", hub})
    assert set(kept) == {"dev-a", hub}
    new = broker_config.parse_password_file(
        broker_config.password_file(kept, hub_password="s3cret", canary="c2"))
    assert set(new) == {hub, "edgefleet-canary", "dev-a"}
    assert new["dev-a"] == logins["dev-a"] and new[hub] != logins[hub]


def test_the_hubs_login_is_no_name_anyone_could_present_as_a_client_id() -> None:
    hub = broker_config.hub_username("s3cret")
    assert hub.startswith("edgefleet-hub-") and hub != broker_config.hub_username("other")
    assert "s3cret" not in hub


def test_passwords_are_hashed_as_mosquitto_passwd_does(tmp_path: Path) -> None:
    line = broker_config.password_line("dev-a", "efd_token", b"\x01" * 12)
    _, _, iterations, salt, digest = line.split("$")
    expected = hashlib.pbkdf2_hmac("sha512", b"efd_token", base64.b64decode(salt),
                                   int(iterations))
    assert base64.b64decode(digest) == expected and "efd_token" not in line
    # mosquitto_passwd reads it back: changing another user leaves this line alone
    passwd = tmp_path / "passwd"
    passwd.write_text(line + "\n")
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "other", "pw"], check=True)
    assert line in passwd.read_text().splitlines()


def test_the_acl_confines_devices_to_their_own_topics_and_is_the_documented_one() -> None:
    acl = broker_config.acl(broker_config.HUB_USERNAME)  # as documented for an external broker
    lines = acl.splitlines()
    patterns = [line for line in lines if line.startswith("pattern ")]
    assert all("/devices/%u/" in line for line in patterns)
    assert not any("commands/" in line for line in patterns)  # no command results yet
    assert "pattern write edgefleet/v1/devices/%u/desired" not in lines
    documented = DOCS.read_text().split("# /etc/mosquitto/acl\n", 1)[1].split("```", 1)[0]
    assert documented.split() == acl.split()


def test_the_config_sets_every_limit() -> None:
    text = broker_config.mosquitto_conf(BrokerConfig(
        host="127.0.0.1", port=1883, directory=Path("/data/broker"), max_queued_messages=5000,
        user="edgefleet"))
    for line in ("allow_anonymous false", "listener 1883 127.0.0.1", "max_queued_messages 5000",
                 f"max_packet_size {broker_config.MAX_PACKET_BYTES}", "persistence true",
                 "use_username_as_clientid true", "password_file /data/broker/passwd",
                 "acl_file /data/broker/acl"):
        assert line in text.splitlines()
