"""Rollout specs: checked once at create (422 with one line for anything a user can get
wrong), stored typed, read back strictly; the state tables; ASCII-only version numbers
on the model routes. In process: `create_app` + TestClient on a real database."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hub.rollouts import spec as specs
from hub.rollouts import states
from hub.rollouts.spec import Duration, RolloutSpec, Share
from hub.rollouts.states import DeviceState, Event, Evidence, RolloutState
from hub.validation import InvalidInput
from hubapp import InProcessHub


@pytest.fixture
def hub(inproc: InProcessHub) -> InProcessHub:
    inproc.publish("tiny", 1)
    inproc.publish("tiny", 2)
    inproc.add_devices(["dev-a", "dev-b"], site="lab")
    inproc.deploy(["dev-a", "dev-b"], "tiny", 1, "tiny")
    return inproc


def post(hub: InProcessHub, **body: Any) -> Any:
    return hub.client.post("/api/v1/rollouts", json={
        "model": "tiny", "version": 2, "target": {"site": "lab"}, **body})


@pytest.mark.parametrize("body, message", [
    ({"waves": "abc%"}, "wave 'abc%': a percentage must be a number in (0, 100]"),
    ({"waves": "nan%"}, "wave 'nan%'"),
    ({"waves": "inf%"}, "wave 'inf%'"),
    ({"waves": "-5%"}, "wave '-5%'"),
    ({"waves": "0%,100%"}, "wave '0%'"),
    ({"waves": "150%"}, "wave '150%'"),
    ({"waves": "²,all"}, "wave '²'"),
    ({"waves": "٣,all"}, "wave '٣'"),
    ({"waves": "abc"}, "use a percentage (5%), a count (10) or 'all'"),
    ({"waves": "5%,,100%"}, "wave ''"),
    ({"waves": "50%,25%,100%"}, "each must be larger than the one before: 25% comes after 50%"),
    ({"waves": "5%,50%"}, "the last wave must be 100% or 'all'"),
    ({"max_failures": "150%"}, "max failures '150%': a percentage must be a number in [0, 100]"),
    ({"max_failures": "-5%"}, "max failures '-5%'"),
    ({"max_failures": "abc%"}, "max failures 'abc%'"),
    ({"max_failures": "nan%"}, "max failures 'nan%'"),
    ({"max_failures": "inf%"}, "max failures 'inf%'"),
    ({"max_failures": "-1"}, "use a percentage of the target (5%) or a count (3)"),
    ({"max_failures": "٣"}, "max failures '٣'"),
    ({"soak": "٣s"}, "soak '٣s' should look like 30s"),
    ({"soak": "10 minutes"}, "soak '10 minutes'"),
    ({"device_timeout": "0s"}, "device timeout must be at least 1s"),
    ({"version": "²"}, "version must be a number or 'latest', got '²'"),
    ({"version": "٣"}, "version must be a number or 'latest', got '٣'"),
    ({"version": -1}, "version must be a number"),
    ({"traffic": 100}, "traffic 100: give a share from 1% to 99%"),
    ({"traffic": 10, "shadow": True}, "choose --traffic (an A/B split) or --shadow, not both"),
    ({"priority": 2**70}, "priority"),
    ({"max_error_rate": 1.5}, "max error rate 1.5: use a share from 0 to 1"),
    ({"max_error_rate": -0.1}, "max error rate -0.1"),
    ({"max_latency_ratio": 0.5}, "max latency ratio 0.5: use a number above 1"),
    ({"prefer": ["cuda"]}, "prefer entry 'cuda' must look like RUNTIME:DEVICE"),
    ({"deployment": "Bad Name"}, "invalid deployment name 'Bad Name'"),
    ({"model": "Tiny"}, "invalid model name 'Tiny'"),
    ({"target": {"bad key!": "x"}}, "invalid tag key 'bad key!'"),
    ({"target": {f"k{n}": "v" for n in range(33)}}, "the target has 33 tags; the most"),
    ({"traffic": 10, "version": 1},
     "deployment tiny already serves tiny:1 on 2 target device(s) (dev-a, dev-b), so it "
     "cannot be their A/B or shadow candidate"),
    ({"shadow": True, "version": 1}, "so it cannot be their A/B or shadow candidate"),
])
def test_create_refuses_what_it_can_check_with_422_and_one_line(
        hub: InProcessHub, body: dict[str, Any], message: str) -> None:
    answer = post(hub, **body)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert message in detail and "\n" not in detail
    assert hub.client.get("/api/v1/rollouts").json() == []


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(hub: InProcessHub, raw: str) -> None:
    body = ('{"model": "tiny", "version": 2, "target": {"site": "lab"}, '
            f'"max_latency_ratio": {raw}}}')
    answer = hub.client.post("/api/v1/rollouts", content=body,
                             headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text


def test_platforms_the_package_lacks_for_the_target_are_refused(hub: InProcessHub) -> None:
    hub.add_devices(["pi-1", "pi-2"], platform="linux/arm/v7", site="lab")
    hub.add_devices(["new"], platform=None, site="lab")  # has not reported: nothing to check
    answer = post(hub)
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        "the package of tiny:2 has no image for linux/arm/v7 (pi-1, pi-2); it has "
        "linux/amd64, linux/arm64: build it with `edgefleet package build tiny:2 "
        "--platform ...` or narrow the target")
    # arm64 devices match the package's arm64 image, with or without the v8 variant.
    hub.add_devices(["arm"], platform="linux/arm64/v8", site="arm")
    assert post(hub, target={"site": "arm"}).status_code == 201


def test_defaults_come_from_the_spec_module(hub: InProcessHub) -> None:
    record = post(hub).json()
    for name in ("waves", "max_failures", "soak", "device_timeout", "auto_rollback", "traffic",
                 "shadow", "priority", "max_error_rate", "max_latency_ratio"):
        assert record[name] == specs.OPTIONS[name].default, name
    schema = hub.client.get("/openapi.json").json()["components"]["schemas"]["RolloutRequest"]
    assert schema["properties"]["waves"]["description"] == specs.OPTIONS["waves"].help
    from hub.cli.rollouts import create

    shown = {p.name: p for p in create.params}
    assert shown["soak"].default == specs.OPTIONS["soak"].default
    assert shown["soak"].help == specs.OPTIONS["soak"].help


@pytest.mark.parametrize("path", [
    "/api/v1/models/tiny/versions/%C2%B2", "/api/v1/models/tiny/versions/%D9%A3",
    "/api/v1/models/tiny/versions/%C2%B2/files/model.onnx",
])
def test_model_routes_take_ascii_version_numbers_only(hub: InProcessHub, path: str) -> None:
    for method in ("GET", "DELETE"):
        answer = hub.client.request(method, path)
        if method == "DELETE" and "/files/" in path:
            continue
        assert answer.status_code == 422, answer.text
        assert "version must be a number or 'latest'" in answer.json()["detail"]
    assert hub.client.get("/api/v1/models/tiny/versions/1").status_code == 200


def test_an_unknown_action_is_refused_and_not_audited_as_given(hub: InProcessHub) -> None:
    rollout_id = post(hub).json()["id"]
    answer = hub.client.post(f"/api/v1/rollouts/{rollout_id}/x%0Ay")
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        "unknown action 'x\\ny'; use one of pause, resume, abort, rollback")
    actions = [e["action"] for e in hub.client.get("/api/v1/audit").json()]
    assert "rollout.unknown-action" in actions and not any("\n" in a for a in actions)


def test_the_spec_survives_its_stored_form_and_the_reader_is_strict() -> None:
    spec = specs.parse(model="tiny", version=2, deployment=None, target={"site": "lab"},
                       waves="5%,25%,all", max_failures="12.5%", soak="90s",
                       device_timeout="1h", traffic=10, prefer=["openvino:GPU"])
    assert RolloutSpec.from_json(spec.to_json()) == spec
    assert (spec.deployment, str(spec.soak), str(spec.device_timeout)) == ("tiny", "90s", "1h")
    assert spec.waves == (Share(percent=5), Share(percent=25), Share(percent=100))
    assert spec.allowed_failures(16) == 2
    stored = json.loads(spec.to_json())
    for key, bad in [("version", "2"), ("soak_s", 1.5), ("waves", [{"percent": "5"}]),
                     ("auto_rollback", 1), ("target", {"site": 3}), ("traffic", True)]:
        with pytest.raises(ValueError):
            RolloutSpec.from_json(json.dumps({**stored, key: bad}))
    with pytest.raises(InvalidInput):
        specs.parse(model="tiny", version=2, deployment=None, target={}, waves="")


@pytest.mark.parametrize("waves, total, sizes", [
    ("5%,25%,100%", 203, [11, 40, 152]),
    ("5%,25%,100%", 3, [1, 1, 1]),
    ("10,100,all", 50, [10, 40, 0]),
    ("1,2,all", 3, [1, 1, 1]),
    ("100%", 0, [0]),
])
def test_wave_sizes(waves: str, total: int, sizes: list[int]) -> None:
    assert specs.wave_sizes(specs.parse_waves(waves), total) == sizes


def test_durations_print_in_their_largest_unit() -> None:
    assert [str(Duration(s)) for s in (0, 45, 120, 5400, 7200, 86400)] == [
        "0s", "45s", "2m", "90m", "2h", "1d"]


def test_the_tables_are_complete() -> None:
    reached = {target for _, target in states.TRANSITIONS.values()}
    assert reached | {RolloutState.CREATED} == set(RolloutState)
    # Every device state the agent reports maps into the rollout's states.
    assert set(states.FROM_REPORT.values()) <= set(DeviceState)
    assert {e for _, e in states.DEVICE_MOVES} == set(Evidence)
    # Resume is the way out of both pause and failure; nothing leaves the ended states
    # except a roll back of a completed or aborted one.
    assert states.TRANSITIONS[Event.RESUME][0] == {RolloutState.PAUSED, RolloutState.FAILED}
    for event, (sources, _) in states.TRANSITIONS.items():
        if event is not Event.ROLL_BACK:
            assert not sources & {RolloutState.ABORTED, RolloutState.ROLLED_BACK}, event
    assert states.next_device_state(
        DeviceState.SERVING, {Evidence.TIMED_OUT}, None) == (DeviceState.SERVING, None)
    assert states.next_device_state(
        DeviceState.ASSIGNED, {Evidence.TIMED_OUT, Evidence.REPORTS_PROGRESS},
        DeviceState.STAGED) == (DeviceState.FAILED, Evidence.TIMED_OUT)
    assert states.next_device_state(
        DeviceState.FAILED, {Evidence.REPORTS_PROGRESS, Evidence.TIMED_OUT},
        DeviceState.STAGED) == (DeviceState.FAILED, None)


def test_an_upload_chunk_starting_at_a_non_ascii_number_is_refused(hub: InProcessHub) -> None:
    started = hub.client.post("/v2/models/tiny/blobs/uploads/")
    assert started.status_code == 202, started.text
    answer = hub.client.patch(started.headers["location"], content=b"x",
                              headers={"Content-Range": b"\xb2-0"})
    assert answer.status_code == 416, answer.text
    hub.state.uploads.cancel("models/tiny", started.headers["location"].rsplit("/", 1)[1])


def test_the_reports_that_move_a_device_are_those_the_table_moves_it_on() -> None:
    # The engine's news query asks only for devices with such a report (moving_reports):
    # any other report must leave the device as it is.
    for state in DeviceState:
        for said, means in states.FROM_REPORT.items():
            moved = states.next_device_state(state, {states.report_evidence(means)}, means)
            assert (said in states.moving_reports(state)) == (moved[1] is not None), (state, said)
    assert states.moving_reports(DeviceState.FAILED) == [DeviceState.SERVING.value]
