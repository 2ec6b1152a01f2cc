"""Transport security with real clients: a hub with its own CA, HTTPS, a TLS broker that
knows devices by certificate, pinned enrollment, revocation, renewal."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from agent import identity as identities
from agent.mqtt import MqttTimeout, Session
from agent.renewal import renew_if_due
from agentproc import wait_for
from contract import signing, tls
from fleetdevice import FAST, connect, enroll
from hub.broker_certs import connack
from hub.pki import Authority
from hubproc import EDGEFLEET, HubProcess, start_hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = start_hub(tmp_path_factory.mktemp("tls") / "data", tls=True)
    yield process
    assert process.stop() == 0, process.log()


def admin(hub: HubProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {hub.admin_token}"}


def accepted(hub: HubProcess, context: ssl.SSLContext, client_id: str) -> bool:
    """Does the broker take a connection with CONTEXT's certificate?"""
    try:
        return connack("127.0.0.1", hub.mqtt_port, context, client_id, timeout=5)
    except (ssl.SSLError, ConnectionError):
        return False


def test_plain_text_clients_are_refused(hub: HubProcess) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{hub.port}/api/v1/health", timeout=5)
    with Session(f"mqtt://127.0.0.1:{hub.mqtt_port}", client_id="plain", backoff=FAST) as plain:
        with pytest.raises(MqttTimeout):
            plain.wait_connected(2)


def test_certificates_of_another_ca_are_refused(hub: HubProcess, tmp_path: Path) -> None:
    other = Authority(tmp_path / "other-ca")
    other.key_and_certificate(tmp_path / "k", tmp_path / "c", "edgefleet-hub", days=1)
    # MQTT: a client certificate the hub's CA did not issue, even for the hub's own name
    assert not accepted(hub, tls.client_context(hub.ca_path, tmp_path / "c", tmp_path / "k"),
                        "edgefleet-hub")
    # and a client that trusts another CA refuses the hub, REST and MQTT alike
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{hub.url}/api/v1/health", verify=tls.client_context(other.paths.ca_cert))
    fake = enroll(hub, "other-ca")
    wrong = tls.client_context(other.paths.ca_cert, *map(Path, fake["tls"][1:]))
    assert not accepted(hub, wrong, fake["device"]["id"])
    right = tls.client_context(*map(Path, fake["tls"]))
    assert accepted(hub, right, fake["device"]["id"])


def test_a_deleted_devices_connection_is_dropped_and_its_certificate_refused(
        hub: HubProcess) -> None:
    enrolled = enroll(hub, "revoked")
    device = connect(enrolled)
    device.session.wait_connected(15)
    context = tls.client_context(*map(Path, enrolled["tls"]))
    gone = httpx.delete(f"{hub.url}/api/v1/devices/{device.id}", headers=admin(hub))
    assert gone.status_code == 204, gone.text
    wait_for(lambda: not device.session.connected, timeout=10, what="the connection dropped")
    assert not accepted(hub, context, device.id)
    with pytest.raises(MqttTimeout):
        device.session.wait_connected(2)  # it keeps trying, and is refused
    device.session.close()
    # the others are untouched
    other = connect(enroll(hub, "still-here"))
    other.session.wait_connected(15)
    other.session.close()


def test_an_agent_enrolls_only_with_the_hub_its_token_pins(hub: HubProcess,
                                                            tmp_path: Path) -> None:
    token = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={},
                       headers=admin(hub)).json()["token"]
    secret, pin = tls.split_token(token)
    assert pin == tls.fingerprint(hub.ca_path.read_text())
    wrong = tls.pinned_token(secret, "0" * 64)
    done = subprocess.run(
        [*EDGEFLEET, "agent", "run", "--hub", hub.url, "--token-file", "-",
         "--data-dir", str(tmp_path / "device")], input=wrong, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pins" in lines[0] and "nothing was sent" in lines[0], done.stderr
    assert not (tmp_path / "device" / identities.IDENTITY_FILE).exists()
    # the token was not spent: the right pin enrolls with it
    identity = identities.enroll(tmp_path / "device", hub_url=hub.url, token=token,
                                 name="pinned", platform="linux/amd64")
    assert identity.tls and identity.mqtt_certificate and identity.mqtt_password == ""
    assert (tmp_path / "device" / identities.CA_FILE).read_text() == hub.ca_path.read_text()
    # a token without a pin is refused for an https hub
    with pytest.raises(identities.EnrollmentError, match="pins no CA"):
        identities.enroll(tmp_path / "other", hub_url=hub.url, token=secret, name="x",
                          platform="linux/amd64")


def test_a_certificate_is_renewed_once_a_third_of_its_validity_is_left(
        hub: HubProcess, tmp_path: Path) -> None:
    token = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={},
                       headers=admin(hub)).json()["token"]
    data = tmp_path / "device"
    identity = identities.enroll(data, hub_url=hub.url, token=token, name="renewing",
                                 platform="linux/amd64")
    before = tls.read_certificate((data / identities.CERT_FILE).read_text())
    context = identities.mqtt_tls(data, identity)
    assert not renew_if_due(data, identity, context)  # fresh: nothing to do
    # The look at its dates leaves cryptography out of the process that takes it (the
    # daemon's: ~8 MB it would hold from then on).
    look = ("import sys; from pathlib import Path; from agent import identity, renewal;"
            f" d = Path({str(data)!r}); i = identity.load(d);"
            " assert not renewal.renew_if_due(d, i, identity.mqtt_tls(d, i));"
            " print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    done = subprocess.run([sys.executable, "-c", look], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
    late = before.not_valid_after_utc - (before.not_valid_after_utc
                                         - before.not_valid_before_utc) / 3 + timedelta(hours=1)
    assert renew_if_due(data, identity, context, now=late)
    after = tls.read_certificate((data / identities.CERT_FILE).read_text())
    assert after.serial_number != before.serial_number
    assert after.not_valid_after_utc >= before.not_valid_after_utc
    assert after.subject == before.subject  # the same broker identity
    assert accepted(hub, context, identity.device_id)  # the context presents the new one
    # a device renews only its own certificate
    others = httpx.post(f"{hub.url}/api/v1/devices/dev-000000000000/certificate",
                        json={"csr": "x"},
                        headers={"Authorization": f"Bearer {identity.device_token}"})
    assert others.status_code == 403


def test_renewal_is_due_when_a_third_is_left() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = start + timedelta(days=90)
    assert not tls.renewal_due(start, end, start + timedelta(days=59))
    assert tls.renewal_due(start, end, start + timedelta(days=61))


def test_insecure_is_said_once_and_loudly(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "data", tls=False)
    try:
        assert hub.url.startswith("http://")
        warnings = [line for line in hub.log().splitlines() if "PLAIN TEXT" in line]
        assert len(warnings) == 1, hub.log()
        assert httpx.get(f"{hub.url}/api/v1/tls/ca").status_code == 404
    finally:
        assert hub.stop() == 0


def test_enrollment_tokens_and_requests_are_read_strictly() -> None:
    with pytest.raises(tls.TlsError, match="64"):
        tls.split_token("efe_abc.not-hex")
    assert tls.split_token("efe_abc") == ("efe_abc", None)
    with pytest.raises(tls.TlsError, match="not a PEM certificate request"):
        tls.read_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE "
                     "REQUEST-----\n")


def test_a_users_certificate_is_served_and_pinned(tmp_path: Path) -> None:
    users = Authority(tmp_path / "users-ca")
    cert, key = tmp_path / "hub.pem", tmp_path / "hub.key"
    users.key_and_certificate(key, cert, "hub.example", days=30,
                              hosts=["hub.example", "127.0.0.1"])
    cert.write_text(cert.read_text() + users.pem)  # the chain, its CA last
    hub = start_hub(tmp_path / "data", extra_args=("--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        assert hub.ca_path.read_text() == users.pem
        token = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={}, headers=admin(hub),
                           verify=hub.verify).json()["token"]
        assert tls.split_token(token)[1] == tls.fingerprint(users.pem)
        data = tmp_path / "device"
        identity = identities.enroll(data, hub_url=hub.url, token=token, name="users-ca",
                                     platform="linux/amd64")
        # the broker serves the user's certificate too; the device's own is the hub CA's
        assert accepted(hub, identities.mqtt_tls(data, identity), identity.device_id)
    finally:
        assert hub.stop() == 0, hub.log()


def test_a_certificate_request_that_is_no_p256_request_is_refused_before_the_token_is_used(
        hub: HubProcess) -> None:
    made = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={"max_uses": 1},
                      headers=admin(hub)).json()["token"]
    secret, _ = tls.split_token(made)
    key = signing.generate_private_key()
    body = {"token": secret, "name": "x", "public_key": signing.public_key_pem(key)}
    for csr in ("not a request", tls.build_csr(key).replace("A", "B", 3), "x" * 5000):
        refused = httpx.post(f"{hub.url}/api/v1/enroll", json={**body, "csr": csr})
        assert refused.status_code == 422, refused.text
        assert "\n" not in refused.json()["detail"]
    assert httpx.post(f"{hub.url}/api/v1/enroll",
                      json={**body, "csr": tls.build_csr(key)}).status_code == 201


def test_the_public_url_is_in_the_certificate_and_the_broker_url(tmp_path: Path) -> None:
    # The REST port given is not the one this test uses: only the host name matters here.
    hub = start_hub(tmp_path / "data", extra_args=("--public-url", "https://localhost:9"))
    try:
        token = httpx.post(f"{hub.url}/api/v1/enrollment-tokens", json={},
                           headers=admin(hub)).json()["token"]
        data = tmp_path / "device"
        identity = identities.enroll(data, hub_url=f"https://localhost:{hub.port}", token=token,
                                     name="by-name", platform="linux/amd64")
        assert identity.mqtt_url == f"mqtts://localhost:{hub.mqtt_port}"
        session = Session(identity.mqtt_url, client_id=identity.device_id, backoff=FAST)
        session.use_tls(identities.mqtt_tls(data, identity))
        with session:
            session.wait_connected(15)
    finally:
        assert hub.stop() == 0, hub.log()
