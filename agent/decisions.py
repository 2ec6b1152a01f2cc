"""What a device decides, as pure functions: the agent daemon and the simulator both call them.

For each deployment of a desired state, `next_step` compares what is
wanted with what serves under its name (a `Route`) and names the one thing
to do first: update the primary, update the candidate, or only change the
route. A version counts as serving only with the runtime preferences and the
deployment settings (resources, batching) it was loaded with, so a change of
either alone is an update too (the version is loaded again, or its container
or pods replaced, self-tested, and swapped in). After a desired state,
`unloaded` names the deployments to take down and `kept_statuses` what the
device goes on reporting. `recent_refusals` keeps the refusals it reports.

The daemon runs the steps for real (agent/updates.py); the simulator
(agent/sim/device.py) only adds its simulated latencies and failures.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from contract.protocol import (
    MAX_REFUSALS,
    Deployment,
    Package,
    ProtocolRefusal,
    Reason,
    UpdateState,
)
from contract.settings import Settings
from contract.sketch import SketchSpec

T = TypeVar("T")


@dataclass(frozen=True)
class Running:
    """One loaded version, as far as decisions care."""

    version: int
    digest: str
    prefer: tuple[str, ...]
    settings: Settings = Settings()  # the deployment's resources and batching it runs with


@dataclass(frozen=True)
class Route:
    """What serves under one deployment name."""

    primary: Running
    candidate: Running | None = None
    traffic: int = 0        # the candidate's percent: answers (split) or copies (shadow)
    shadow: bool = False

    def versions(self) -> set[int]:
        return {r.version for r in (self.primary, self.candidate) if r is not None}


class Role(StrEnum):
    PRIMARY = "primary"
    CANDIDATE = "candidate"


class Step(StrEnum):
    UPDATE_PRIMARY = "update_primary"      # a new version (or new preferences) to serve
    UPDATE_CANDIDATE = "update_candidate"  # a new candidate beside the primary
    SET_ROUTE = "set_route"                # the same versions, routed differently
    NOTHING = "nothing"


@dataclass(frozen=True)
class Target:
    """The version an update step moves onto the device."""

    role: Role
    version: int
    package: Package
    prefer: tuple[str, ...]
    traffic: int            # for a candidate: its share (split) or copy rate (shadow)
    shadow: bool
    settings: Settings = Settings()
    sketch: SketchSpec | None = None  # its drift bins, if its version has a baseline

    def running(self) -> Running:
        return Running(self.version, self.package.digest, self.prefer, self.settings)


def target(d: Deployment, role: Role) -> Target:
    """What DEPLOYMENT wants in ROLE; ValueError if it has no candidate and one is asked for."""
    if role is Role.PRIMARY:
        return Target(role, d.version, d.package, d.runtime.prefer, 0, False, d.settings,
                      d.sketch)
    c = d.candidate
    if c is None:
        raise ValueError(f"deployment {d.name} has no candidate")
    return Target(role, c.version, c.package, c.runtime.prefer, c.traffic, c.shadow,
                  d.settings, c.sketch)


def wanted_route(d: Deployment) -> Route:
    """The route DEPLOYMENT asks for, once its versions serve."""
    c = d.candidate
    if c is None:
        return Route(target(d, Role.PRIMARY).running())
    return Route(target(d, Role.PRIMARY).running(), target(d, Role.CANDIDATE).running(),
                 c.traffic, c.shadow)


def next_step(d: Deployment, serving: Route | None) -> Step:
    """The first thing to do to make SERVING (None: nothing yet) what D asks for.

    An update to the primary replaces the whole route (its candidate goes), so
    the caller asks again after a primary update has succeeded.
    """
    wanted = wanted_route(d)
    if serving is None or serving.primary != wanted.primary:
        return Step.UPDATE_PRIMARY
    if wanted.candidate is not None and serving.candidate != wanted.candidate:
        return Step.UPDATE_CANDIDATE
    if serving != wanted:
        return Step.SET_ROUTE  # a candidate to drop, or a new share or mode
    return Step.NOTHING


def unloaded(serving: Iterable[str], wanted: Collection[str]) -> list[str]:
    """The deployment names that serve but are no longer wanted."""
    return [name for name in serving if name not in wanted]


def kept_statuses(statuses: Sequence[T], key: Callable[[T], tuple[str, int, UpdateState]],
                  routes: Mapping[str, Route], wanted: Collection[str]) -> list[T]:
    """What the device reports after a desired state: each wanted deployment's versions
    that serve, then its newest failure. STATUSES are oldest first; KEY gives each one's
    (deployment name, version, state)."""
    serving: list[T] = []
    failures: dict[str, T] = {}
    for status in statuses:
        name, version, state = key(status)
        route = routes.get(name)
        if name not in wanted:
            continue
        if state is UpdateState.SERVING and route is not None and version in route.versions():
            serving.append(status)
        elif state in (UpdateState.FAILED, UpdateState.ROLLED_BACK):
            failures[name] = status  # only the newest failure per deployment
    return serving + list(failures.values())


def still_serving(statuses: Sequence[T], key: Callable[[T], tuple[str, int, UpdateState]],
                  name: str, route: Route | None) -> list[T]:
    """STATUSES less NAME's versions reported as serving that ROUTE no longer serves."""
    live = route.versions() if route is not None else set()

    def stale(status: T) -> bool:
        n, version, state = key(status)
        return n == name and state is UpdateState.SERVING and version not in live

    return [s for s in statuses if not stale(s)]


def reports_refusal(refusal: ProtocolRefusal) -> bool:
    """Whether a refused desired state is news: the retained one comes again after every
    subscribe and restart, and is only ever 'already applied'."""
    return refusal.reason is not Reason.ALREADY_APPLIED


def recent_refusals(refusals: Sequence[T], new: T) -> list[T]:
    """The refusals to report with NEW added: the most recent MAX_REFUSALS."""
    return [*refusals, new][-MAX_REFUSALS:]
