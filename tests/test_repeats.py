"""Repeated log lines: one per key per interval, the next one with the count held back."""

from __future__ import annotations

import logging

import pytest

from hub.repeats import Repeats


def test_one_line_per_key_per_interval_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    repeats = Repeats(logging.getLogger("test.repeats"), interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.repeats"):
        for i in range(10_000):
            repeats.note(("telemetry", "malformed"), f"bad message {i}")
        repeats.note(("status", "malformed"), "bad status")
        assert [r.getMessage() for r in caplog.records] == ["bad message 0", "bad status"]
        now[0] = 61
        repeats.note(("telemetry", "malformed"), "bad message 10000", count=5)
        assert caplog.records[-1].getMessage() == (
            "bad message 10000 (and 10003 more like it since the last such line)")
        repeats.note(("telemetry", "malformed"), "held back")
        repeats.flush()
        assert caplog.records[-1].getMessage() == (
            "1 more like ('telemetry', 'malformed') were not logged")
    assert len(caplog.records) == 4
    with pytest.raises(ValueError, match="interval must be positive"):
        Repeats(logging.getLogger("x"), interval=0)
