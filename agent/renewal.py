"""The device's broker certificate, renewed before it expires with no operator action.

Once less than a third of its validity remains (`contract.tls.renewal_due`)
the agent sends the hub a new certificate request for its key over
authenticated REST (its device token, the pinned CA) and keeps the answer.
The MQTT session's TLS context loads it, so the next connection presents
it; the open one carries on. A hub that cannot be reached is asked again at
the next check: the old certificate is still valid for a third of its life.

The hourly look at the certificate's dates is taken in a child process
(`python -m agent.renewal CERT`): reading a certificate loads cryptography
(~8 MB), which the daemon would hold from then on; only a renewal loads it
in the daemon. contract.tls itself (ssl, OpenSSL) is loaded only by an agent
that has a certificate: one on plain MQTT never needs it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.identity import CERT_FILE, KEY_FILE, Identity, hub_tls
from contract.files import write_secret

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("edgefleet.agent.renewal")

CHECK_EVERY = 3600.0  # seconds between looks at the certificate's expiry
# The first look comes a while after start: it costs a child process.
FIRST_CHECK = 600.0


def validity(cert_path: Path) -> tuple[datetime, datetime]:
    """CERT_PATH's not-before and not-after, read in a child process (see above)."""
    done = subprocess.run([sys.executable, "-m", "agent.renewal", str(cert_path)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ValueError(done.stderr.strip()[-500:] or f"exit code {done.returncode}")
    not_before, not_after = json.loads(done.stdout)
    return datetime.fromisoformat(not_before), datetime.fromisoformat(not_after)


def renew_if_due(data_dir: Path, identity: Identity, context: ssl.SSLContext | None,
                 now: datetime | None = None) -> bool:
    """Renew DATA_DIR's certificate if due, loading it into CONTEXT; True if renewed."""
    cert_path, key_path = data_dir / CERT_FILE, data_dir / KEY_FILE
    if not identity.mqtt_certificate:
        return False
    from contract import tls

    try:
        not_before, not_after = validity(cert_path)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("could not read the broker certificate's validity: %s; trying again in "
                    "%.0f s", exc, CHECK_EVERY)
        return False
    if not tls.renewal_due(not_before, not_after, now or datetime.now(UTC)):
        return False
    import httpx  # only now: the daemon stays small without them

    from contract import signing

    csr = tls.build_csr(signing.load_private_key(key_path))
    try:
        response = httpx.post(
            f"{identity.hub_url}/api/v1/devices/{identity.device_id}/certificate",
            json={"csr": csr}, headers={"Authorization": f"Bearer {identity.device_token}"},
            verify=hub_tls(data_dir, identity), timeout=30)
        response.raise_for_status()
        pem = str(response.json()["certificate"])
        renewed = tls.read_certificate(pem)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.warning("could not renew the broker certificate (valid until %s): %s; trying again "
                    "in %.0f s", not_after, exc, CHECK_EVERY)
        return False
    write_secret(cert_path, pem)
    if context is not None:
        context.load_cert_chain(str(cert_path), str(key_path))
    log.info("renewed the broker certificate: valid until %s", renewed.not_valid_after_utc)
    return True


def main(argv: list[str]) -> int:
    """The child: print CERT's not-before and not-after as a JSON pair of ISO times."""
    from contract import tls

    cert = tls.read_certificate(Path(argv[0]).read_text())
    print(json.dumps([cert.not_valid_before_utc.isoformat(), cert.not_valid_after_utc.isoformat()]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
