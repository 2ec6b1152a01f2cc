"""The hub's fast telemetry reader (contract/protocol.py `parse_telemetry(fast=orjson)`:
orjson, then the strict reader for anything it cannot prove the same) reads every
payload exactly as the strict reader does: the same batch, or the same error. Duplicate
keys, at any depth, are refused as ever."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import protocol as p

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def canonical_batch() -> bytes:
    points = (p.Point(1, NOW, "system", {"cpu_percent": 12.5, "telemetry_dropped": 0}),
              p.Point(2, NOW, "inference", {"deployment": "d", "version": 2, "mean_ms": 1.25},
                      sketches={"age[0]": [1, 2, 3]}))
    return p.build_telemetry(p.TelemetryBatch("cam-042", points))


def outcome(payload: bytes, *, fast: bool) -> object:
    """The batch read, or the error's text."""
    try:
        return p.parse_telemetry(payload, device_id="cam-042", fast=orjson if fast else None)
    except p.ProtocolError as exc:
        return f"ProtocolError: {exc}"


def assert_same(payload: bytes) -> object:
    strict = outcome(payload, fast=False)
    assert outcome(payload, fast=True) == strict
    return strict


def test_a_canonical_batch_reads_the_same() -> None:
    assert isinstance(assert_same(canonical_batch()), p.TelemetryBatch)


# Each inserts a second member with a key already there, into one object of the batch.
@pytest.mark.parametrize("before, after", [
    (b'{"device_id":', b'{"device_id":"cam-042","device_id":'),           # the batch
    (b'{"at":', b'{"at":"2025-06-01T12:00:00.000000Z","at":'),            # a point
    (b'"values":{"cpu_percent":', b'"values":{"cpu_percent":1,"cpu_percent":'),  # its values
    (b'"sketches":{"age[0]":', b'"sketches":{"age[0]":[9],"age[0]":'),  # its sketches
])
def test_a_duplicate_key_at_any_depth_is_refused(before: bytes, after: bytes) -> None:
    payload = canonical_batch()
    assert before in payload
    twice = payload.replace(before, after, 1)
    assert "duplicate key" in str(assert_same(twice))
    # The same with the duplicate written last, and keys out of order.
    assert "duplicate key" in str(assert_same(twice.replace(b"},", b',"seq":1},', 1)))


@pytest.mark.parametrize("payload", [
    b"", b"{", b"[]", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b'{"x":NaN}', b'{"x":1e999}',
    b"[" * 2000 + b"]" * 2000, b'{"a":' * 300 + b"1" + b"}" * 300,
    b" " * (p.MAX_TELEMETRY_BYTES + 1), b'"\\ud800"',
])
def test_what_orjson_refuses_or_reads_otherwise_goes_to_the_strict_reader(
        payload: bytes) -> None:
    assert str(assert_same(payload)).startswith("ProtocolError: telemetry")


@pytest.mark.parametrize("value", [
    2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63), 1e-5, 1e16, 5e-324, -0.0, 1.0, "é\u2028\x7f",
    "\\", '"', "\ud800", True, None, [1], {"a": 1},
])
def test_hostile_values_read_the_same(value: Any) -> None:
    doc = json.loads(canonical_batch())
    doc["points"][0]["values"]["x"] = value
    for payload in (p.canonical_json(doc) if value != "\ud800" else b"",
                    json.dumps(doc).encode(), json.dumps(doc, sort_keys=True).encode()):
        assert_same(payload)
    assert_same(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(["batch", "point", "values", "sketches"]), key=st.text(max_size=12),
       value=JSON)
def test_any_change_reads_the_same(where: str, key: str, value: Any) -> None:
    doc = json.loads(canonical_batch())
    target = {"batch": doc, "point": doc["points"][1], "values": doc["points"][1]["values"],
              "sketches": doc["points"][1]["sketches"]}[where]
    target[key] = value
    try:
        encoded = [p.canonical_json(doc), orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)]
    except ValueError:  # a float json will not write: orjson's form alone
        encoded = [orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)]
    except TypeError:  # an integer beyond 64 bits: json's form alone
        encoded = [p.canonical_json(doc)]
    for payload in encoded:
        assert_same(payload)


@pytest.mark.parametrize("fast", [False, True])
def test_names_seen_before_do_not_let_a_bad_one_through(fast: bool) -> None:
    """Value and sketch names are checked by a subset test against names that matched
    before: a bad name next to good ones is still refused, and never remembered."""
    doc = json.loads(canonical_batch())
    for _ in range(2):
        assert isinstance(outcome(p.canonical_json(doc), fast=fast), p.TelemetryBatch)
        for where, complaint in (("values", "value name 'bad name'"),
                                 ("sketches", "sketch name 'bad name'")):
            bad = json.loads(canonical_batch())
            bad["points"][1][where]["bad name"] = [1, 2, 3] if where == "sketches" else 1
            assert complaint in str(outcome(p.canonical_json(bad), fast=fast))
