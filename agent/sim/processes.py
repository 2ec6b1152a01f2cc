"""One simulated fleet in several processes: `edgefleet sim --processes N`.

One process's event loop holds ~10,000 devices before it sets the pace
itself (bench/rollout.py); more devices need more cores. The device
numbers 0..count-1 are split into N disjoint ranges, each run by a child
process as a part fleet (agent/sim/fleet.py, its own MQTT connections and
state file). `ProcessFleet` looks like a `Fleet` to the CLI: the children's
counters come over a pipe and are summed here.

Children die with the parent (PR_SET_PDEATHSIG, checked after it is set),
so a parent killed even with SIGKILL leaves no orphans; on a stop the
parent sends each child SIGTERM, and each takes its devices offline as a
one-process sim does. Children ignore SIGINT: the parent's Ctrl-C, which
the terminal sends to the whole process group, reaches them as its SIGTERM
instead, once and in order. A child that fails to start (enrollment) or
dies stops the whole fleet.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from agent.identity import EnrollmentError
from agent.sim.fleet import Fleet
from agent.sim.options import SimOptions

log = logging.getLogger("edgefleet.sim")

PR_SET_PDEATHSIG: Final = 1
COUNTERS_EVERY: Final = 0.2  # seconds between a child's progress messages
STOP_WAIT: Final = 60.0      # seconds a child gets to take its devices offline


def split(count: int, processes: int) -> list[tuple[int, int]]:
    """(first, count) of each part: disjoint, covering 0..count-1, sizes differing by
    at most one."""
    if not 1 <= processes <= count:
        raise ValueError(f"{processes} processes for {count} devices: give 1 to {count}")
    size, extra = divmod(count, processes)
    parts, first = [], 0
    for i in range(processes):
        n = size + (i < extra)
        parts.append((first, n))
        first += n
    return parts


def merge(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """The children's `Fleet.status()` documents summed into one of the same shape."""
    merged: dict[str, Any] = {}
    serving: Counter[str] = Counter()
    for status in statuses:
        serving.update(status["serving"])
        for key, value in status.items():
            if isinstance(value, int):
                merged[key] = merged.get(key, 0) + value
    merged["serving"] = dict(sorted(serving.items()))
    return merged


@dataclass(frozen=True)
class _Part:
    hub_url: str | None
    token: str | None
    first: int
    count: int
    options: SimOptions
    status_every: float | None  # full status documents this often, else counters only
    log_level: int
    parent: int                 # pid of the process that must be alive


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl: no signal will come
        raise SystemExit(1)


def _child(part: _Part, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see the module docstring
    _die_with_parent(part.parent)
    logging.basicConfig(level=part.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        asyncio.run(_run_part(part, conn))
    finally:
        conn.close()


def _counters(fleet: Fleet) -> dict[str, int]:
    return {"enrolled": fleet.enrolled, "connected": fleet.connected}


async def _run_part(part: _Part, conn: Connection) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    fleet = Fleet(part.hub_url, part.token, part.count, part.options, first=part.first,
                  part=True)
    starting = asyncio.create_task(fleet.start())
    while not starting.done() and not stop.is_set():
        conn.send(("counters", _counters(fleet)))
        await asyncio.wait([starting], timeout=COUNTERS_EVERY)
    if not starting.done():  # stopped while enrolling: the enrolled ones are kept
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        conn.send(("stopped", _counters(fleet)))
        return
    try:
        starting.result()
    except EnrollmentError as exc:
        conn.send(("failed", str(exc)))
        return
    conn.send(("started", _counters(fleet)))
    status_at = time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), COUNTERS_EVERY)
        except TimeoutError:
            pass
        conn.send(("counters", _counters(fleet)))
        if part.status_every is not None and time.monotonic() - status_at >= part.status_every:
            status_at = time.monotonic()
            conn.send(("status", fleet.status()))
    await fleet.stop()
    conn.send(("stopped", fleet.status()))


class _Child:
    """The parent's view of one child: its process and the latest it said."""

    def __init__(self, process: BaseProcess, conn: Connection, count: int) -> None:
        self.process, self.conn = process, conn
        self.counters = {"enrolled": 0, "connected": 0}
        self.status: dict[str, Any] = {"devices": count, "serving": {}}
        self.started = self.stopped = False
        self.failure: str | None = None


class ProcessFleet:
    """A fleet in PROCESSES child processes, used like a `Fleet` (start, status, stop)."""

    def __init__(self, hub_url: str | None, token: str | None, count: int,
                 options: SimOptions, processes: int, *, status_every: float | None = None,
                 log_level: int = logging.WARNING) -> None:
        self.count = count
        self._parts = [_Part(hub_url, token, first, n, options, status_every, log_level,
                             os.getpid()) for first, n in split(count, processes)]
        self._children: list[_Child] = []
        self._started_at = 0.0
        self._stopping = False
        self.all_connected_after: float | None = None
        self.lost: str | None = None  # why the fleet stopped by itself, if it did
        self.on_lost: Callable[[], object] | None = None  # called from a reader thread

    @property
    def enrolled(self) -> int:
        return sum(c.counters["enrolled"] for c in self._children)

    @property
    def connected(self) -> int:
        return sum(c.counters["connected"] for c in self._children)

    async def start(self) -> None:
        """Start every child; returns once all have started their devices.
        EnrollmentError if a child could not enroll its devices."""
        # spawn, not fork: the parent runs threads (rich's progress, the readers).
        context = multiprocessing.get_context("spawn")
        self._started_at = time.monotonic()
        for i, part in enumerate(self._parts):
            ours, theirs = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(part, theirs), daemon=True,
                                      name=f"edgefleet-sim-{i}")
            process.start()
            theirs.close()
            child = _Child(process, ours, part.count)
            self._children.append(child)
            threading.Thread(target=self._read, args=(child,), daemon=True,
                             name=f"sim-reader-{i}").start()
        try:
            while not all(c.started for c in self._children):
                failed = [c.failure for c in self._children if c.failure]
                if failed:
                    raise EnrollmentError(failed[0])
                if self.lost:
                    raise RuntimeError(self.lost)
                await asyncio.sleep(0.05)
        except BaseException:  # failed, or cancelled (stopped while enrolling): all stop
            await self.stop()
            raise

    def _read(self, child: _Child) -> None:
        """A reader thread: the child's messages until its pipe closes."""
        try:
            while True:
                kind, body = child.conn.recv()
                if kind == "failed":
                    child.failure = body
                    continue
                if kind in ("status", "stopped") and "serving" in body:
                    child.status = body
                else:
                    child.counters.update(body)
                if kind == "stopped":
                    child.stopped = True
                child.started |= kind == "started"
                if self.all_connected_after is None and self.connected == self.count:
                    self.all_connected_after = round(time.monotonic() - self._started_at, 3)
        except (EOFError, OSError):
            pass
        if not (child.stopped or child.failure or self.lost or self._stopping):
            child.process.join(5)
            self.lost = (f"simulator process {child.process.name} ended unexpectedly "
                         f"(exit code {child.process.exitcode})")
            log.error("%s; stopping the others", self.lost)
            if self.on_lost is not None:
                self.on_lost()

    def status(self) -> dict[str, Any]:
        """The children's latest status documents, summed (each up to its status_every
        old), with the freshest counters and this process's all_connected_after."""
        merged = merge([c.status for c in self._children])
        merged.update(devices=self.count, enrolled=self.enrolled, connected=self.connected,
                      all_connected_after=self.all_connected_after)
        return merged

    async def stop(self) -> None:
        """SIGTERM to every child that runs; each takes its devices offline and saves its
        state. One that has not finished after STOP_WAIT seconds is killed."""
        self._stopping = True
        for child in self._children:
            if child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + STOP_WAIT
        for child in self._children:
            await asyncio.to_thread(child.process.join, max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("%s did not stop in %.0f s; killing it", child.process.name, STOP_WAIT)
                child.process.kill()
                await asyncio.to_thread(child.process.join)
