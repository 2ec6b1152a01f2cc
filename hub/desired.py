"""Signed desired states, published retained, one thread for all devices.

A device's desired state is built from its deployment rows and its
`desired_generation`, signed with the hub's key and published retained with
QoS 1 on its desired topic, so the broker hands it to the device whenever it
(re)subscribes: the hub never resends on a timer.

The database says what is published: `devices.published_generation` and
`published_expires_at` are written once the broker has acknowledged a state.
So after a hub restart or a reconnect to the broker, the publisher asks
once which devices are behind and publishes just those. Two more things
send a device's state again:

- A broker that lost its retained messages (the managed one started without
  its saved state, or restarted after dying between two saves) makes every
  device count as unpublished (`forget_published`).
- A signed state expires (`validity`, 30 days by default), after which an
  agent refuses it: that is the freeze a withheld hub causes. A live hub
  signs again what would expire within a third of the validity; one query an
  hour finds those devices, normally none.

HTTP handlers never wait for the broker: they commit, call `notify`, and
answer. Devices notified while the broker is away are caught up when it is
back.

Batches are pipelined: while one batch waits for its PUBACKs, the next is
read and signed, and a batch is recorded as published only once every
message in it was acknowledged. Waiting for PUBACKs, 20 in flight at a time
(the session's default), was what set the pace: 85 % of the publisher's busy time
at 10,000 devices, signing 9 %, the database 5 % (py-spy, bench/README.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.mqtt import Message, MqttError, Sent, Session
from contract import protocol
from contract.sketch import SketchSpec
from hub import deployments
from hub.keys import KeyRing
from hub.retained import RetainedWatch
from hub.storage.db import Database

log = logging.getLogger("edgefleet.hub.desired")

DEFAULT_VALIDITY = timedelta(days=30)
BATCH = 500              # devices signed, published and recorded together
IN_FLIGHT = 2 * BATCH    # unacknowledged messages the hub's session allows: two batches
SWEEP_EVERY = 3600.0     # seconds between looks for states that expire soon


def build(
    device_id: str, generation: int, rows: Iterable[dict[str, Any]], *, issued_at: datetime,
    validity: timedelta,
) -> protocol.DesiredState:
    """The desired state of DEVICE_ID from its deployment records (`deployments._record`)."""
    return protocol.DesiredState(
        device_id=device_id,
        generation=generation,
        issued_at=issued_at,
        expires_at=issued_at + validity,
        deployments=tuple(_deployment(row) for row in rows),
    )


def _deployment(row: dict[str, Any]) -> protocol.Deployment:
    runtime = protocol.RuntimeSpec(tuple(row["prefer"]))
    c = row["candidate"]
    candidate = None if c is None else protocol.Candidate(
        version=c["version"],
        package=protocol.Package(row["repository"], c["digest"], c["size"]),
        runtime=runtime,
        traffic=c["traffic"],
        shadow=c["shadow"],
        rollout=row["rollout_id"],
        sketch=None if row.get("candidate_sketch") is None
        else SketchSpec.from_json(row["candidate_sketch"]),
    )
    return protocol.Deployment(
        name=row["name"],
        model=row["model"],
        version=row["version"],
        package=protocol.Package(row["repository"], row["digest"], row["size"]),
        runtime=runtime,
        traffic=row["traffic"],
        rollout=row["rollout_id"],
        candidate=candidate,
        settings=deployments.settings_of(row),
        sketch=None if row.get("sketch") is None else SketchSpec.from_json(row["sketch"]),
    )


def forget_published(db: Database) -> None:
    """Count every device as unpublished: its broker holds no retained state."""
    with db.transaction() as conn:
        conn.execute("UPDATE devices SET published_generation = 0, published_expires_at = NULL,"
                     " published_digest = NULL")


def due(
    db: Database, *, refresh_before: datetime, among: Sequence[str] | None = None
) -> list[str]:
    """Devices (of AMONG, or all) whose retained state is behind their desired
    generation or expires before REFRESH_BEFORE: the ones to publish."""
    return [r["id"] for r in db.query(
        "SELECT id FROM devices WHERE desired_generation > 0"
        " AND (desired_generation > published_generation"
        "      OR published_expires_at IS NULL OR published_expires_at < ?)"
        + ("" if among is None else " AND id IN (SELECT value FROM json_each(?))"),
        (protocol.format_time(refresh_before),
         *(() if among is None else (json.dumps(list(among)),))))]


def _record_published(db: Database, published: list[tuple[str, int, str, str]]) -> None:
    with db.transaction() as conn:
        conn.executemany(
            "UPDATE devices SET published_generation = ?, published_expires_at = ?,"
            " published_digest = ? WHERE id = ?",
            [(generation, expires, digest, device)
             for device, generation, expires, digest in published],
        )


class Publisher:
    """Signs and publishes desired states from its own thread; see the module docstring."""

    def __init__(
        self, db: Database, session: Session, keys: KeyRing, *,
        validity: timedelta = DEFAULT_VALIDITY, publish_timeout: float = 30.0,
        watch: RetainedWatch | None = None,
    ) -> None:
        if validity < timedelta(minutes=10):
            raise ValueError(f"desired states must stay valid for at least 10 minutes, got "
                             f"{validity}")
        self.db, self.session, self.keys = db, session, keys
        self.watch = watch  # finds states on the broker the hub did not put there
        self.validity = validity
        self.publish_timeout = publish_timeout
        self._pending: set[str] = set()
        self._changed = threading.Condition()
        self._stop = False
        self._look = False  # catch_up() asked for a look at who is behind
        self._forget = False  # republish_all() asked for every state again
        self._thread: threading.Thread | None = None
        self.published = 0
        self.failures = 0
        self.last_error: str | None = None

    def notify(self, device_ids: Iterable[str]) -> None:
        """These devices' desired state may have changed (and is committed):
        publish it soon, if it is ahead of what the broker holds."""
        with self._changed:
            self._pending.update(device_ids)
            self._changed.notify()

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="desired-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch under way; what is left is caught up on the next start."""
        with self._changed:
            self._stop = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._changed:
            pending = len(self._pending)
        return {"published": self.published, "pending": pending, "failures": self.failures,
                "last_error": self.last_error}

    def republish_all(self) -> None:
        """Publish every device's state again (the hub's key rotated). Forgotten in this
        thread, so a batch signed by the old key and recorded after cannot count as new."""
        with self._changed:
            self._forget = True
            self._changed.notify()

    def catch_up(self) -> None:
        """Look soon for every device that is behind (the broker lost what it held)."""
        with self._changed:
            self._look = True
            self._changed.notify()

    def _run(self) -> None:
        # The session's connection number, not just "connected": a reconnect
        # quicker than this loop's poll still shows, and may have met a broker
        # that lost what it held, so each new connection gets one catch-up.
        seen, next_sweep = None, 0.0
        while True:
            connection = self.session.connection
            with self._changed:
                if not self._stop and (connection is None or not (
                        self._look or self._forget or self._pending or connection != seen)):
                    self._changed.wait(timeout=1.0)  # also notices a (re)connect
                if self._stop:
                    return
            connection = self.session.connection
            if connection is None:
                continue  # a look asked for waits for the connection
            with self._changed:
                look, self._look = self._look, False
                forget, self._forget = self._forget, False
            if forget:
                forget_published(self.db)
                look = True
            if look or connection != seen or time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_EVERY
                self._catch_up()
            seen = connection
            self._repair_stale()
            self._publish_some()

    def _catch_up(self) -> None:
        try:
            behind = due(self.db, refresh_before=self._refresh_before())
        except Exception:  # the loop must survive a busy or broken database
            log.exception("looking for unpublished desired states failed")
            return
        if behind:
            log.info("%d device(s) need their desired state (re)published", len(behind))
            self.notify(behind)

    def _repair_stale(self) -> None:
        """Publish again the states of devices whose topic holds one the hub did not."""
        found = self.watch.due() if self.watch is not None else []
        if not found:
            return
        devices = [device for device, _ in found]
        try:
            with self.db.transaction() as conn:
                conn.execute("UPDATE devices SET published_generation = 0, published_digest"
                             " = NULL WHERE id IN (SELECT value FROM json_each(?))",
                             (json.dumps(devices),))
            unassigned = [r["id"] for r in self.db.query(
                "SELECT id FROM devices WHERE desired_generation = 0"
                " AND id IN (SELECT value FROM json_each(?))", (json.dumps(devices),))]
            # Nothing of the hub's to put back: the topic is cleared instead.
            self.session.publish_many([Message(protocol.desired_topic(d), b"", qos=1,
                                               retain=True) for d in unassigned],
                                      timeout=self.publish_timeout)
            assert self.watch is not None
            self.watch.repaired(found)
        except Exception:  # a busy database, a slow broker: the next stale
            log.exception("repairing %d stale desired state(s) failed", len(devices))
            return  # message brings them back
        self.notify(devices)

    def _next_batch(self) -> list[str]:
        """Devices to publish next; none once stop, forget or look is asked for, which
        the loop in `_run` sees to first."""
        with self._changed:
            if self._stop or self._forget or self._look:
                return []
            return [self._pending.pop() for _ in range(min(BATCH, len(self._pending)))]

    def _publish_some(self) -> None:
        """Publish what is pending, a batch signed while the one before waits for its
        PUBACKs."""
        flying: _Flying | None = None
        while True:
            batch = self._next_batch()
            try:
                ready = self._prepare(batch) if batch else None
            except Exception:  # a busy or broken database: the hourly look retries
                self.failures += 1
                log.exception("publishing desired states for %d device(s) failed", len(batch))
                time.sleep(1.0)
                ready, batch = None, []
            if flying is not None and not self._land(flying):
                if ready is not None:
                    self.notify(batch)  # not sent: the broker was slow or went away
                time.sleep(1.0)
                return
            if ready is None:
                return
            digests = [(device, digest) for device, _, _, digest in ready.published]
            if self.watch is not None:
                self.watch.expect(digests)
            try:
                flying = _Flying(self.session.send_many(ready.messages,
                                                        timeout=self.publish_timeout),
                                 ready.published)
            except MqttError as exc:
                if self.watch is not None:
                    self.watch.settled(digests)
                self._failed(batch, exc)
                time.sleep(1.0)
                return

    def _land(self, flying: _Flying) -> bool:
        """Wait for FLYING's PUBACKs and record it; False if the broker did not confirm."""
        try:
            return self._record(flying)
        finally:
            if self.watch is not None:
                self.watch.settled((device, digest)
                                   for device, _, _, digest in flying.published)

    def _record(self, flying: _Flying) -> bool:
        try:
            flying.sent.wait()
        except MqttError as exc:
            self._failed([device for device, *_ in flying.published], exc)
            return False
        try:
            _record_published(self.db, flying.published)
        except Exception:  # a busy or broken database: the hourly look retries
            self.failures += 1
            log.exception("recording %d published desired state(s) failed",
                          len(flying.published))
            return True
        self.published += len(flying.published)
        return True

    def _failed(self, devices: list[str], exc: MqttError) -> None:
        # Still connected means the broker was slow: try again soon. Otherwise
        # the catch-up after the reconnect covers these devices.
        self.failures += 1
        self.last_error = str(exc)
        log.warning("publishing %d desired state(s) failed: %s", len(devices), exc)
        self.notify(devices)

    def _refresh_before(self) -> datetime:
        return datetime.now(UTC) + self.validity / 3

    def _prepare(self, device_ids: list[str]) -> _Ready | None:
        """The signed states of those of DEVICE_IDS that are behind; None if none is."""
        behind = due(self.db, refresh_before=self._refresh_before(), among=device_ids)
        issued_at = datetime.now(UTC)
        expires = protocol.format_time(issued_at + self.validity)
        ready = _Ready([], [])
        for device_id, (generation, rows) in deployments.desired_snapshot(
                self.db, behind).items():
            state = build(device_id, generation, rows, issued_at=issued_at,
                          validity=self.validity)
            try:
                payload = self.keys.sign_desired(state)
            except protocol.ProtocolError as exc:  # rows an agent would refuse: a hub bug
                self.failures += 1
                log.error("desired state of %s (generation %d) not published: %s",
                          device_id, generation, exc)
                continue
            ready.messages.append(Message(protocol.desired_topic(device_id), payload, qos=1,
                                          retain=True))
            ready.published.append((device_id, generation, expires,
                                    hashlib.sha256(payload).hexdigest()))
        return ready if ready.messages else None


@dataclass
class _Ready:
    """A batch signed: its messages, and (device, generation, expires, digest) of each."""

    messages: list[Message]
    published: list[tuple[str, int, str, str]]


@dataclass
class _Flying:
    """A batch in flight: recorded once `sent` is acknowledged."""

    sent: Sent
    published: list[tuple[str, int, str, str]]
