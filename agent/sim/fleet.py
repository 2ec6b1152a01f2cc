"""Many simulated devices in one process: enroll them, run them, count, save, stop.

    async with Fleet(hub_url, token, 1000, SimOptions(data_dir=path)) as fleet:
        await fleet.wait(lambda f: f.connected == 1000, timeout=60)
        fleet.devices[0].go_offline(5)

Device number i is named `{name_prefix}{i:05d}`; its identity (agent.identity:
key pair, device id, credentials, pinned hub key) lives in
DATA_DIR/devices/<name>/, so a restarted fleet is the same devices, and only
the missing ones enroll. Their state (applied generation, what serves,
refusals, telemetry sequence numbers) is saved in DATA_DIR/sim-state.json
every few seconds and on stop.

A fleet can be a part of a larger one (`first`: device numbers first..first+count-1,
agent/sim/processes.py runs several in child processes). A part saves only its
own devices, in its own file (sim-state.FIRST-LAST.json), so parts never write
over each other; every fleet reads all the state files, the newest file
winning for a device that is in several, so a sequence number is not reused
whatever split ran before.

Connections are attempted at most `connect_concurrency` at a time, with
jitter and backoff (agent.mqtt.BackoffPolicy), at start and after every drop:
a thousand clients reconnecting at once is what breaks some brokers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from agent import identity as identities
from agent.identity import EnrollmentError, Identity
from agent.sim.device import SimDevice
from agent.sim.options import SimOptions
from contract.files import write_json
from contract.protocol import ProtocolError, UpdateState

log = logging.getLogger("edgefleet.sim")

STATE_FILE: Final = "sim-state.json"
SAVE_EVERY: Final = 30.0  # seconds; device.SEQ_MARGIN covers points measured in between


def device_names(options: SimOptions, count: int, first: int = 0) -> list[str]:
    return [f"{options.name_prefix}{i:05d}" for i in range(first, first + count)]


def unenrolled(options: SimOptions, count: int) -> int:
    """How many of the first COUNT devices have no identity yet."""
    return sum(not (options.data_dir / "devices" / name / identities.IDENTITY_FILE).exists()
               for name in device_names(options, count))


def state_file(first: int, count: int, part: bool) -> str:
    return f"sim-state.{first}-{first + count - 1}.json" if part else STATE_FILE


def load_states(data_dir: Path) -> dict[str, Any]:
    """Every state file's devices merged, the newest file winning (see the docstring)."""
    files = sorted(data_dir.glob("sim-state*.json"), key=lambda path: path.stat().st_mtime)
    merged: dict[str, Any] = {}
    for path in files:
        merged.update(json.loads(path.read_text()))
    return merged


class Fleet:
    def __init__(self, hub_url: str | None, token: str | None, count: int,
                 options: SimOptions | None = None, *, first: int = 0,
                 part: bool = False) -> None:
        """PART: this fleet is one of several running at once (see the docstring)."""
        if count < 1 or first < 0:
            raise ValueError(f"a fleet needs at least one device from number 0 on, "
                             f"got {count} from {first}")
        self.hub_url = hub_url
        self.token = token
        self.count = count
        self.first = first
        self._state_file = state_file(first, count, part)
        self._part = part
        self.options = options or SimOptions()
        self.devices: list[SimDevice] = []
        self.enrolled = 0           # identities ready, loaded or new: for progress output
        self.started_at: float | None = None
        self.all_connected_after: float | None = None  # seconds until every device was online
        self.connected = 0          # devices connected now
        self._first_connects = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._saver: asyncio.Task[None] | None = None
        self._saved: dict[str, Any] = {}  # by device name, including devices not running now

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.stop()

    # -- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """Enroll what is missing (EnrollmentError if it cannot), then start every device."""
        if self._tasks:
            raise RuntimeError("this fleet is running already")
        found = await self._identities()
        slots = asyncio.Semaphore(self.options.connect_concurrency)
        self.devices = [SimDevice(identity, self.options, slots, self._connection,
                                  number=self.first + i) for i, identity in enumerate(found)]
        saved = self._saved = self._load_state()
        unusable: list[ProtocolError] = []
        for device in self.devices:
            try:
                if device.name in saved:
                    device.restore(saved[device.name])
            except ProtocolError as exc:
                unusable.append(exc)
        if unusable:  # one line, not one per device
            log.warning("the saved state of %d devices is not usable (%s); they start without it",
                        len(unusable), unusable[0])
        self.started_at = time.monotonic()
        self._tasks = [asyncio.create_task(device.run(), name=device.name)
                       for device in self.devices]
        self._saver = asyncio.create_task(self._save_regularly())

    async def stop(self) -> None:
        """Every device says "offline" and disconnects; the state is saved."""
        if self._saver is not None:
            self._saver.cancel()
        for device in self.devices:
            device.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.devices:
            await self._save(final=True)

    # -- what tests and the CLI look at ---------------------------------------------------

    async def wait(self, predicate: Callable[[Fleet], bool], *, timeout: float,
                   what: str = "the fleet") -> None:
        """Until PREDICATE(fleet) holds; TimeoutError naming WHAT if it does not in time."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: not there after {timeout} s; now {self.status()}")
            await asyncio.sleep(0.05)

    def status(self) -> dict[str, Any]:
        """Fleet counters, one JSON object (the CLI's --json-status-every line)."""
        serving: Counter[str] = Counter()
        failed = 0
        for device in self.devices:
            for slot in device.serving.values():
                serving.update(f"{slot.model}:{v}" for v in sorted(slot.route.versions()))
            failed += any(s.state in (UpdateState.FAILED, UpdateState.ROLLING_BACK,
                                      UpdateState.ROLLED_BACK) for s in device.statuses.values())
        return {
            "devices": self.count,
            "enrolled": self.enrolled,
            "connected": self.connected,
            "all_connected_after": self.all_connected_after,
            "serving": dict(sorted(serving.items())),
            "updating": sum(d.updating for d in self.devices),
            "failed": failed,  # devices whose latest update of some deployment failed
            "failed_updates": sum(d.failed_updates for d in self.devices),
            "refusals": sum(len(d.refusals) for d in self.devices),
            "connects": sum(d.connects for d in self.devices),
            "drops": sum(d.drops for d in self.devices),
            "sent": sum(d.sent for d in self.devices),
            "received": sum(d.received for d in self.devices),
            "telemetry_dropped": sum(d.telemetry_dropped for d in self.devices),
        }

    def _connection(self, device: SimDevice, up: bool) -> None:
        """Kept as a count: the CLI's progress asks often, and summing 10,000 devices costs."""
        self.connected += 1 if up else -1
        if up and device.connects == 1:
            self._first_connects += 1
            if self._first_connects == self.count and self.started_at is not None:
                self.all_connected_after = round(time.monotonic() - self.started_at, 3)

    # -- identities -------------------------------------------------------------------

    async def _identities(self) -> list[Identity]:
        directories = [self.options.data_dir / "devices" / name
                       for name in device_names(self.options, self.count, self.first)]
        loaded = await asyncio.to_thread(lambda: [identities.load(d) for d in directories])
        missing = [i for i, found in enumerate(loaded) if found is None]
        self.enrolled = self.count - len(missing)
        if missing and not (self.hub_url and self.token):
            raise EnrollmentError(f"{len(missing)} of {self.count} devices are not enrolled yet: "
                                  "give the hub URL and an enrollment token")
        todo = iter(missing)

        async def enroll_some() -> None:  # one of enroll_concurrency workers
            for i in todo:
                loaded[i] = await asyncio.to_thread(
                    identities.enroll, directories[i], hub_url=self.hub_url or "",
                    token=self.token or "", name=directories[i].name,
                    platform=self.options.platform,
                    mqtt_url=self.options.broker_for(self.first + i))
                self.enrolled += 1

        try:
            async with asyncio.TaskGroup() as workers:  # the first failure stops the others
                for _ in range(min(self.options.enroll_concurrency, len(missing))):
                    workers.create_task(enroll_some())
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [found for found in loaded if found is not None]

    # -- saved state ------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        return load_states(self.options.data_dir)

    async def _save(self, *, final: bool) -> None:
        mine = {device.name: device.snapshot(final=final) for device in self.devices}
        # A whole fleet keeps the saved state of devices beyond this run's count (their
        # sequence numbers); a part writes only its own.
        self._saved.update(mine)
        path = self.options.data_dir / self._state_file
        await asyncio.to_thread(write_json, path, mine if self._part else dict(self._saved))

    async def _save_regularly(self) -> None:
        while True:  # at once too: a crash before the first round must not reuse numbers
            await self._save(final=False)
            await asyncio.sleep(SAVE_EVERY)
