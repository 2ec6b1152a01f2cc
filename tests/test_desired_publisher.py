"""hub.desired.Publisher in process: its session is injected, so a small stand-in for the
MQTT session (connected or not, acknowledging or failing) shows what it publishes, what
it records as published, and how it catches up after a reconnect. The database and the
signatures are real; the MQTT session itself is tested against Mosquitto elsewhere
(tests/test_fleet_session.py)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.mqtt import Message, MqttError
from contract import cosign, protocol
from hub import deployments, desired
from hub.desired import Publisher
from hub.keys import KeyRing
from hub.retained import RetainedWatch
from hub.storage.db import Database

DEVICES = ["dev-a", "dev-b", "dev-c"]
DIGEST = f"sha256:{1:064x}"


class Sent:
    """What `Session.send_many` returns: `wait` raises what the broker did not confirm."""

    def __init__(self, error: MqttError | None) -> None:
        self.error = error

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


class Session:
    """What Publisher uses of agent.mqtt.Session: `connection`, `send_many` and
    `publish_many`."""

    def __init__(self) -> None:
        self._connected = True
        self.epoch = 1  # the connection's number: each connect makes a new one
        self.fail_next = 0
        self.published: list[Message] = []
        self.lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, up: bool) -> None:
        self.epoch += up and not self._connected
        self._connected = up

    @property
    def connection(self) -> int | None:
        return self.epoch if self._connected else None

    def publish_many(self, messages: Sequence[Message], *, timeout: float = 10.0) -> None:
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                raise MqttError("no PUBACK within 0.1 s")
            self.published.extend(messages)

    def send_many(self, messages: Sequence[Message], *, timeout: float = 10.0) -> Sent:
        try:
            self.publish_many(messages, timeout=timeout)
        except MqttError as exc:
            return Sent(exc)
        return Sent(None)

    def topics(self) -> list[str]:
        with self.lock:
            return [m.topic for m in self.published]


def wait(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(tmp_path / "keys" / "hub-signing.key")


@pytest.fixture
def db(hub_db: Database) -> Database:
    with hub_db.transaction() as conn:
        conn.execute("INSERT INTO models VALUES ('tiny', 'now', 2)")
        conn.execute("INSERT INTO model_versions (model, version, created_at, tags, metrics,"
                     " lineage) VALUES ('tiny', 1, 'now', '{}', '{}', '{}')")
        conn.execute("INSERT INTO oci_manifests VALUES ('models/tiny', ?, ?, 512, 'now')",
                     (DIGEST, "application/vnd.oci.image.index.v1+json"))
        conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', '1', ?, 'now')", (DIGEST,))
        conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', ?, 'sha256:ff', 'now')",
                     (cosign.signature_tag(DIGEST),))
        conn.executemany(
            "INSERT INTO devices (id, name, tags, desired_generation, applied_generation,"
            " published_generation) VALUES (?, ?, '{}', 0, 0, 0)", [(d, d) for d in DEVICES])
    return hub_db


@pytest.fixture
def running(db: Database, tmp_path: Path) -> Iterator[tuple[Publisher, Session]]:
    session = Session()
    publisher = Publisher(db, session, ring(tmp_path))  # type: ignore[arg-type]
    publisher.start()
    yield publisher, session
    publisher.stop()


def published(db: Database) -> dict[str, int]:
    return {r["id"]: r["published_generation"] for r in db.query(
        "SELECT id, published_generation FROM devices ORDER BY id")}


def test_notified_devices_get_one_signed_retained_state_each(
        db: Database, running: tuple[Publisher, Session]) -> None:
    publisher, session = running
    deployments.assign_many(db, DEVICES[:2], name="tiny", model="tiny", version=1)
    publisher.notify(DEVICES[:2])
    wait(lambda: published(db) == {"dev-a": 1, "dev-b": 1, "dev-c": 0}, "the states recorded")
    assert sorted(session.topics()) == [protocol.desired_topic(d) for d in DEVICES[:2]]
    message = next(m for m in session.published if m.topic == protocol.desired_topic("dev-a"))
    assert (message.qos, message.retain) == (1, True)
    state = protocol.verify_desired(message.payload, public_key=publisher.keys.key.public_key(),
                                    device_id="dev-a", last_generation=0,
                                    now=datetime.now(UTC))
    assert (state.generation, state.deployments[0].version) == (1, 1)
    # Notified again with nothing new: nothing is sent again.
    publisher.notify(DEVICES[:2])
    time.sleep(0.3)
    assert len(session.topics()) == 2
    assert publisher.stats()["published"] == 2


def test_a_failed_batch_is_tried_again(db: Database,
                                       running: tuple[Publisher, Session]) -> None:
    publisher, session = running
    session.fail_next = 1
    deployments.assign_many(db, DEVICES, name="tiny", model="tiny", version=1)
    publisher.notify(DEVICES)
    wait(lambda: set(published(db).values()) == {1}, "every state recorded after a retry",
         timeout=15)
    stats = publisher.stats()
    assert (stats["failures"], stats["last_error"]) == (1, "no PUBACK within 0.1 s")
    assert sorted(session.topics()) == sorted(protocol.desired_topic(d) for d in DEVICES)


def test_batches_pipelined_a_failed_one_puts_back_the_next_one_signed_meanwhile(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One device a batch: the second is signed while the first waits for its PUBACK,
    # which does not come; neither is recorded, both are published again.
    monkeypatch.setattr(desired, "BATCH", 1)
    session = Session()
    session.fail_next = 1
    publisher = Publisher(db, session, ring(tmp_path))  # type: ignore[arg-type]
    deployments.assign_many(db, DEVICES, name="tiny", model="tiny", version=1)
    publisher.notify(DEVICES)
    publisher.start()
    try:
        wait(lambda: set(published(db).values()) == {1}, "every state recorded after a retry",
             timeout=15)
    finally:
        publisher.stop()
    assert publisher.stats()["failures"] == 1
    # Each device's state reached the broker at least once; the failed batch again.
    assert set(session.topics()) == {protocol.desired_topic(d) for d in DEVICES}
    assert publisher.stats()["published"] == len(DEVICES)


def test_changes_made_while_disconnected_are_caught_up_on_reconnect(db: Database,
                                                                   tmp_path: Path) -> None:
    session = Session()
    session.connected = False
    publisher = Publisher(db, session, ring(tmp_path))  # type: ignore[arg-type]
    publisher.start()
    try:
        deployments.assign_many(db, DEVICES, name="tiny", model="tiny", version=1)
        # Nobody notified (say the hub restarted since): the catch-up finds them all.
        time.sleep(0.3)
        assert session.topics() == []
        session.connected = True
        wait(lambda: set(published(db).values()) == {1}, "the catch-up after the reconnect")
        assert len(session.topics()) == len(DEVICES)
    finally:
        publisher.stop()


def test_a_reconnect_quicker_than_the_publishers_look_is_caught_up_all_the_same(
        db: Database, running: tuple[Publisher, Session]) -> None:
    publisher, session = running
    deployments.assign_many(db, DEVICES[:1], name="tiny", model="tiny", version=1)
    publisher.notify(DEVICES[:1])
    wait(lambda: len(session.topics()) == 1, "the first state")  # the first look is done
    deployments.assign_many(db, DEVICES[1:], name="tiny", model="tiny", version=1)
    time.sleep(0.3)
    assert len(session.topics()) == 1  # nobody notified
    session.epoch += 1  # never seen disconnected
    wait(lambda: set(published(db).values()) == {1}, "the catch-up after the reconnect")


def test_a_broker_that_lost_its_retained_states_gets_them_all_again(
        db: Database, running: tuple[Publisher, Session]) -> None:
    publisher, session = running
    deployments.assign_many(db, DEVICES, name="tiny", model="tiny", version=1)
    publisher.notify(DEVICES)
    wait(lambda: set(published(db).values()) == {1}, "the states recorded")
    desired.forget_published(db)  # the managed broker died and was started again
    publisher.catch_up()
    wait(lambda: len(session.topics()) == 2 * len(DEVICES), "every state published again")


def test_validity_shorter_than_ten_minutes_is_refused(db: Database, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 10 minutes"):
        Publisher(db, Session(), ring(tmp_path),  # type: ignore[arg-type]
                  validity=timedelta(minutes=5))


def test_a_candidate_with_a_baseline_carries_its_own_bins(db: Database,
                                                          tmp_path: Path) -> None:
    """Each version's bins: the deployment's own and its candidate's (A/B or shadow)."""
    two = f"sha256:{2:064x}"
    with db.transaction() as conn:
        conn.execute("INSERT INTO model_versions (model, version, created_at, tags, metrics,"
                     " lineage) VALUES ('tiny', 2, 'now', '{}', '{}', '{}')")
        conn.execute("INSERT INTO oci_manifests VALUES ('models/tiny', ?, ?, 512, 'now')",
                     (two, "application/vnd.oci.image.index.v1+json"))
        conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', '2', ?, 'now')", (two,))
        conn.execute("INSERT INTO oci_tags VALUES ('models/tiny', ?, 'sha256:fe', 'now')",
                     (cosign.signature_tag(two),))
        for version, edges in ((1, [0.0]), (2, [0.0, 1.0])):
            spec = f'[{{"side": "input", "tensor": "x", "column": 0, "edges": {edges}}}]'
            conn.execute("INSERT INTO drift_baselines VALUES ('tiny', ?, '{}', ?, 'now', 'me')",
                         (version, spec))
    deployments.assign_many(db, ["dev-a"], name="tiny", model="tiny", version=1,
                            candidate=deployments.Candidate(2, 10, shadow=True))
    generation, rows = deployments.desired_snapshot(db, ["dev-a"])["dev-a"]
    state = desired.build("dev-a", generation, rows, issued_at=datetime.now(UTC),
                          validity=timedelta(days=1))
    (deployment,) = state.deployments
    assert deployment.sketch is not None and deployment.candidate is not None
    assert deployment.candidate.sketch is not None
    assert [f.edges for f in deployment.sketch.features] == [(0.0,)]
    assert [f.edges for f in deployment.candidate.sketch.features] == [(0.0, 1.0)]
    key = ring(tmp_path).key  # and the agent reads it back as built
    assert protocol.verify_desired(protocol.sign_desired(state, key),
                                   public_key=key.public_key(), device_id="dev-a",
                                   last_generation=0, now=datetime.now(UTC)) == state


def test_a_state_being_sent_is_known_by_its_digest_until_settled(tmp_path: Path) -> None:
    # The echo of a state in flight comes back before it is recorded: known by its
    # SHA-256, not its signature (this one's key is not the hub's, so only the digest
    # can pass it); once settled it is judged as anyone's again.
    watch = RetainedWatch(None, ring(tmp_path / "hub"))  # type: ignore[arg-type]
    now = datetime.now(UTC)
    payload = ring(tmp_path / "other").sign_desired(
        desired.build("dev-a", 1, [], issued_at=now, validity=timedelta(days=30)))
    row = {"desired_generation": 1, "published_generation": 0, "published_digest": None}
    digest = hashlib.sha256(payload).hexdigest()
    watch.expect([("dev-a", digest)])
    assert watch.judge("dev-a", payload, row) is None
    watch.settled([("dev-a", digest)])
    assert (watch.judge("dev-a", payload, row) or "").startswith("bad_signature")
