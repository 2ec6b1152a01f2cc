"""Desired states on the broker that the hub did not put there.

Whoever holds broker credentials that may write a device's desired topic can
leave a state retained there: a forgery, an old genuine state (a replay), a
state of a retired key, or an empty message that deletes the hub's. Devices
refuse all of these, but the device then sits on the refusal until the hub
next publishes, and the broker hands the stale state to it after every
reconnect. So the hub watches the topics (`DESIRED_FILTER`): on each
(re)connect the broker hands it what it retains for every device, and after
that it sees every publish.

A message that is byte for byte the state the hub last published (its SHA-256
is `devices.published_digest`), or one it is publishing now (`expect`: its
echo comes back before the PUBACK lets the publisher record it), is good. Any
other is judged with the agent's own check (`protocol.verify_desired`, with
the hub's current key) and against the generation the hub last published. The
last message seen for a device is what the broker most likely holds. A bad one
is a suspect, not acted on at once: the hub's own states come back to it as
well, and a superseded one may arrive after the next was recorded; a later
good message for that device clears it. A suspect still there after `GRACE`
seconds is acted on: the device's state is published again (the hub's, signed
now), and the event is counted (`GET /fleet/status`,
`desired.stale_retained`), logged (at most a line a minute per reason) and
audited (`desired.stale`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from contract import protocol
from hub import audit
from hub.keys import KeyRing
from hub.repeats import Repeats
from hub.storage.db import Database

log = logging.getLogger("edgefleet.hub.retained")

DESIRED_FILTER = f"{protocol.ROOT}/devices/+/desired"
GRACE = 5.0  # seconds a bad message may be a late echo of the hub's own before it counts


@dataclass
class _Suspect:
    reason: str
    since: float  # the first bad message in a row: a flood does not put the repair off


class RetainedWatch:
    def __init__(self, db: Database, keys: KeyRing, *, grace: float = GRACE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db, self.keys, self.grace, self.clock = db, keys, grace, clock
        self._suspects: dict[str, _Suspect] = {}
        self._sending: dict[str, str] = {}  # device -> SHA-256 of its state in flight
        self._lock = threading.Lock()
        self._repeats = Repeats(log)
        self.seen = 0
        self.stale = 0  # repaired
        self.last: dict[str, Any] | None = None

    def expect(self, states: Iterable[tuple[str, str]]) -> None:
        """(device, SHA-256 of its payload) of states the hub is about to publish: their
        echoes count as its own without a signature check (half the hub's CPU at 10,000
        devices went to checking them, bench/README.md)."""
        with self._lock:
            self._sending.update(states)

    def settled(self, states: Iterable[tuple[str, str]]) -> None:
        """Those states were recorded as published, or failed: no longer expected. A state
        left expected would pass for the hub's own after a newer one, i.e. as a replay."""
        with self._lock:
            for device, digest in states:
                if self._sending.get(device) == digest:
                    del self._sending[device]

    def see(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """(device id, payload) of messages on desired topics, in the order they came."""
        rows = {r["id"]: r for r in self.db.query(
            "SELECT id, desired_generation, published_generation, published_digest FROM devices"
            " WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted({device for device, _ in messages})),))}
        now = self.clock()
        with self._lock:
            for device, payload in messages:
                self.seen += 1
                row = rows.get(device)
                reason = None if row is None else self.judge(device, payload, row)
                if reason is None:
                    self._suspects.pop(device, None)
                elif device not in self._suspects:
                    self._suspects[device] = _Suspect(reason, now)
                else:
                    self._suspects[device].reason = reason

    def judge(self, device: str, payload: bytes, row: dict[str, Any]) -> str | None:
        """Why PAYLOAD is not a state this hub would have the broker keep; None if it is."""
        if not payload:
            return "cleared" if row["desired_generation"] > 0 else None
        digest = hashlib.sha256(payload).hexdigest()
        # `see` holds the lock; one dict look-up is atomic for any other caller.
        if digest in (row["published_digest"], self._sending.get(device)):
            return None  # what the hub published last, or is publishing: no signature to check
        try:
            state = protocol.verify_desired(
                payload, public_key=self.keys.public, device_id=device,
                last_generation=0, now=datetime.now(UTC))
        except protocol.ProtocolRefusal as refusal:
            return f"{refusal.reason}: {refusal.message}"
        if state.generation < row["published_generation"]:
            return (f"replay: generation {state.generation}, older than the published "
                    f"generation {row['published_generation']}")
        return None

    def due(self) -> list[tuple[str, str]]:
        """Suspects past the grace period, (device, reason), taken off the list."""
        now = self.clock()
        with self._lock:
            found = [(d, s.reason) for d, s in self._suspects.items()
                     if now - s.since >= self.grace]
            for device, _ in found:
                del self._suspects[device]
        return found

    def repaired(self, found: list[tuple[str, str]]) -> None:
        """FOUND's states are being published again: count, log and audit them."""
        for device, reason in found:
            self.stale += 1
            self.last = {"device": device, "reason": reason[:300],
                         "at": protocol.format_time(datetime.now(UTC))}
            kind = reason.split(":", 1)[0]
            self._repeats.note(("stale", kind), f"the broker held a desired state for {device} "
                               f"the hub did not publish ({reason[:300]}); publishing the "
                               "hub's again")
            audit.record(self.db, actor="hub", action="desired.stale", target=device,
                         status=200, detail=reason)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"seen": self.seen, "stale_retained": self.stale,
                    "suspects": len(self._suspects), "last_stale": self.last}
