"""Rotation statements and chains (contract/keys.py) and the hub's key ring (hub/keys.py):
what a device follows, what it refuses, and a rotation interrupted at each step."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from contract import keys, protocol, signing
from hub.keys import KeyRing, KeyRingError

NOW = datetime.now(UTC)


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return signing.public_key_pem(key)


def rotations(count: int) -> tuple[list[ec.EllipticCurvePrivateKey], list[dict[str, Any]]]:
    """COUNT rotations from a first key, each signed by the key before."""
    made = [signing.generate_private_key() for _ in range(count + 1)]
    chain = [keys.sign_rotation(sequence=i + 1, previous=signing.key_id(made[i]),
                                key_pem=pem(made[i + 1]), issued_at=NOW, signer=made[i])
             for i in range(count)]
    return made, chain


def state(generation: int, key: ec.EllipticCurvePrivateKey,
          chain: list[dict[str, Any]] = ()) -> bytes:  # type: ignore[assignment]
    return protocol.sign_desired(protocol.DesiredState(
        "dev-1", generation, NOW, NOW + timedelta(hours=1), ()), key, chain)


def test_a_device_behind_several_rotations_follows_the_whole_chain() -> None:
    made, chain = rotations(3)
    trust = keys.follow(keys.Trust(key=pem(made[0])), chain)
    assert (trust.key, trust.sequence) == (pem(made[3]), 3)
    assert trust.retired == tuple(signing.key_id(k) for k in made[:3])
    # the same chain again (it comes with every state) changes nothing
    assert keys.follow(trust, chain) == trust
    # a device that enrolled after rotation 2 starts there and takes only the third
    later = keys.Trust(key=pem(made[2]), sequence=2)
    assert keys.follow(later, chain).key == pem(made[3])


def test_the_chain_travels_outside_the_signed_state_and_retired_keys_are_refused() -> None:
    made, chain = rotations(2)
    trust = keys.follow(keys.Trust(key=pem(made[0])), protocol.rotation_chain(
        state(5, made[2], chain)))
    public = signing.load_public_key(trust.key)
    got = protocol.verify_desired(state(5, made[2], chain), public_key=public, device_id="dev-1",
                                  last_generation=4, now=NOW, retired=trust.retired)
    assert got.generation == 5
    with pytest.raises(protocol.ProtocolRefusal) as refused:
        protocol.verify_desired(state(6, made[0]), public_key=public, device_id="dev-1",
                                last_generation=5, now=NOW, retired=trust.retired)
    assert refused.value.reason is protocol.Reason.RETIRED_KEY
    assert "retired when the hub rotated its key" in refused.value.message
    with pytest.raises(protocol.ProtocolRefusal) as unknown:  # never trusted: a forgery
        protocol.verify_desired(state(6, signing.generate_private_key()), public_key=public,
                                device_id="dev-1", last_generation=5, now=NOW,
                                retired=trust.retired)
    assert unknown.value.reason is protocol.Reason.BAD_SIGNATURE
    # the chain is not part of what the state's signature covers: swapping it breaks nothing
    document = json.loads(state(7, made[2], chain))
    document["keys"] = chain[-1:]
    assert protocol.verify_desired(json.dumps(document).encode(), public_key=public,
                                   device_id="dev-1", last_generation=5, now=NOW).generation == 7


@pytest.mark.parametrize("tamper", ["skip", "wrong_signer", "forged_key", "unknown_field",
                                    "back_to_old", "not_a_list"])
def test_a_chain_that_does_not_follow_is_refused_whole(tamper: str) -> None:
    made, chain = rotations(2)
    start = keys.Trust(key=pem(made[0]))
    bad: object = chain
    if tamper == "skip":
        bad = chain[1:]
    elif tamper == "wrong_signer":  # rotation 2 signed by the first key, not its predecessor
        bad = [chain[0], keys.sign_rotation(sequence=2, previous=signing.key_id(made[1]),
                                            key_pem=pem(made[2]), issued_at=NOW,
                                            signer=made[0])]
    elif tamper == "forged_key":  # the right signer's statement with another key put in
        bad = [{**chain[0], "key": pem(signing.generate_private_key())}]
    elif tamper == "unknown_field":
        bad = [{**chain[0], "extra": 1}]
    elif tamper == "back_to_old":
        bad = [chain[0], keys.sign_rotation(sequence=2, previous=signing.key_id(made[1]),
                                            key_pem=pem(made[0]), issued_at=NOW,
                                            signer=made[1])]
    elif tamper == "not_a_list":
        bad = {"sequence": 1}
    with pytest.raises(keys.RotationError):
        keys.follow(start, bad)


def test_the_root_key_hands_trust_over_without_the_current_key() -> None:
    made, _ = rotations(0)
    root = signing.generate_private_key()
    fresh = signing.generate_private_key()
    trust = keys.Trust(key=pem(made[0]), root=pem(root))
    # the current key is compromised: the root names a key whatever the current one says
    statement = keys.sign_rotation(sequence=1, previous="sha256:whatever", key_pem=pem(fresh),
                                   issued_at=NOW, signer=root)
    assert keys.follow(trust, [statement]).key == pem(fresh)
    # without the root key known, the same statement is nobody's
    with pytest.raises(keys.RotationError):
        keys.follow(keys.Trust(key=pem(made[0])), [statement])


def test_the_key_id_needs_no_cryptography_and_matches_signing() -> None:
    key = signing.generate_private_key()
    assert keys.pem_key_id(pem(key)) == signing.key_id(key)


def test_a_device_reports_the_saved_key_id_and_works_it_out_again_when_it_no_longer_fits(
        tmp_path: Path) -> None:
    from agent.identity import Identity
    from agent.trust import KEY_ID_FILE, TrustStore

    made, chain = rotations(1)
    identity = Identity("dev-1", "d", "http://hub", "t", "mqtt://hub", "u", "p", pem(made[0]))
    saved = tmp_path / KEY_ID_FILE
    assert TrustStore(tmp_path, identity).key_id == signing.key_id(made[0])
    assert json.loads(saved.read_text()) == {"key": pem(made[0]), "id": signing.key_id(made[0])}
    # A restart reads the id (this one planted, to tell it from a hash); damage or another
    # key's id is worked out from the key again.
    saved.write_text(json.dumps({"key": pem(made[0]), "id": "sha256:planted"}))
    assert TrustStore(tmp_path, identity).key_id == "sha256:planted"
    for damaged in ("{", "[]", json.dumps({"key": pem(made[1]), "id": "sha256:other"})):
        saved.write_text(damaged)
        assert TrustStore(tmp_path, identity).key_id == signing.key_id(made[0])
    ring = TrustStore(tmp_path, identity)
    assert ring.follow(chain) and ring.key_id == signing.key_id(made[1])
    assert json.loads(saved.read_text())["id"] == signing.key_id(made[1])


def _resigned(calls: list[tuple[str, str]]) -> Any:
    def resign(old: ec.EllipticCurvePublicKey, new: ec.EllipticCurvePrivateKey) -> int:
        calls.append((signing.key_id(old), signing.key_id(new)))
        return 0
    return resign


def test_a_rotation_interrupted_after_the_chain_is_finished_at_the_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys" / "hub-signing.key"
    ring = KeyRing(path)
    first = ring.key_id
    # What a kill -9 after the statement was written leaves: the chain names the next key,
    # the key file is still the old one.
    pending = ring.prepare()
    statement = keys.sign_rotation(sequence=1, previous=first, key_pem=pending["key"],
                                   issued_at=NOW, signer=ring.key)
    (path.parent / "rotations.json").write_text(json.dumps([statement]))
    again = KeyRing(path)
    assert again.unfinished and again.key_id == first
    calls: list[tuple[str, str]] = []
    again.finish(_resigned(calls))
    assert not again.unfinished and again.key_id == keys.pem_key_id(pending["key"])
    assert calls == [(first, again.key_id)]  # packages were signed by the new key first
    assert KeyRing(path).key_id == again.key_id and not (path.parent /
                                                          "hub-signing.next.key").exists()
    assert again.trust().retired == (first,) and again.trust().sequence == 1


def test_a_prepared_key_waits_for_its_root_signature_and_the_root_is_checked(
    tmp_path: Path,
) -> None:
    ring = KeyRing(tmp_path / "hub-signing.key")
    pending = ring.prepare()
    assert KeyRing(tmp_path / "hub-signing.key").prepare() == pending  # kept across restarts
    with pytest.raises(KeyRingError, match="no root key"):
        ring.rotate(_resigned([]), {"sequence": 1})
    root = signing.generate_private_key()
    ring.set_root(pem(root))
    with pytest.raises(KeyRingError, match="cannot change"):
        ring.set_root(pem(signing.generate_private_key()))
    other = keys.sign_rotation(sequence=1, previous=ring.key_id, key_pem=pending["key"],
                               issued_at=NOW, signer=signing.generate_private_key())
    with pytest.raises(KeyRingError, match="not signed by the hub's root key"):
        ring.rotate(_resigned([]), other)
    good = keys.sign_rotation(sequence=1, previous=ring.key_id, key_pem=pending["key"],
                              issued_at=NOW, signer=root)
    ring.rotate(_resigned([]), good)
    assert ring.key_id == keys.pem_key_id(pending["key"]) and ring.describe()["rotations"] == 1


def test_a_state_carries_the_newest_statements_only(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "hub-signing.key")
    start = ring.trust()
    for _ in range(keys.MAX_CHAIN + 1):
        ring.rotate(_resigned([]))
    payload = ring.sign_desired(protocol.DesiredState("dev-1", 1, NOW, NOW + timedelta(hours=1),
                                                      ()))
    chain = protocol.rotation_chain(payload)
    assert isinstance(chain, list) and len(chain) == keys.MAX_CHAIN
    assert len(payload) < 16 * 1024
    with pytest.raises(keys.RotationError, match="does not follow rotation 0"):
        keys.follow(start, chain)  # too far behind: enroll again
    assert keys.follow(keys.Trust.from_json({**start.as_json(), "key": ring.chain[0]["key"],
                                             "sequence": 1}), chain).key == ring.public_pem
    with pytest.raises(keys.RotationError, match="the limit is"):
        keys.follow(start, ring.chain)


def test_while_packages_are_signed_again_states_and_enrollments_stay_on_the_old_key(
    tmp_path: Path,
) -> None:
    ring = KeyRing(tmp_path / "hub-signing.key")
    old = ring.key_id
    seen: list[tuple[str, int, int]] = []

    def resign(_: ec.EllipticCurvePublicKey, __: ec.EllipticCurvePrivateKey) -> int:
        payload = ring.sign_desired(protocol.DesiredState(
            "dev-1", 1, NOW, NOW + timedelta(hours=1), ()))
        chain = protocol.rotation_chain(payload)
        assert isinstance(chain, list)
        seen.append((json.loads(payload)["signature"]["keyid"], len(chain),
                     ring.trust().sequence))
        return 0

    ring.rotate(resign)
    # a device enrolling or reading a state then would verify it with the key it is told
    assert seen == [(old, 0, 0)]
    assert ring.trust().sequence == 1 and ring.key_id != old
