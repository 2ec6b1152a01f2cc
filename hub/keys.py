"""The hub's signing key, its rotations and the offline root key's public half.

Files in DATA/keys (the private ones mode 0600, never in the database):

- `hub-signing.key`: the key that signs desired states and packages now.
- `rotations.json`: every rotation statement the hub made (contract/keys.py),
  oldest first; sent with each desired state so devices can follow.
- `hub-signing.next.key`: the key a rotation under way moves to.
- `root.pub`: the root key's public half (`keys generate --root`); the
  private half stays with the operator.

A rotation is crash safe by its order: the next key is written first, then
the statement naming it is appended to the chain, then every package the old
key signed is signed by the new one too (idempotent), and last the next key
is renamed over the current one, which destroys the retired key. A hub that
stops anywhere in between finds the next key named by the chain at start and
finishes (`finish`); a next key no statement names yet is a rotation still
waiting for its root signature.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from contract import keys, protocol, signing
from contract.files import write_atomic, write_json

# Called with the retired key's public half and the new key: signs every package the
# retired key signed with the new one too; returns how many it signed.
Resign = Callable[[ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey], int]


class KeyRingError(Exception):
    """A rotation that cannot be done; the message says why and what to do."""


class KeyRing:
    def __init__(self, key_path: Path) -> None:
        """The ring whose current key is KEY_PATH, made if there is none yet."""
        self.directory = key_path.parent
        self.key_path = key_path
        self.next_path = self.directory / "hub-signing.next.key"
        self.chain_path = self.directory / "rotations.json"
        self.root_path = self.directory / "root.pub"
        self.created = not key_path.exists()
        if self.created:
            signing.write_private_key(signing.generate_private_key(), key_path)
        self._lock = threading.Lock()  # the key and the chain, read and changed together
        self._rotating = threading.Lock()  # one rotation at a time, start to finish
        self.key = signing.load_private_key(key_path)
        self.chain: list[dict[str, Any]] = (json.loads(self.chain_path.read_text())
                                            if self.chain_path.exists() else [])

    # -- what others read ------------------------------------------------------------------

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        return self._key

    @key.setter
    def key(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self.public = key.public_key()  # derived once: each derivation costs a multiplication
        self._key_id = signing.key_id(self.public)

    @property
    def public_pem(self) -> str:
        return signing.public_key_pem(self.key)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def root(self) -> str | None:
        return self.root_path.read_text() if self.root_path.exists() else None

    def _done(self) -> list[dict[str, Any]]:
        """The statements up to the key in use: during a rotation (packages being signed)
        the newest one names a key nothing is signed with yet."""
        return self.chain[:-1] if self.unfinished else self.chain

    def trust(self) -> keys.Trust:
        """What a device enrolling now starts from."""
        done = self._done()
        return keys.Trust(key=self.public_pem, sequence=len(done),
                          retired=tuple(s["previous"] for s in done)[-keys.MAX_RETIRED:],
                          root=self.root)

    def sign_desired(self, state: protocol.DesiredState) -> bytes:
        with self._lock:
            return protocol.sign_desired(state, self.key, keys.chain_tail(self._done()),
                                         key_id=self._key_id)

    def sign_command(self, command: protocol.Command) -> bytes:
        """Commands carry no rotation chain: the retained desired state leads devices on."""
        with self._lock:
            return protocol.sign_command(command, self.key)

    def describe(self) -> dict[str, Any]:
        """The current key, the retired ones and whether a root key is set, for `keys list`."""
        done = self._done()
        keys_ = [{"key_id": s["previous"], "rotation": s["sequence"] - 1, "state": "retired",
                  "retired_at": s["issued_at"]} for s in done]
        keys_.append({"key_id": self.key_id, "rotation": len(done), "state": "current",
                      "retired_at": None})
        root = self.root
        return {"current": self.key_id, "rotations": len(done), "keys": keys_,
                "root_key_id": keys.pem_key_id(root) if root else None,
                "public_key": self.public_pem,
                "pending": self._pending_id()}

    def _pending_id(self) -> str | None:
        if not self.next_path.exists():
            return None
        return signing.key_id(signing.load_private_key(self.next_path))

    # -- rotation ---------------------------------------------------------------------------

    @property
    def unfinished(self) -> bool:
        """A rotation the chain names but the key file does not have yet (a crash)."""
        return bool(self.chain) and self.chain[-1]["key"] != self.public_pem

    def set_root(self, public_pem: str) -> None:
        """Take PUBLIC_PEM as the root key devices enrolling from now on learn."""
        signing.load_public_key(public_pem)  # a PEM public key, or SignatureError
        with self._lock:
            if self.root_path.exists():
                raise KeyRingError(f"the hub has a root key already ({self.root_path}); a "
                                   "device pins the one it enrolled with, so it cannot change")
            write_atomic(self.root_path, public_pem.encode())

    def prepare(self) -> dict[str, Any]:
        """The next key (made once, kept until the rotation is done): what a root signature
        of the rotation statement must name."""
        with self._lock:
            if not self.next_path.exists():
                signing.write_private_key(signing.generate_private_key(), self.next_path)
            nxt = signing.load_private_key(self.next_path)
            return {"sequence": len(self.chain) + 1, "previous": self.key_id,
                    "key": signing.public_key_pem(nxt)}

    def rotate(self, resign: Resign, statement: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rotate to the prepared next key: STATEMENT is its rotation statement signed with
        the root key, or None to sign it with the current key. Returns the statement."""
        with self._rotating:
            return self._rotate(resign, statement)

    def _rotate(self, resign: Resign, statement: dict[str, Any] | None) -> dict[str, Any]:
        wanted = self.prepare()
        with self._lock:
            if statement is None:
                statement = keys.sign_rotation(
                    sequence=wanted["sequence"], previous=wanted["previous"],
                    key_pem=wanted["key"], issued_at=datetime.now(UTC), signer=self.key)
            else:
                self._check_root_statement(statement, wanted)
            # A device's view before this rotation must accept it, or none would.
            keys.follow(self.trust(), [statement])
            write_json(self.chain_path, [*self.chain, statement])
            self.chain = [*self.chain, statement]
        self.finish(resign)
        return statement

    def _check_root_statement(self, statement: dict[str, Any], wanted: dict[str, Any]) -> None:
        root = self.root
        if root is None:
            raise KeyRingError("the hub has no root key: make one with `edgefleet keys "
                               "generate --root FILE` first")
        if not isinstance(statement, dict) or statement.get("key") != wanted["key"] \
                or statement.get("sequence") != wanted["sequence"]:
            raise KeyRingError("the statement is not for the pending rotation: sign again")
        signature = statement.get("signature")
        if not isinstance(signature, dict) or signature.get("keyid") != keys.pem_key_id(root):
            raise KeyRingError("the statement is not signed by the hub's root key")

    def finish(self, resign: Resign) -> int:
        """Complete the rotation the chain names: packages signed, the key file replaced.
        Returns how many packages were signed again (0 when nothing was unfinished).
        States go on being signed by the old key (without the new statement) meanwhile."""
        with self._lock:
            if not self.unfinished:
                return 0
            nxt = signing.load_private_key(self.next_path)
            if signing.public_key_pem(nxt) != self.chain[-1]["key"]:
                raise KeyRingError(f"{self.next_path} is not the key {self.chain_path} rotated "
                                   "to; restore it from a backup")
            old = self.public
        count = resign(old, nxt)
        with self._lock:
            os.replace(self.next_path, self.key_path)
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            self.key = nxt
        return count
