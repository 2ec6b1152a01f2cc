"""Commands from the hub on this device's commands topic: checked, run off the main loop,
answered over HTTPS with the device's own token.

A command is believed only once `contract.protocol.verify_command` took it: the hub's
signature (the key this device trusts), this device's id, an id not taken before, not
expired, not issued in the future. What is refused is reported with the device's other
refusals (its reported state) and never run. The ids of commands taken are saved
(`commands-seen.json`, written atomically) before one runs, with their expiry: a command
is valid for at most an hour, so the file holds at most an hour of them, and a replay
after a restart is refused as one.

One kind: `profile`. Its package is fetched for this platform, its signature checked and
unpacked as a deployment's is (agent/profiling.py `stage_package`, in a work directory of
its own), then each (runtime, device) pair here that reads its format is measured in a
child process (`Profiler`, through `profiling.profile`; what a taken profile runs is given
to `Commands`, so the simulator, agent/sim/device.py, uses all the rest as it is and
answers `failed`: it has no runtime). One profile at a time: a second command while one
runs is answered `failed` (busy). The answer goes to `POST /api/v1/devices/{id}/commands/
{cid}/result`: `running` when taken, then `done` with the rows or `failed` with why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.identity import hub_tls
from contract import names
from contract.files import read_json, write_json
from contract.keys import RotationError
from contract.profiles import batch_sizes
from contract.protocol import (
    MAX_TEXT,
    Command,
    CommandResult,
    CommandState,
    ProtocolRefusal,
    Reason,
    build_command_result,
    format_time,
    verify_command,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.identity import Identity
    from packager.distribution import Registry

log = logging.getLogger("edgefleet.agent.commands")

SEEN_FILE = "commands-seen.json"
MAX_SEEN = 1024        # commands taken within their validity (an hour): far above one at a time
POST_ATTEMPTS = 5      # an answer is retried with backoff while the hub is unreachable


class SeenCommands:
    """The ids of commands this device took that are still valid, saved across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = read_json(path) if path.exists() else {}
        self._ids: dict[str, str] = saved if isinstance(saved, dict) else {}

    def ids(self, now: datetime) -> set[str]:
        stamp = format_time(now)
        return {cid for cid, expires in self._ids.items() if expires > stamp}

    def take(self, command: Command, now: datetime) -> bool:
        """Remember COMMAND (saved before it runs); False when too many are still valid."""
        live = {cid: e for cid, e in self._ids.items() if e > format_time(now)}
        if len(live) >= MAX_SEEN:
            return False
        live[command.id] = format_time(command.expires_at)
        write_json(self.path, live)
        self._ids = live
        return True


class Trusted(Protocol):
    """The hub key a device trusts now (agent/trust.py's TrustStore; the simulator's own)."""

    @property
    def key(self) -> ec.EllipticCurvePublicKey: ...
    @property
    def retired(self) -> Collection[str]: ...


# What a profile command runs once taken: its rows, or an exception that says why not.
Measure = Callable[[Command], list[dict[str, Any]]]


class Commands:
    """Checks and runs the commands of the device IDENTITY; REFUSE reports a refusal, MEASURE
    runs a profile taken (this device's runtimes: `Profiler`; the simulator's answer)."""

    def __init__(self, identity: Identity, data_dir: Path, trust: Trusted,
                 refuse: Callable[[ProtocolRefusal], None], measure: Measure) -> None:
        self.identity, self.data_dir, self.trust = identity, data_dir, trust
        self.refuse, self.measure = refuse, measure
        self.seen = SeenCommands(data_dir / SEEN_FILE)
        self._job: threading.Thread | None = None
        self._running: str | None = None

    def handle(self, payload: bytes) -> None:
        now = datetime.now(UTC)
        try:
            command = verify_command(payload, public_key=self.trust.key,
                                     device_id=self.identity.device_id,
                                     seen=self.seen.ids(now), now=now,
                                     retired=self.trust.retired)
        except RotationError as exc:
            self.refuse(ProtocolRefusal(Reason.BAD_SIGNATURE, f"command: hub key: {exc}"))
            return
        except ProtocolRefusal as refusal:
            self.refuse(refusal)
            return
        try:
            taken = self.seen.take(command, now)
        except OSError as exc:  # not saved: running it would leave a replay open
            log.error("command %s not run: could not save its id: %s", command.id, exc)
            return
        if not taken:
            self._answer(command, CommandState.FAILED,
                         error=f"this device took {MAX_SEEN} commands within the hour")
        elif self._job is not None and self._job.is_alive():
            self._answer(command, CommandState.FAILED,
                         error=f"busy: this device is profiling (command {self._running})")
        else:
            log.info("command %s: profile %s:%d (%s)", command.id, command.profile.model,
                     command.profile.version, command.profile.variant)
            self._running = command.id
            self._job = threading.Thread(target=self._run, args=(command,),
                                         name=f"command-{command.id}", daemon=True)
            self._job.start()

    def _run(self, command: Command) -> None:
        if not self._answer(command, CommandState.RUNNING):
            return  # the hub will not take an answer (the command expired meanwhile)
        try:
            rows = self.measure(command)
        except Exception as exc:  # the runtime's, the registry's, the store's: all say why
            log.warning("command %s failed: %s", command.id, exc)
            self._answer(command, CommandState.FAILED, error=str(exc) or type(exc).__name__)
        else:
            self._answer(command, CommandState.DONE, rows=rows)

    def _answer(self, command: Command, state: CommandState, *, error: str | None = None,
                rows: list[dict[str, Any]] | None = None) -> bool:
        """Send the answer, retried while the hub is unreachable; False if the hub refused
        it (a finished or expired command), True otherwise."""
        import httpx  # here: an idle agent that never gets a command does not load it

        body = build_command_result(CommandResult(
            command.id, self.identity.device_id, state,
            error=error[:MAX_TEXT] if error is not None else None, rows=tuple(rows or ())))
        url = (f"{self.identity.hub_url}/api/v1/devices/{self.identity.device_id}/commands/"
               f"{command.id}/result")
        headers = {"Authorization": f"Bearer {self.identity.device_token}",
                   "Content-Type": "application/json"}
        for attempt in range(POST_ATTEMPTS):
            try:
                answer = httpx.post(url, content=body, headers=headers, timeout=30,
                                    verify=hub_tls(self.data_dir, self.identity))
            except httpx.TransportError as exc:
                problem = str(exc)
            else:
                if answer.status_code < 500:
                    if answer.is_error:  # the hub refused it (expired, say): nothing to retry
                        log.warning("command %s: the hub refused the %s answer: %s",
                                    command.id, state, answer.text[:300])
                    return not answer.is_error
                problem = f"HTTP {answer.status_code}"
            if datetime.now(UTC) >= command.expires_at or attempt == POST_ATTEMPTS - 1:
                break
            time.sleep(2 ** attempt)
        log.warning("command %s: the %s answer was not delivered: %s", command.id, state,
                    problem)
        return True


@dataclass
class Profiler:
    """A profile measured here: its package fetched from REGISTRY and checked with TRUST's
    key in DATA_DIR/profiling, each runtime that reads it measured in a child process."""

    data_dir: Path
    trust: Trusted
    registry: Callable[[], Registry]

    def __call__(self, command: Command) -> list[dict[str, Any]]:
        import shutil  # here: with bz2 and lzma ~0.5 MB an idle agent need not hold

        from agent import profiling
        from agent.runtimes.base import ModelRuntimeError

        args = command.profile
        work = self.data_dir / "profiling"
        shutil.rmtree(work, ignore_errors=True)  # a killed agent's leftovers
        try:
            staged = profiling.stage_package(
                self.registry(), f"models/{args.model}",
                names.package_tag(args.version, args.variant), self.trust.key, work)
            targets, skipped = profiling.targets(staged.framework)
            if not targets:
                raise RuntimeError(f"no runtime here can load {staged.framework} models: "
                                   f"{'; '.join(skipped) or 'none installed'}")
            device_class, rows, failed = profiling.device_class(), [], []
            for target in targets:
                if datetime.now(UTC) >= command.expires_at:
                    failed.append(f"{target.runtime}:{target.device}: not measured, the "
                                  "command expired")
                    continue
                try:
                    rows += [{"device_class": device_class, "variant": args.variant, **row}
                             for row in profiling.profile(
                                 staged.model_dir, staged.entrypoint, target,
                                 batch_sizes(args.max_batch), args.iterations,
                                 lambda note: log.info("command %s: %s", command.id, note))]
                except ModelRuntimeError as exc:
                    failed.append(f"{target.runtime}:{target.device}: {exc}")
            if not rows:
                raise RuntimeError("; ".join(failed))
            for problem in failed:
                log.warning("command %s: %s", command.id, problem)
            return rows
        finally:
            shutil.rmtree(work, ignore_errors=True)
