"""Which hub key this device trusts, across rotations and restarts.

Enrollment pins the hub's key (identity.json); every rotation the device
follows since (contract/keys.py) is saved here, in `hub-keys.json`, before
anything signed by the new key is believed: the file is written atomically
and fsynced (contract/files.py), so a kill -9 leaves the old trust or the
new one, and either way the next retained desired state, which carries the
hub's whole chain, leads to the newest key again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from contract import keys
from contract.files import read_json, write_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.identity import Identity

log = logging.getLogger("edgefleet.agent.trust")

TRUST_FILE = "hub-keys.json"
UNREADABLE_KEY = "unreadable"  # the key id reported when the trusted key is damaged
# The trusted key's id, kept so that later starts need not hash the key: hashing loads
# OpenSSL's libcrypto (3.5 MB), which an idle agent on plain MQTT has no other use for.
KEY_ID_FILE = "hub-key-id.json"


def save(data_dir: Path, trust: keys.Trust) -> None:
    write_json(data_dir / TRUST_FILE, trust.as_json())


def load(data_dir: Path, identity: Identity) -> keys.Trust:
    """The saved trust; without one, the key pinned at enrollment (a hub never rotated)."""
    path = data_dir / TRUST_FILE
    return keys.Trust.from_json(read_json(path)) if path.exists() \
        else keys.Trust(key=identity.hub_public_key)


class TrustStore:
    """The trusted hub key of the device whose data is in DATA_DIR."""

    def __init__(self, data_dir: Path, identity: Identity) -> None:
        self.data_dir = data_dir
        self.trust = load(data_dir, identity)
        self._loaded: tuple[str, ec.EllipticCurvePublicKey] | None = None
        self._id: tuple[str, str] | None = None  # (key, its id)

    @property
    def key(self) -> ec.EllipticCurvePublicKey:
        """The trusted key, loaded at the first verification: cryptography costs an idle
        agent 8 MB until it has something to verify."""
        if self._loaded is None or self._loaded[0] != self.trust.key:
            from contract import signing

            try:
                self._loaded = (self.trust.key, signing.load_public_key(self.trust.key))
            except signing.SignatureError as exc:
                raise keys.RotationError(f"the trusted hub key is unreadable ({exc}); nothing "
                                         "signed can be trusted: enroll this device again"
                                         ) from None
        return self._loaded[1]

    @property
    def key_id(self) -> str:
        """The trusted key's id for the device's report; a damaged key is reported as such
        (each desired state is then refused, see `key`), never a crash."""
        key = self.trust.key
        if self._id is None or self._id[0] != key:
            self._id = (key, self._saved_id(key))
        return self._id[1]

    def _saved_id(self, key: str) -> str:
        path = self.data_dir / KEY_ID_FILE
        try:
            saved = read_json(path)
            if saved["key"] == key and isinstance(saved["id"], str):
                return saved["id"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, another key's or damaged: worked out again below
        try:
            found = keys.pem_key_id(key)
        except keys.RotationError:
            return UNREADABLE_KEY
        try:
            write_json(path, {"key": key, "id": found})
        except OSError as exc:  # a full disk, say: reported all the same, hashed next start
            log.warning("could not save the hub key's id: %s", exc)
        return found

    @property
    def retired(self) -> tuple[str, ...]:
        return self.trust.retired

    def follow(self, chain: object) -> bool:
        """Follow CHAIN's new rotations, saved before they are used; True if the key
        changed. RotationError if a statement does not follow (nothing is changed)."""
        new = keys.follow(self.trust, chain)
        if new == self.trust:
            return False
        save(self.data_dir, new)
        log.info("the hub rotated its signing key: now trusting %s (rotation %d)",
                 new.key_id, new.sequence)
        self.trust = new
        return True
