"""The decisions the agent daemon and the simulator share (agent/decisions.py)."""

from __future__ import annotations

import pytest

from agent.decisions import (
    Role,
    Route,
    Running,
    Step,
    kept_statuses,
    next_step,
    recent_refusals,
    reports_refusal,
    still_serving,
    target,
    unloaded,
    wanted_route,
)
from contract.protocol import (
    MAX_REFUSALS,
    Candidate,
    Deployment,
    Package,
    ProtocolRefusal,
    Reason,
    RuntimeSpec,
)
from contract.protocol import UpdateState as S

CPU = ("onnxruntime:CPU",)
GPU = ("onnxruntime:CUDA",)


def package(version: int) -> Package:
    return Package("models/m", "sha256:" + f"{version:x}" * 64, 100 + version)


def deployment(version: int = 1, prefer: tuple[str, ...] = CPU,
               candidate: Candidate | None = None) -> Deployment:
    traffic = 100 - candidate.traffic if candidate and not candidate.shadow else 100
    return Deployment("d", "m", version, package(version), RuntimeSpec(prefer),
                      traffic=traffic, candidate=candidate)


def candidate(version: int = 2, traffic: int = 10, shadow: bool = False,
              prefer: tuple[str, ...] = CPU) -> Candidate:
    return Candidate(version, package(version), RuntimeSpec(prefer), traffic, shadow)


def running(version: int, prefer: tuple[str, ...] = CPU) -> Running:
    return Running(version, package(version).digest, prefer)


@pytest.mark.parametrize(("serving", "wanted", "step"), [
    (None, deployment(), Step.UPDATE_PRIMARY),
    (Route(running(1)), deployment(), Step.NOTHING),
    (Route(running(1)), deployment(2), Step.UPDATE_PRIMARY),
    # the same version with other runtime preferences is loaded again
    (Route(running(1)), deployment(1, GPU), Step.UPDATE_PRIMARY),
    (Route(running(1)), deployment(candidate=candidate()), Step.UPDATE_CANDIDATE),
    (Route(running(1), running(2), 10), deployment(candidate=candidate()), Step.NOTHING),
    (Route(running(1), running(2), 10), deployment(candidate=candidate(3)),
     Step.UPDATE_CANDIDATE),
    (Route(running(1), running(2), 10), deployment(candidate=candidate(prefer=GPU)),
     Step.UPDATE_CANDIDATE),
    (Route(running(1), running(2), 10), deployment(candidate=candidate(traffic=50)),
     Step.SET_ROUTE),
    (Route(running(1), running(2), 10), deployment(candidate=candidate(shadow=True)),
     Step.SET_ROUTE),
    (Route(running(1), running(2), 10), deployment(), Step.SET_ROUTE),
    # a new primary comes first, whatever the candidate
    (Route(running(1), running(2), 10), deployment(3, candidate=candidate()),
     Step.UPDATE_PRIMARY),
])
def test_next_step(serving: Route | None, wanted: Deployment, step: Step) -> None:
    assert next_step(wanted, serving) is step


def test_after_the_primary_update_the_candidate_follows_and_then_nothing() -> None:
    wanted = deployment(3, candidate=candidate(4, traffic=20, shadow=True))
    primary = target(wanted, Role.PRIMARY)
    after_primary = Route(primary.running())  # a new primary serves alone
    assert next_step(wanted, after_primary) is Step.UPDATE_CANDIDATE
    c = target(wanted, Role.CANDIDATE)
    assert (c.version, c.traffic, c.shadow, c.prefer) == (4, 20, True, CPU)
    done = Route(primary.running(), c.running(), c.traffic, c.shadow)
    assert done == wanted_route(wanted) and next_step(wanted, done) is Step.NOTHING


def test_target_of_a_primary_and_of_a_missing_candidate() -> None:
    t = target(deployment(5, GPU), Role.PRIMARY)
    assert (t.version, t.package, t.prefer, t.traffic, t.shadow) == (5, package(5), GPU, 0, False)
    with pytest.raises(ValueError, match="no candidate"):
        target(deployment(), Role.CANDIDATE)


def test_unloaded_names_what_serves_and_is_no_longer_wanted() -> None:
    assert unloaded(["a", "b", "c"], {"b", "x"}) == ["a", "c"]


def key(status: tuple[str, int, S]) -> tuple[str, int, S]:
    return status


def test_kept_statuses_are_what_serves_then_the_newest_failure() -> None:
    statuses = [
        ("d", 1, S.SERVING),
        ("d", 2, S.ROLLED_BACK),   # older failure: dropped for the newer one
        ("d", 3, S.SERVING),       # no longer serves
        ("d", 4, S.FAILED),
        ("d", 5, S.DOWNLOADING),   # an unfinished state is not kept
        ("gone", 1, S.SERVING),    # not wanted any more
        ("e", 7, S.ROLLED_BACK),   # wanted, nothing serves: its failure stays
    ]
    routes = {"d": Route(running(1)), "gone": Route(running(1))}
    assert kept_statuses(statuses, key, routes, {"d", "e"}) == [
        ("d", 1, S.SERVING), ("d", 4, S.FAILED), ("e", 7, S.ROLLED_BACK)]


def test_still_serving_drops_versions_a_route_no_longer_serves() -> None:
    statuses = [("d", 1, S.SERVING), ("d", 2, S.SERVING), ("d", 3, S.FAILED),
                ("other", 1, S.SERVING)]
    assert still_serving(statuses, key, "d", Route(running(2))) == [
        ("d", 2, S.SERVING), ("d", 3, S.FAILED), ("other", 1, S.SERVING)]
    assert still_serving(statuses, key, "d", None) == [("d", 3, S.FAILED), ("other", 1, S.SERVING)]


def test_refusals_reported_are_news_and_the_most_recent_only() -> None:
    assert not reports_refusal(ProtocolRefusal(Reason.ALREADY_APPLIED, "generation 3"))
    assert reports_refusal(ProtocolRefusal(Reason.BAD_SIGNATURE, "not signed by the hub"))
    refusals: list[int] = []
    for n in range(MAX_REFUSALS + 3):
        refusals = recent_refusals(refusals, n)
    assert refusals == list(range(3, MAX_REFUSALS + 3))
