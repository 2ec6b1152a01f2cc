"""The wire protocol: topics, canonical JSON, signed desired state, reports, telemetry."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from contract import protocol as p
from contract import signing
from contract.settings import Batching, Resources, Settings

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY = signing.generate_private_key()
OTHER_KEY = signing.generate_private_key()


def package(letter: str = "a") -> p.Package:
    return p.Package("models/diabetes", "sha256:" + letter * 64, 1234)


def desired(**changes: Any) -> p.DesiredState:
    state = p.DesiredState(
        device_id="cam-042",
        generation=17,
        issued_at=NOW - timedelta(minutes=1),
        expires_at=NOW + timedelta(days=7),
        deployments=(
            p.Deployment(
                name="diabetes", model="diabetes", version=2, package=package(),
                runtime=p.RuntimeSpec(("openvino:NPU", "onnxruntime:CPU")),
                traffic=90, rollout="r-7",
                candidate=p.Candidate(3, package("b"), p.RuntimeSpec(), traffic=10),
            ),
        ),
    )
    return replace(state, **changes)


def verify(payload: bytes, **overrides: Any) -> p.DesiredState:
    args: dict[str, Any] = {"public_key": KEY.public_key(), "device_id": "cam-042",
                            "last_generation": 16, "now": NOW}
    return p.verify_desired(payload, **{**args, **overrides})


def refusal(payload: bytes, **overrides: Any) -> p.ProtocolRefusal:
    with pytest.raises(p.ProtocolRefusal) as caught:
        verify(payload, **overrides)
    return caught.value


def signed_raw(document: dict[str, Any], key: Any = KEY) -> bytes:
    """Sign any document the way the hub does, valid or not, to test what the agent reads."""
    body = {k: v for k, v in document.items() if k != "signature"}
    signature = {"keyid": signing.key_id(key), "alg": signing.ALGORITHM,
                 "value": signing.sign(key, p.canonical_json(body))}
    return p.canonical_json({**body, "signature": signature})


def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(p.sign_desired(desired(), KEY))
    return doc


# --- canonical JSON -----------------------------------------------------------


def test_canonical_json_is_the_same_bytes_for_any_key_order() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    b = {"a": {"x": "é", "y": [1, 2]}, "b": 1}
    assert p.canonical_json(a) == p.canonical_json(b) == '{"a":{"x":"é","y":[1,2]},"b":1}'.encode()
    with pytest.raises(ValueError):
        p.canonical_json({"x": float("nan")})


# --- desired state ------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    payload = p.sign_desired(desired(), KEY)
    assert payload == p.canonical_json(json.loads(payload))  # what goes on the wire is canonical
    assert verify(payload) == desired()
    signature = json.loads(payload)["signature"]
    assert signature["keyid"] == signing.key_id(KEY) and signature["alg"] == "ecdsa-p256-sha256"


def test_a_document_without_optional_parts_round_trips() -> None:
    plain = desired(deployments=(p.Deployment("d", "m", 1, package()),))
    assert verify(p.sign_desired(plain, KEY)) == plain
    assert "candidate" not in p.sign_desired(plain, KEY).decode()


def test_tampered_payload_is_refused() -> None:
    doc = document()
    doc["deployments"][0]["package"]["digest"] = "sha256:" + "c" * 64
    refused = refusal(p.canonical_json(doc))
    assert refused.reason == p.Reason.BAD_SIGNATURE and refused.generation == 17


def test_other_key_is_refused() -> None:
    assert refusal(p.sign_desired(desired(), OTHER_KEY)).reason == "bad_signature"
    # another key that claims to be the trusted one
    doc = json.loads(p.sign_desired(desired(), OTHER_KEY))
    doc["signature"]["keyid"] = signing.key_id(KEY)
    refused = refusal(p.canonical_json(doc))
    assert refused.reason == "bad_signature" and "does not match" in refused.message


@pytest.mark.parametrize("signature", [
    None, "x", {}, {"keyid": "k", "alg": "ecdsa-p256-sha256"},
    {"keyid": signing.key_id(KEY), "alg": "rsa", "value": "AA=="},
])
def test_missing_or_broken_signature_is_refused(signature: Any) -> None:
    doc = document()
    doc["signature"] = signature
    assert refusal(p.canonical_json(doc)).reason == "bad_signature"


def test_older_generation_is_a_replay_and_the_same_one_is_already_applied() -> None:
    payload = p.sign_desired(desired(), KEY)
    assert refusal(payload, last_generation=18).reason == "replay"
    assert refusal(payload, last_generation=17).reason == "already_applied"


def test_expired_and_future_documents_are_refused() -> None:
    payload = p.sign_desired(desired(), KEY)
    assert refusal(payload, now=NOW + timedelta(days=7)).reason == "expired"
    early = refusal(payload, now=NOW - timedelta(minutes=7))
    assert early.reason == "not_yet_valid" and "clock" in early.message
    # a device clock a little behind the hub's is within the allowance
    assert verify(payload, now=NOW - timedelta(minutes=4)) == desired()


def test_wrong_device_is_refused() -> None:
    refused = refusal(p.sign_desired(desired(), KEY), device_id="cam-043")
    assert refused.reason == "wrong_device" and "cam-042" in refused.message


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b'"x"', b"\xff\xfe{}",
                                     b'{"a":1,"a":2}', b'{"x":NaN}', b'{"x":1e999}',
                                     b"[" * 100_000, b" " * (p.MAX_DESIRED_BYTES + 1)])
def test_malformed_json_is_refused(payload: bytes) -> None:
    assert refusal(payload).reason == "malformed"


def _drop(path: str) -> Any:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            doc = doc[int(part)] if part.isdigit() else doc[part]  # type: ignore[index]
        del doc[last]
    return change


def _set(path: str, value: Any) -> Any:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            doc = doc[int(part)] if part.isdigit() else doc[part]  # type: ignore[index]
        doc[last] = value
    return change


@pytest.mark.parametrize("change, complaint", [
    (_drop("generation"), "missing field 'generation'"),
    (_drop("deployments.0.package"), "missing field 'package'"),
    (_set("generation", "17"), "generation: expected an integer, got a string"),
    (_set("generation", True), "generation: expected an integer, got a boolean"),
    (_set("generation", 0), "generation: 0 is outside"),
    (_set("issued_at", "yesterday"), "issued_at: expected a UTC timestamp"),
    (_set("issued_at", "2025-06-01T12:00:00+02:00"), "issued_at: expected a UTC timestamp"),
    (_set("deployments", {}), "deployments: expected a list, got an object"),
    (_set("deployments.0.package.digest", "md5:1"), "package.digest: 'md5:1' does not match"),
    (_set("deployments.0.package.size", 1.5), "size: expected an integer, got a number"),
    (_set("deployments.0.name", "Bad Name"), "deployments[0].name"),
    (_set("deployments.0.runtime.prefer", ["cuda"]), "prefer[0]: 'cuda' does not match"),
    (_set("deployments.0.traffic", 100), "traffic: is 100; with this candidate it must be 90"),
    (_set("deployments.0.candidate.version", 2), "is the deployment's own version"),
    (_set("deployments.0.candidate.shadow", "no"), "shadow: expected true or false"),
    (_set("deployments.0.extra", 1), "unknown field(s) 'extra'"),
    (_set("expires_at", "2025-06-01T11:00:00Z"), "must be later than issued_at"),
    (_set("device_id", "a/b"), "device_id: 'a/b' does not match"),
    (_set("deployments.0.settings", {}), "settings: is empty"),
    (_set("deployments.0.settings", {"resources": {"cpu_millis": 0}}), "cpus: 0 is outside"),
    (_set("deployments.0.settings", {"resources": {"memory_bytes": 2**62}}), "memory: "),
    (_set("deployments.0.settings", {"resources": {"cpu_millis": 1.5}}), "expected an integer"),
    (_set("deployments.0.settings", {"batching": {"max_batch_size": 10**6}}), "outside 1..4096"),
    (_set("deployments.0.settings", {"batching": {"max_batch_size": 8, "wait": 1}}),
     "batching.wait: unknown field"),
    (_set("deployments.0.settings", {"resources": {"accelerators": {"gpu": 1}}}),
     "not an extended resource name"),
    (_set("deployments.0.settings", {"resources": {"accelerators": {"a.b/c": True}}}),
     "expected an integer"),
])
def test_signed_but_malformed_documents_are_refused(change: Any, complaint: str) -> None:
    doc = document()
    change(doc)
    refused = refusal(signed_raw(doc))
    assert refused.reason == "malformed"
    assert complaint in refused.message


def test_settings_ride_in_the_signed_state_and_older_states_read_the_same() -> None:
    settings = Settings(Resources(500, 512 * 2**20, (("nvidia.com/gpu", 1),)), Batching(32, 2))
    state = desired()
    with_settings = replace(state, deployments=(replace(state.deployments[0],
                                                        settings=settings),))
    read = verify(p.sign_desired(with_settings, KEY))
    assert read.deployments[0].settings == settings
    assert document()["deployments"][0].keys() >= {"name", "package"}
    assert "settings" not in document()["deployments"][0]  # as before settings existed
    assert verify(p.sign_desired(state, KEY)).deployments[0].settings == Settings()
    off = replace(state.deployments[0], settings=Settings(batching=Batching.OFF))
    assert verify(p.sign_desired(replace(state, deployments=(off,)), KEY)
                  ).deployments[0].settings.batching == Batching.OFF


def test_unknown_schema_is_refused_as_unsupported() -> None:
    doc = document()
    doc["schema"] = "edgefleet.desired/v2"
    assert refusal(signed_raw(doc)).reason == "unsupported_schema"


def test_the_hub_cannot_sign_a_document_agents_would_refuse() -> None:
    broken = desired(deployments=(p.Deployment("d", "m", 1, package(), traffic=50),))
    with pytest.raises(p.ProtocolError, match="traffic: is 50; with this candidate it must be 100"):
        p.sign_desired(broken, KEY)


def test_shadow_candidate_leaves_all_answers_to_the_deployment() -> None:
    shadow = p.Candidate(3, package("b"), p.RuntimeSpec(), traffic=100, shadow=True)
    state = desired(deployments=(p.Deployment("d", "m", 1, package(), candidate=shadow),))
    assert verify(p.sign_desired(state, KEY)) == state


# --- topics -------------------------------------------------------------------


def test_topics_and_parse_topic() -> None:
    assert p.desired_topic("cam-042") == "edgefleet/v1/devices/cam-042/desired"
    for build, kind in [(p.desired_topic, "desired"), (p.reported_topic, "reported"),
                        (p.telemetry_topic, "telemetry"), (p.status_topic, "status"),
                        (p.commands_topic, "commands")]:
        assert p.parse_topic(build("dev-1")) == ("dev-1", kind)
    assert p.device_subscriptions("dev-1") == (p.desired_topic("dev-1"), p.commands_topic("dev-1"))
    assert "edgefleet/v1/devices/+/telemetry" in p.HUB_SUBSCRIPTIONS


@pytest.mark.parametrize("topic", [
    "edgefleet/v1/devices/dev-1", "edgefleet/v1/devices/dev-1/other",
    "edgefleet/v2/devices/dev-1/status", "edgefleet/v1/devices/+/status",
    "edgefleet/v1/devices//status", "edgefleet/v1/devices/dev-1/status/x",
    "edgefleet/v1/devices/dev-1/commands/c1", "edgefleet/v1/devices/dev-1/commands/c1/result",
    "/edgefleet/v1/devices/dev-1/status",
])
def test_parse_topic_rejects_anything_else(topic: str) -> None:
    with pytest.raises(p.ProtocolError, match="not an edgefleet topic"):
        p.parse_topic(topic)


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "$SYS", "x" * 129, "é"])
def test_topic_builders_reject_ids_that_would_break_topics(device_id: str) -> None:
    with pytest.raises(p.ProtocolError, match="device id"):
        p.status_topic(device_id)


# --- reported state -----------------------------------------------------------


def reported(**changes: Any) -> p.ReportedState:
    state = p.ReportedState(
        device_id="cam-042",
        applied_generation=17,
        deployments=(
            p.DeploymentStatus("diabetes", "diabetes", 2, p.UpdateState.SERVING, NOW,
                               runtime="onnxruntime", device="CPU"),
            p.DeploymentStatus("diabetes", "diabetes", 3, p.UpdateState.FAILED, NOW,
                               error="self-test failed: output shape (1, 2) != (1, 1)"),
        ),
        platform="linux/arm/v7",
        accelerators=("onnxruntime:CPU", "litert:EDGETPU"),
        agent_version="0.1.0",
        refusals=(p.Refusal(18, p.Reason.BAD_SIGNATURE, "signed by another key", NOW),),
    )
    return replace(state, **changes)


def test_reported_round_trip() -> None:
    payload = p.build_reported(reported())
    assert p.parse_reported(payload, device_id="cam-042") == reported()
    assert json.loads(payload)["deployments"][1]["state"] == "failed"


def test_update_states_are_the_documented_ones() -> None:
    assert [s.value for s in p.UpdateState] == [
        "downloading", "verifying", "staged", "starting", "self_test", "serving",
        "failed", "rolling_back", "rolled_back"]


@pytest.mark.parametrize("change, complaint", [
    (_set("deployments.0.state", "running"), "'running' is not one of downloading"),
    (_set("refusals.0.reason", "nope"), "'nope' is not one of malformed"),
    (_set("applied_generation", -1), "applied_generation: -1 is outside"),
    (_set("platform", "arm64"), "platform: 'arm64' does not match"),
    (_drop("deployments.0.error"), "missing field 'error'"),
    (_set("schema", "edgefleet.reported/v0"), "schema is 'edgefleet.reported/v0'"),
    (_set("refusals", [{}] * (p.MAX_REFUSALS + 1)), "entries; the limit is 16"),
    (_set("device_id", "cam-043"), "but it came from device 'cam-042'"),
])
def test_malformed_reported_state_is_rejected(change: Any, complaint: str) -> None:
    doc = json.loads(p.build_reported(reported()))
    change(doc)
    with pytest.raises(p.ProtocolError) as caught:
        p.parse_reported(p.canonical_json(doc), device_id="cam-042")
    assert complaint in str(caught.value)


def test_reported_state_repeating_a_version_is_rejected() -> None:
    twice = reported().deployments[0]
    with pytest.raises(p.ProtocolError, match="listed twice"):
        p.build_reported(reported(deployments=(twice, twice)))


# --- telemetry ----------------------------------------------------------------


def points(first: int, last: int) -> tuple[p.Point, ...]:
    return tuple(p.Point(seq, NOW, "inference", {"latency_ms": 1.5, "deployment": "diabetes"})
                 for seq in range(first, last + 1))


def test_telemetry_round_trip() -> None:
    batch = p.TelemetryBatch("cam-042", points(5, 9) + (p.Point(12, NOW, "system", {"cpu": 3}),))
    payload = p.build_telemetry(batch)
    body = json.loads(payload)
    assert (body["seq_from"], body["seq_to"]) == (5, 12)  # 10 and 11 were dropped on the device
    assert p.parse_telemetry(payload, device_id="cam-042") == batch


@pytest.mark.parametrize("change, complaint", [
    (_set("seq_to", 99), "seq_from: 1..99 does not match the points (1..3)"),
    (_set("points.1.seq", 1), "seq must increase strictly"),
    (_set("points", []), "a batch needs at least one point"),
    (_set("points.0.kind", "debug"), "'debug' is not 'system' or 'inference'"),
    (_set("points.0.values", {"ok": True}), "points[0].values.ok: expected a number"),
    (_set("points.0.values", {"x": {"y": 1}}), "points[0].values.x: expected a number"),
    (_set("points.0.values", {"bad name": 1}), "value name 'bad name'"),
    (_set("points.0.at", 5), "points[0].at: expected a UTC timestamp"),
    (_set("device_id", "other"), "but it came from device 'cam-042'"),
])
def test_malformed_telemetry_is_rejected(change: Any, complaint: str) -> None:
    doc = json.loads(p.build_telemetry(p.TelemetryBatch("cam-042", points(1, 3))))
    change(doc)
    with pytest.raises(p.ProtocolError) as caught:
        p.parse_telemetry(p.canonical_json(doc), device_id="cam-042")
    assert complaint in str(caught.value)


def test_telemetry_limits() -> None:
    with pytest.raises(p.ProtocolError, match="1001 entries; the limit is 1000"):
        p.build_telemetry(p.TelemetryBatch("cam-042", points(1, p.MAX_TELEMETRY_POINTS + 1)))
    wide = tuple(p.Point(s, NOW, "system", {f"v{i}": "x" * 128 for i in range(64)})
                 for s in range(1, 200))
    with pytest.raises(p.ProtocolError, match="telemetry batch is .* bytes; the limit is"):
        p.build_telemetry(p.TelemetryBatch("cam-042", wide))
    with pytest.raises(p.ProtocolError, match="at least one point"):
        p.build_telemetry(p.TelemetryBatch("cam-042", ()))


# --- status and time ----------------------------------------------------------


def test_status_payloads() -> None:
    assert p.parse_status(p.ONLINE) == "online" and p.parse_status(p.OFFLINE) == "offline"
    with pytest.raises(p.ProtocolError, match="not b'online' or b'offline'"):
        p.parse_status(b"Online")


def test_timestamps_are_fixed_width_utc() -> None:
    berlin_summer = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert p.format_time(berlin_summer) == "2025-06-01T12:00:00.000000Z"
    assert p.parse_time("2025-06-01T12:00:00Z") == berlin_summer
    for bad in ["2025-06-01 14:00:00Z", "2025-06-01T14:00:00", "2025-02-30T00:00:00Z"]:
        with pytest.raises(p.ProtocolError):
            p.parse_time(bad)
    with pytest.raises(ValueError, match="timezone-aware"):
        p.format_time(datetime(2025, 6, 1))


def test_the_protocol_needs_only_the_stdlib() -> None:
    """The hub imports it and the agent runs it: neither side's dependencies may leak in,
    and the signing module (cryptography) loads only when something is signed or verified."""
    code = "import sys, contract.protocol; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(done.stdout.split())
    ours = {m for m in modules if m.split(".")[0] in ("contract", "agent", "packager", "hub")}
    assert ours == {"contract", "contract.protocol", "contract.canonical", "contract.names",
                    "contract.settings", "contract.sketch"}
    foreign = {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"contract"}
    assert sorted(r for r in foreign if not r.startswith("_")) == []


# ---- commands ----------------------------------------------------------------------

ISSUED = datetime(2025, 1, 31, 12, tzinfo=UTC)


def command(**changes: Any) -> p.Command:
    return replace(p.Command("c-1", "dev-1", ISSUED, ISSUED + timedelta(minutes=10),
                             p.CommandKind.PROFILE, p.ProfileArgs("tiny", 3, "int8", 8, 50)),
                   **changes)


def command_refusal(payload: bytes, **overrides: Any) -> p.ProtocolRefusal:
    with pytest.raises(p.ProtocolRefusal) as caught:
        p.verify_command(payload, **{"public_key": KEY.public_key(), "device_id": "dev-1",
                                     "seen": set(), "now": ISSUED, **overrides})
    return caught.value


def test_a_command_round_trips_and_each_bad_one_is_refused_for_its_reason() -> None:
    good = p.sign_command(command(), KEY)
    assert p.verify_command(good, public_key=KEY.public_key(), device_id="dev-1", seen={"c-0"},
                            now=ISSUED) == command()
    tampered = good.replace(b'"iterations":50', b'"iterations":51')
    cases = {
        p.Reason.BAD_SIGNATURE: (p.sign_command(command(), OTHER_KEY), {}),
        p.Reason.REPLAY: (good, {"seen": {"c-1"}}),
        p.Reason.EXPIRED: (good, {"now": ISSUED + timedelta(minutes=10)}),
        p.Reason.NOT_YET_VALID: (good, {"now": ISSUED - timedelta(minutes=6)}),
        p.Reason.WRONG_DEVICE: (good, {"device_id": "dev-2"}),
        p.Reason.MALFORMED: (good + b" " * p.MAX_COMMAND_BYTES, {}),
    }
    for reason, (payload, overrides) in cases.items():
        assert command_refusal(payload, **overrides).reason is reason, reason
    assert command_refusal(tampered).reason is p.Reason.BAD_SIGNATURE
    assert "command 'c-1'" in command_refusal(good, seen={"c-1"}).message
    # A desired state is no command, even when the hub's key signed it.
    assert command_refusal(p.sign_desired(desired(), KEY)).reason is p.Reason.UNSUPPORTED_SCHEMA


@pytest.mark.parametrize("changes, words", [
    ({"expires_at": ISSUED + timedelta(hours=2)}, "within 1:00:00"),
    ({"expires_at": ISSUED}, "must be after issued_at"),
    ({"profile": p.ProfileArgs("tiny", 3, "int8", 257, 50)}, "max_batch"),
    ({"profile": p.ProfileArgs("tiny", 3, "int8", 8, 1001)}, "iterations"),
    ({"profile": p.ProfileArgs("Tiny!", 3, "int8", 8, 50)}, "model"),
    ({"id": "c/1"}, "id"),
])
def test_the_hub_never_signs_a_command_an_agent_would_refuse(changes: dict[str, Any],
                                                              words: str) -> None:
    with pytest.raises(p.ProtocolError, match=words):
        p.sign_command(command(**changes), KEY)


def test_a_command_result_is_read_strictly() -> None:
    row = {"device_class": "linux/arm64", "runtime": "onnxruntime", "device": "CPU",
           "variant": "int8", "batch": 1, "iterations": 50, "p50_ms": 0.5, "p99_ms": 0.9,
           "throughput": 2000.0, "peak_rss_bytes": 60_000_000}
    done = p.CommandResult("c-1", "dev-1", p.CommandState.DONE, rows=(row,))
    assert p.parse_command_result(p.build_command_result(done), device_id="dev-1") == done
    for result, words in (
            (p.CommandResult("c-1", "dev-1", p.CommandState.DONE), "rows"),
            (p.CommandResult("c-1", "dev-1", p.CommandState.FAILED), "error"),
            (p.CommandResult("c-1", "dev-1", p.CommandState.RUNNING, rows=(row,)), "rows"),
            (p.CommandResult("c-1", "dev-1", p.CommandState.EXPIRED), "state"),
            (p.CommandResult("c-1", "dev-1", p.CommandState.DONE,
                             rows=({**row, "extra": 1},)), "extra")):
        with pytest.raises(p.ProtocolError, match=words):
            p.build_command_result(result)
    with pytest.raises(p.ProtocolError, match="came from device"):
        p.parse_command_result(p.build_command_result(done), device_id="dev-2")
