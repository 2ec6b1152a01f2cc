"""hub/periodic.py: the loop every one-replica job of the hub runs in."""

from __future__ import annotations

import threading

import pytest

from hub.periodic import Periodic


def test_a_job_runs_at_once_when_asked_then_when_poked() -> None:
    ran = threading.Semaphore(0)
    job = Periodic("test", ran.release, interval=3600, at_start=True)
    job.start()
    try:
        assert ran.acquire(timeout=10)  # at start, not after an hour
        job.poke()
        assert ran.acquire(timeout=10)
    finally:
        job.stop()


def test_a_hub_that_does_not_lead_waits_and_a_failing_run_does_not_end_the_job() -> None:
    leading = threading.Event()
    runs: list[int] = []
    done = threading.Semaphore(0)

    def work() -> None:
        runs.append(len(runs))
        done.release()
        if len(runs) == 1:
            raise RuntimeError("the database went away")

    job = Periodic("test", work, interval=0.01, leads=leading.is_set)
    job.start()
    try:
        assert not done.acquire(timeout=0.3)  # it does not lead: nothing ran
        leading.set()
        assert done.acquire(timeout=10) and done.acquire(timeout=10)  # ran again after failing
    finally:
        job.stop()


def test_a_stop_cuts_a_rest_short() -> None:
    resting = threading.Event()
    stopped: list[bool] = []

    def work() -> None:
        resting.set()
        stopped.append(job.rest(3600))

    job = Periodic("test", work, interval=3600, at_start=True)
    job.start()
    assert resting.wait(10)
    job.stop()
    assert stopped == [True] and job.stopping


@pytest.mark.parametrize("interval", [0, -1, float("nan")])
def test_an_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match="positive interval"):
        Periodic("test", lambda: None, interval=interval)
