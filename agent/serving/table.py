"""What is loaded and where requests go: versions with reference counts, deployments, routes.

A deployment (a name clients use) routes to a primary version and optionally
a candidate: a share of the requests without a version in their path goes to
the candidate (A/B), or the same share of the requests answered by the
primary is mirrored to it (shadow). The table's random source decides which
requests; tests give it a seed. Replacing a deployment swaps its route in one step under the
table's lock; versions it no longer uses are retired, and a retired version
is closed by whoever lets go of it last, so requests already running on it
finish first. Routing takes a reference under the same lock, so no request
can start on a version after it has been retired.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.runtimes.base import LoadedModel
from agent.serving.errors import NotFound
from agent.serving.loading import VersionSpec

if TYPE_CHECKING:
    from agent.serving.batching import Batcher

log = logging.getLogger("edgefleet.serving")


def settle(typical: float, seconds: float) -> float:
    """A work time estimate for the choice of running on the event loop: the lowest
    recent time, drifting up 5 % a sample. Not an average: on a busy machine a thread
    that loses its CPU mid-call measures the wait too, and an average pushed over the
    inline limit that way sends sub-millisecond work through a thread hop, slower still.
    A model that really got slower is followed within a few dozen requests."""
    return min(seconds, typical * 1.05)


class ModelVersion:
    """One loaded version and the number of requests using it."""

    def __init__(self, deployment: str, spec: VersionSpec, model: LoadedModel) -> None:
        self.deployment = deployment
        self.spec = spec
        self.model = model
        self.loaded_at = time.time()
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        # Recent time a request takes here (decode, infer, encode), smoothed; the
        # scorer runs requests of versions this fast without a thread hop.
        self.typical_seconds = float("inf")
        self._seconds_per_byte = 0.0  # recent work per byte received, for the wait budget
        # The scorer's Batcher when the version batches (made at its first request); held
        # here so it goes when the version goes.
        self.batcher: Batcher | None = None

    @property
    def version(self) -> str:
        return self.spec.version

    def expected_seconds(self, size: int) -> float:
        """The work a request of SIZE bytes is expected to take here, for the wait budget:
        recent seconds per byte received times SIZE (0 until measured). Per byte, so a
        queue of large requests weighs more than one of small ones."""
        return self._seconds_per_byte * size

    def observe(self, work_seconds: float, size: int) -> None:
        """Fold one request's work time (and its SIZE in bytes) into the estimates."""
        self.typical_seconds = settle(self.typical_seconds, work_seconds)
        rate = work_seconds / max(size, 1)
        # Faster to follow than typical_seconds: the budget should notice a slow spell.
        self._seconds_per_byte = (rate if not self._seconds_per_byte
                                  else 0.7 * self._seconds_per_byte + 0.3 * rate)

    @property
    def users(self) -> int:
        return self._users

    def acquire(self) -> None:
        with self._lock:
            if self._retired:
                raise RuntimeError(f"{self} is retired; the table must not route to it")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            idle = self._retired and self._users == 0
        if idle:
            self._close_soon()

    def retire(self) -> None:
        """No new users from now on; close once the current ones are done."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            idle = self._users == 0
        if idle:
            self._close_soon()

    def _close_soon(self) -> None:
        # Its own thread: the last user may be the event loop or a request
        # whose response should not wait for a runtime to free its memory.
        threading.Thread(target=self._close, name=f"close {self}", daemon=True).start()

    def _close(self) -> None:
        try:
            self.model.close()
        except Exception:
            log.exception("closing %s failed", self)
        finally:
            self.closed.set()
            log.info("closed %s", self)

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(),
            "runtime": self.model.runtime,
            "device": self.model.device,
            "fallback_reason": self.model.fallback_reason,
            "signature": self.model.signature.to_dict(),
            "loaded_at": self.loaded_at,
            "in_flight": self._users,
        }

    def __str__(self) -> str:
        return f"{self.deployment}:{self.version}"


@dataclass(frozen=True)
class Deployment:
    name: str
    primary: ModelVersion
    candidate: ModelVersion | None = None
    traffic: int = 0  # percent of requests the candidate answers (split) or sees a copy of
    shadow: bool = False  # the candidate sees copies of what the primary answers

    def roles(self) -> Iterator[tuple[str, ModelVersion]]:
        yield "primary", self.primary
        if self.candidate is not None:
            yield "candidate", self.candidate

    def find(self, version: str) -> ModelVersion:
        for _, v in self.roles():
            if v.version == version:
                return v
        loaded = ", ".join(v.version for _, v in self.roles())
        raise NotFound(f"model '{self.name}' has no version '{version}'; loaded: {loaded}")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "primary": self.primary.describe(),
            "candidate": None if self.candidate is None else self.candidate.describe(),
            "traffic": self.traffic,
            "shadow": self.shadow,
        }


class ModelTable:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._lock = threading.Lock()
        self._deployments: dict[str, Deployment] = {}
        self._retired: list[ModelVersion] = []
        self._loading: set[str] = set()
        self._rng = rng or random.Random()

    def get(self, name: str) -> Deployment:
        with self._lock:
            return self._get(name)

    def find(self, name: str) -> Deployment | None:
        with self._lock:
            return self._deployments.get(name)

    def deployments(self) -> list[Deployment]:
        with self._lock:
            return [self._deployments[name] for name in sorted(self._deployments)]

    def lease(self, name: str, version: str | None) -> ModelVersion:
        """The version that answers this request, with a reference the caller must release."""
        with self._lock:
            deployment = self._get(name)
            if version is not None:
                chosen = deployment.find(version)
            elif deployment.candidate is not None and self._sampled(deployment, shadow=False):
                chosen = deployment.candidate
            else:
                chosen = deployment.primary
            chosen.acquire()
            return chosen

    def lease_shadow(self, name: str, answered_by: ModelVersion) -> ModelVersion | None:
        """The candidate that should see a copy of a request ANSWERED_BY the primary, if any."""
        with self._lock:
            deployment = self._deployments.get(name)
            if deployment is None or deployment.primary is not answered_by:
                return None
            candidate = deployment.candidate
            if candidate is None or not self._sampled(deployment, shadow=True):
                return None
            candidate.acquire()
            return candidate

    def install(self, deployment: Deployment) -> list[ModelVersion]:
        """Route DEPLOYMENT's name to it; returns the versions it replaced, now retiring."""
        with self._lock:
            before = self._deployments.get(deployment.name)
            self._deployments[deployment.name] = deployment
            keep = {id(v) for _, v in deployment.roles()}
            dropped = [] if before is None else [v for _, v in before.roles() if id(v) not in keep]
            self._retire(dropped)
        return dropped

    def remove(self, name: str) -> Deployment:
        with self._lock:
            deployment = self._get(name)
            del self._deployments[name]
            self._retire([v for _, v in deployment.roles()])
        return deployment

    def draining(self) -> list[ModelVersion]:
        """Retired versions that still have requests running."""
        with self._lock:
            self._retired = [v for v in self._retired if not v.closed.is_set()]
            return list(self._retired)

    def close_all(self, timeout: float) -> None:
        """Retire everything and wait up to TIMEOUT seconds for the runtimes to close."""
        with self._lock:
            for deployment in self._deployments.values():
                self._retire([v for _, v in deployment.roles()])
            self._deployments.clear()
            waiting = list(self._retired)
        deadline = time.monotonic() + timeout
        for version in waiting:
            if not version.closed.wait(max(0.0, deadline - time.monotonic())):
                log.warning("%s did not close within %ss (%d requests running)",
                            version, timeout, version.users)

    @contextlib.contextmanager
    def loading(self, name: str) -> Iterator[None]:
        """Mark NAME as asked for while its versions load, for readiness."""
        with self._lock:
            self._loading.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._loading.discard(name)

    @property
    def ready(self) -> bool:
        """True unless a name the agent asked for is not served yet."""
        with self._lock:
            return not (self._loading - self._deployments.keys())

    def _get(self, name: str) -> Deployment:
        deployment = self._deployments.get(name)
        if deployment is None:
            loaded = ", ".join(sorted(self._deployments)) or "none"
            raise NotFound(f"no model named '{name}'; loaded: {loaded}")
        return deployment

    def _sampled(self, deployment: Deployment, *, shadow: bool) -> bool:
        """Whether this request is one of the candidate's share, in the mode asked about."""
        return deployment.shadow is shadow and self._rng.random() * 100 < deployment.traffic

    def _retire(self, versions: list[ModelVersion]) -> None:
        for version in versions:
            version.retire()
            self._retired.append(version)
