"""Webhooks: events POSTed to subscribers' URLs, signed, retried, never in the hub's way.

A subscription names event type patterns ('rollout.*') and an optional filter
(globs on `subject` and `actor`). Its cursor is the last event seq it has looked
at; `fan_out` turns the events after it that match into rows of
`webhook_deliveries` (one per subscription and event), so what is owed survives a
restart: a hub killed mid-retry finds the row pending with its next attempt time.

The `Dispatcher` is a thread running its own asyncio loop: the API's loop and
threads never wait for an endpoint. Each subscription has at most
`per_endpoint` requests in flight and each request at most `timeout` seconds,
so one slow, down or failing endpoint holds only its own slots: due deliveries
are picked per subscription, never from one queue that a backlog could fill.
The total in flight is bounded by `per_endpoint` x `MAX_WEBHOOKS`. What the
attempts came to is written once per round of the loop, in one transaction.

An answer 2xx delivers; anything else (an error status, a redirect, which is
not followed, a refused connection, the timeout) is a failed attempt, retried
after the policy's backoff, until the last attempt makes it a dead letter,
listed and replayable. An endpoint whose every attempt of a round failed rests
for the backoff too, then is probed one attempt at a time, and its other due
deliveries count the failure unsent: a backlog for a dead endpoint is neither
hammered nor kept from becoming dead letters.

Delivery is at least once: a hub killed while a request was under way sends
it again, with the same event id for the receiver to recognise.

Each request carries `Edgefleet-Timestamp` (Unix seconds) and
`Edgefleet-Signature: sha256=HEX`, the HMAC-SHA256 with the subscription's
secret of "TIMESTAMP.BODY" (docs/architecture.md has a receiver's check).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import json
import logging
import random
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from hub import events
from hub.errors import Conflict, NotFound
from hub.events import BadPattern, Event
from hub.storage.db import Database, dumps, format_time
from hub.validation import InvalidInput

log = logging.getLogger("edgefleet.hub.webhooks")

MAX_WEBHOOKS: Final = 50
FILTER_FIELDS: Final = ("subject", "actor")
SECRET_BYTES: Final = (16, 512)  # shortest and longest secret taken
SIGNATURE_HEADER: Final = "Edgefleet-Signature"
TIMESTAMP_HEADER: Final = "Edgefleet-Timestamp"
EVENT_HEADER: Final = "Edgefleet-Event-Id"
TYPE_HEADER: Final = "Edgefleet-Event-Type"
DELIVERY_HEADER: Final = "Edgefleet-Delivery"


class DeliveryState(StrEnum):
    PENDING = "pending"      # waiting for its next attempt (or under way)
    DELIVERED = "delivered"  # an attempt was answered 2xx
    DEAD = "dead"            # every attempt failed; waits for a replay


@dataclass(frozen=True)
class DeliveryPolicy:
    """Retries and limits of deliveries; checked when made.

    The wait before retry N (1, 2, ...) is `initial * multiplier**(N-1)`, capped at
    `maximum`, shortened by a random fraction of up to `jitter` so that the
    deliveries that failed together (an endpoint down) do not come back together.
    """

    attempts: int = 10
    initial: float = 5.0
    maximum: float = 3600.0
    multiplier: float = 2.0
    jitter: float = 0.5
    timeout: float = 10.0  # one request, connecting and answering
    per_endpoint: int = 4  # requests in flight to one subscription at once

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 100:
            raise ValueError(f"webhook attempts must be 1-100, got {self.attempts}")
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"webhook backoff needs 0 < initial <= maximum, got "
                             f"{self.initial}, {self.maximum}")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"webhook backoff needs multiplier >= 1 and 0 <= jitter < 1, "
                             f"got {self.multiplier}, {self.jitter}")
        if not 0 < self.timeout <= 300:
            raise ValueError(f"webhook timeout must be in (0, 300] s, got {self.timeout}")
        if not 1 <= self.per_endpoint <= 16:
            raise ValueError(f"webhook per-endpoint concurrency must be 1-16, got "
                             f"{self.per_endpoint}")

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry RETRY (1 for the first)."""
        base = min(self.maximum, self.initial * self.multiplier ** min(retry - 1, 64))
        return base * (1 - self.jitter * rand())


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The value of Edgefleet-Signature for BODY sent at TIMESTAMP."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


# Subscriptions


def _check(url: str, types: Sequence[str], filter: Mapping[str, str], secret: str) -> None:
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InvalidInput(f"url must be an http:// or https:// URL with a host, got "
                           f"{url[:100]!r}")
    if parts.username or parts.password:
        raise InvalidInput("url must not carry a user or password (it is listed to every "
                           "admin); authenticate receivers by the signature")
    if not types:
        raise InvalidInput("give at least one event type pattern, e.g. 'rollout.*'")
    try:
        events.check_patterns(types)
    except BadPattern as exc:
        raise InvalidInput(str(exc)) from None
    for field, pattern in filter.items():
        if field not in FILTER_FIELDS:
            raise InvalidInput(f"filter field {field[:40]!r} is unknown; filter on "
                               f"{' or '.join(FILTER_FIELDS)}")
        if not pattern or len(pattern) > 200:
            raise InvalidInput(f"filter {field}= needs a pattern of 1-200 characters")
    low, high = SECRET_BYTES
    if not low <= len(secret.encode()) <= high or not secret.isprintable():
        raise InvalidInput(f"the secret must be {low}-{high} printable characters "
                           "(e.g. `openssl rand -hex 32`)")


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A subscription as listed: never its secret."""
    return {"id": row["id"], "url": row["url"], "types": json.loads(row["types"]),
            "filter": json.loads(row["filter"]), "created_at": row["created_at"],
            "created_by": row["created_by"],
            **{state.value: row.get(state.value, 0) or 0 for state in DeliveryState}}


def add(db: Database, *, url: str, types: Sequence[str], filter: Mapping[str, str],
        secret: str, created_by: str) -> dict[str, Any]:
    """A new subscription; it gets the events from now on."""
    _check(url, types, filter, secret)
    webhook_id = "wh-" + secrets.token_hex(4)
    stamp = format_time(datetime.now(UTC))
    with db.transaction() as conn:
        count = conn.execute("SELECT COUNT(*) FROM webhooks").fetchone()[0]
        if count >= MAX_WEBHOOKS:
            raise Conflict(f"the hub has {count} webhooks, the most it takes; remove one "
                           "with `edgefleet webhook remove ID`")
        conn.execute(
            "INSERT INTO webhooks (id, url, types, filter, secret, cursor, created_at,"
            " created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (webhook_id, url, dumps(list(types)), dumps(dict(filter)), secret,
             events.last_seq(db), stamp, created_by))
    return get(db, webhook_id)


_COUNTS = ("SELECT w.*, " + ", ".join(
    f"(SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id"
    f" AND d.state = '{s.value}') AS {s.value}" for s in DeliveryState) + " FROM webhooks w")


def list_all(db: Database) -> list[dict[str, Any]]:
    return [_public(r) for r in db.query(_COUNTS + " ORDER BY created_at, id")]


def get(db: Database, webhook_id: str) -> dict[str, Any]:
    row = db.query_one(_COUNTS + " WHERE w.id = ?", (webhook_id,))
    if row is None:
        raise NotFound(f"no webhook {webhook_id[:40]!r}; `edgefleet webhook list` shows them")
    return _public(row)


def remove(db: Database, webhook_id: str) -> dict[str, Any]:
    found = get(db, webhook_id)
    with db.transaction() as conn:
        conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
    return found


def deliveries(db: Database, webhook_id: str, *, state: DeliveryState | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
    """The subscription's deliveries, newest first, with the event each one carries."""
    get(db, webhook_id)
    rows = db.query(
        "SELECT d.id, d.event_seq, e.type AS event_type, e.subject, d.state, d.attempts,"
        " d.next_at, d.last_status, d.last_error, d.created_at, d.updated_at"
        " FROM webhook_deliveries d JOIN events e ON e.seq = d.event_seq"
        " WHERE d.webhook_id = ?" + (" AND d.state = ?" if state else "")
        + " ORDER BY d.id DESC LIMIT ?",
        (webhook_id, state.value, limit) if state else (webhook_id, limit))
    for row in rows:
        if row["state"] != DeliveryState.PENDING:
            row["next_at"] = None
    return rows


def replay(db: Database, webhook_id: str, delivery_ids: Sequence[int] = ()) -> int:
    """Send again DELIVERY_IDS (dead or delivered), or all dead letters for none; from
    a first attempt, now. How many were queued."""
    get(db, webhook_id)
    stamp = format_time(datetime.now(UTC))
    with db.transaction() as conn:
        if delivery_ids:
            return conn.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = 0, next_at = ?,"
                " updated_at = ? WHERE webhook_id = ? AND state != ?"
                " AND id IN (SELECT CAST(value AS BIGINT) FROM json_each(?))",
                (DeliveryState.PENDING, stamp, stamp, webhook_id, DeliveryState.PENDING,
                 dumps(list(delivery_ids)))).rowcount
        return conn.execute(
            "UPDATE webhook_deliveries SET state = ?, attempts = 0, next_at = ?, updated_at = ?"
            " WHERE webhook_id = ? AND state = ?",
            (DeliveryState.PENDING, stamp, stamp, webhook_id, DeliveryState.DEAD)).rowcount


# Delivery


def fan_out(db: Database, *, limit: int = 1000) -> int:
    """Queue a delivery for each subscription and each event after its cursor that it
    wants; at most LIMIT events per subscription a call. How many were queued."""
    queued, top = 0, events.last_seq(db)
    for hook in db.query("SELECT id, types, filter, cursor FROM webhooks WHERE cursor < ?",
                         (top,)):
        found = events.after(db, hook["cursor"], limit=limit,
                             types=events.types_matching(json.loads(hook["types"])))
        cursor = top if len(found) < limit else found[-1].id
        wanted = [e for e in found if _matches(e, json.loads(hook["filter"]))]
        stamp = format_time(datetime.now(UTC))
        with db.transaction() as conn:
            moved = conn.execute("UPDATE webhooks SET cursor = ? WHERE id = ? AND cursor = ?",
                                 (cursor, hook["id"], hook["cursor"])).rowcount
            if moved:  # else removed meanwhile
                conn.executemany(
                    "INSERT INTO webhook_deliveries (webhook_id, event_seq, state, attempts,"
                    " next_at, created_at, updated_at) VALUES (?, ?, ?, 0, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    [(hook["id"], e.id, DeliveryState.PENDING, stamp, stamp, stamp)
                     for e in wanted])
                queued += len(wanted)
    return queued


def _matches(event: Event, filter: Mapping[str, str]) -> bool:
    return all(fnmatch.fnmatchcase(getattr(event, field), pattern)
               for field, pattern in filter.items())


@dataclass(frozen=True)
class _Due:
    id: int
    webhook_id: str
    url: str
    secret: str
    attempts: int
    event: Event


def due(db: Database, now: datetime, *, per_endpoint: int, room: Mapping[str, int],
        busy: Sequence[int], only: str | None = None) -> list[_Due]:
    """Pending deliveries whose time has come, not those in BUSY, at most ROOM[id] per
    subscription (its free slots; PER_ENDPOINT for one not listed); ONLY: of that one."""
    found = []
    for hook in db.query("SELECT id, url, secret FROM webhooks"
                         + (" WHERE id = ?" if only else "") + " ORDER BY id",
                         (only,) if only else ()):
        free = room.get(hook["id"])
        if free is not None and free <= 0:
            continue
        rows = db.query(
            "SELECT d.id, d.attempts, e.* FROM webhook_deliveries d"
            " JOIN events e ON e.seq = d.event_seq WHERE d.webhook_id = ? AND d.state = ?"
            " AND d.next_at <= ? AND d.id NOT IN (SELECT CAST(value AS BIGINT) FROM json_each(?))"
            " ORDER BY d.next_at, d.id LIMIT ?",
            (hook["id"], DeliveryState.PENDING, format_time(now), dumps(list(busy)),
             free if free is not None else per_endpoint))
        found += [_Due(r["id"], hook["id"], hook["url"], hook["secret"], r["attempts"],
                       Event.from_row(r)) for r in rows]
    return found


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: STATUS None when no answer came (ERROR says why)."""

    delivery: _Due
    status: int | None
    error: str
    at: datetime

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def settle(db: Database, outcomes: Sequence[Outcome], *, policy: DeliveryPolicy,
           rand: Callable[[], float]) -> list[DeliveryState]:
    """Write what OUTCOMES came to, in one transaction; each delivery's state after it."""
    states, rows = [], []
    for outcome in outcomes:
        delivery, status = outcome.delivery, outcome.status
        attempts = delivery.attempts + 1
        next_at = None
        if outcome.ok:
            state = DeliveryState.DELIVERED
        elif attempts >= policy.attempts:
            state = DeliveryState.DEAD
        else:
            state = DeliveryState.PENDING
            next_at = format_time(outcome.at + timedelta(seconds=policy.delay(attempts, rand)))
        states.append(state)
        rows.append((state, attempts, next_at, status, outcome.error[:500],
                     format_time(outcome.at), delivery.id, delivery.attempts))
    with db.transaction() as conn:
        # Only if nobody replayed or removed it meanwhile (attempts would differ).
        conn.executemany(
            "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_at = ?,"
            " last_status = ?, last_error = ?, updated_at = ? WHERE id = ? AND attempts = ?",
            rows)
    return states


class Dispatcher:
    """The delivery thread (its own asyncio loop). CLOCK and RAND are injected (the
    backoff's jitter); POLL is how often it looks for new events and due retries."""

    def __init__(self, db: Database, policy: DeliveryPolicy, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 rand: Callable[[], float] = random.random, poll: float = 0.25,
                 leads: Callable[[], bool] = lambda: True) -> None:
        """LEADS says whether this hub runs the one-replica jobs now (hub/leader.py)."""
        if poll <= 0:
            raise ValueError(f"the webhook dispatcher needs a positive poll, got {poll}")
        self.db, self.policy, self.clock, self.rand, self.poll = db, policy, clock, rand, poll
        self.leads = leads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        # Subscriptions whose last round failed: (rounds failed in a row, rest until).
        # Kept in memory: a restarted hub tries every endpoint afresh.
        self._resting: dict[str, tuple[int, datetime]] = {}

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="webhook-dispatch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; requests under way are dropped and stay pending (sent again on start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    async def _main(self) -> None:
        flying: dict[int, tuple[str, asyncio.Task[Outcome]]] = {}
        # A finished delivery frees a slot: look again at once, not after the poll, so
        # one endpoint's rate is not bounded by per_endpoint / poll.
        freed = asyncio.Event()
        async with httpx.AsyncClient(follow_redirects=False,
                                     headers={"User-Agent": "edgefleet-hub"}) as http:
            while not self._stop.is_set():
                try:
                    await self._settle_done(flying)
                    if await asyncio.to_thread(self.leads):  # else another hub delivers
                        await asyncio.to_thread(fan_out, self.db)
                        for delivery in await asyncio.to_thread(
                                due, self.db, self.clock(),
                                per_endpoint=self.policy.per_endpoint,
                                room=self._room(flying), busy=list(flying)):
                            flying[delivery.id] = (delivery.webhook_id, asyncio.create_task(
                                self._deliver(http, delivery, freed)))
                except Exception:  # a busy database, a bug: logged, and the loop goes on
                    log.exception("webhook dispatch failed; trying again")
                    self._count("dispatch_failures")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), self.poll)
                freed.clear()
            for _, task in flying.values():
                task.cancel()
            await asyncio.gather(*(task for _, task in flying.values()),
                                 return_exceptions=True)

    def _room(self, flying: dict[int, tuple[str, asyncio.Task[Outcome]]]) -> dict[str, int]:
        """Free slots per subscription: none while it rests, one (a probe) after."""
        busy = Counter(hook for hook, _ in flying.values())
        room = {hook: self.policy.per_endpoint - n for hook, n in busy.items()}
        now = self.clock()
        for hook, (_, until) in self._resting.items():
            room[hook] = 0 if now < until else 1 - busy[hook]
        return room

    async def _settle_done(self, flying: dict[int, tuple[str, asyncio.Task[Outcome]]]) -> None:
        """Write the attempts that finished, all in one transaction: one write per round,
        not one per attempt, so a failing endpoint's retries cost the others (and the
        API, which needs the same write lock) little. They stay in FLYING until written,
        so none is picked again before.

        An endpoint whose every attempt of the round failed rests (the policy's backoff,
        per round failed in a row), then gets one attempt at a time until one succeeds;
        its other due deliveries count the failure too, unsent. So an endpoint down with
        a backlog is neither hammered nor kept from its dead letters."""
        done = [key for key, (_, task) in flying.items() if task.done()]
        if not done:
            return
        outcomes = [flying[key][1].result() for key in done]
        states = await asyncio.to_thread(settle, self.db, outcomes, policy=self.policy,
                                         rand=self.rand)
        for key, state in zip(done, states, strict=True):
            del flying[key]
            self._count("delivered" if state == DeliveryState.DELIVERED else
                        "dead" if state == DeliveryState.DEAD else "failed_attempts")
        succeeded = {o.delivery.webhook_id for o in outcomes if o.ok}
        for hook in succeeded:
            self._resting.pop(hook, None)
        failed = {o.delivery.webhook_id: o for o in outcomes
                  if o.delivery.webhook_id not in succeeded}
        for hook, outcome in failed.items():
            rounds = self._resting.get(hook, (0, outcome.at))[0] + 1
            until = outcome.at + timedelta(seconds=self.policy.delay(rounds, self.rand))
            self._resting[hook] = (rounds, until)
            unsent = await asyncio.to_thread(
                due, self.db, outcome.at, per_endpoint=10_000, room={}, busy=list(flying),
                only=hook)
            if unsent:
                await asyncio.to_thread(
                    settle, self.db, [Outcome(d, outcome.status, f"not sent, the endpoint "
                                      f"failed just before: {outcome.error}", outcome.at)
                                      for d in unsent], policy=self.policy, rand=self.rand)

    async def _deliver(self, http: httpx.AsyncClient, delivery: _Due,
                       freed: asyncio.Event) -> Outcome:
        body = delivery.event.to_json().encode()
        stamp = int(self.clock().timestamp())
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(stamp),
                   SIGNATURE_HEADER: sign(delivery.secret, stamp, body),
                   EVENT_HEADER: str(delivery.event.id), TYPE_HEADER: delivery.event.type,
                   DELIVERY_HEADER: str(delivery.id)}
        status, error = None, ""
        try:
            status = await asyncio.wait_for(self._post(http, delivery.url, body, headers),
                                            self.policy.timeout)
            error = "" if 200 <= status < 300 else f"answered HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self.policy.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - whatever it was, the attempt failed
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            freed.set()
        return Outcome(delivery, status, error, self.clock())

    async def _post(self, http: httpx.AsyncClient, url: str, body: bytes,
                    headers: dict[str, str]) -> int:
        # The answer's body is not read: only its status counts.
        async with http.stream("POST", url, content=body, headers=headers,
                               timeout=self.policy.timeout) as response:
            return response.status_code
