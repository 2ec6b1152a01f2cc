"""A rollout's latency budget (`rollout create --max-latency-ms P99`) against the version's
profile, on the in-process hub: the profile is measured for real by the agent's profiler
(agent/profiling.py) on the package's model and posted as `model profile` posts it; the
rollout is accepted under the budget and refused over it, without a profile for a device
class of its target, and with a budget that is no number of milliseconds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from agent import profiling
from hub.cli import rollouts as cli
from hub.cli.client import HubClient
from hub.cli.config import Connection
from hubapp import InProcessHub


@pytest.fixture
def hub(inproc: InProcessHub, monkeypatch: pytest.MonkeyPatch) -> InProcessHub:
    inproc.publish("tiny", 1)
    inproc.add_devices(["dev-a", "dev-b"], site="lab")

    def client(hub: str | None, token: str | None) -> HubClient:
        made = HubClient(Connection(hub="http://testserver", token=None))
        made._http = inproc.client
        made._probed = True
        return made

    monkeypatch.setattr(cli, "client", client)
    return inproc


@pytest.fixture
def p99(hub: InProcessHub) -> float:
    """Profile tiny:1 here (onnxruntime, batch 1), store it; the slowest p99 in ms."""
    model_dir = hub.built[1].parent
    rows = []
    for target in profiling.targets("onnx", ["onnxruntime"])[0]:
        rows += [{"device_class": "linux/amd64", "variant": "default", **row}
                 for row in profiling.profile(model_dir, "model.onnx", target, [1], 5,
                                              print)]
    answer = hub.client.post("/api/v1/models/tiny/versions/1/profiles",
                             json={"host": "lab", "rows": rows})
    assert answer.status_code == 200, answer.text
    return max(r["p99_ms"] for r in rows)


def create(*args: str) -> Any:
    return CliRunner().invoke(cli.rollout, ["create", "tiny:1", "--target", "site=lab", *args],
                              env={"COLUMNS": "200"})


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_a_rollout_over_its_budget_is_refused_and_one_under_it_accepted(
        hub: InProcessHub, p99: float) -> None:
    refused = create("--max-latency-ms", f"{p99 / 2:.6f}")
    assert refused.exit_code == 1
    assert "has a p99 latency of" in one_line(refused.output)
    assert "at batch size 1 on linux/amd64 (onnxruntime:CPU), over the budget of" in one_line(
        refused.output)
    assert "raise --max-latency-ms" in one_line(refused.output)
    assert hub.db.query("SELECT id FROM rollouts") == []

    accepted = create("--max-latency-ms", f"{p99 * 2 + 1:.6f}", "--json")
    assert accepted.exit_code == 0, accepted.output
    rollout = json.loads(accepted.output)
    spec = json.loads(hub.db.query_one("SELECT spec FROM rollouts WHERE id = ?",
                                       (rollout["id"],))["spec"])
    assert spec["max_latency_ms"] == pytest.approx(p99 * 2 + 1)


def test_a_device_class_without_a_profile_is_refused(hub: InProcessHub, p99: float) -> None:
    hub.add_devices(["dev-pi"], platform="linux/arm64", site="lab")
    refused = create("--max-latency-ms", "1000")
    assert refused.exit_code == 1
    assert ("tiny:1 has no profile at batch size 1 on linux/arm64, so its latency budget of "
            "1000 ms cannot be checked; run `edgefleet model profile tiny:1` on a linux/arm64 "
            "machine first") in one_line(refused.output)


def test_without_a_profile_or_a_known_platform_the_budget_is_refused(
        hub: InProcessHub) -> None:
    refused = create("--max-latency-ms", "1000")
    assert refused.exit_code == 1 and "has no profile at batch size 1 on linux/amd64" in (
        one_line(refused.output))
    # Without a budget the same rollout goes ahead.
    assert create().exit_code == 0
    hub.db.conn.execute("UPDATE devices SET platform = NULL")
    refused = create("--max-latency-ms", "1000", "--deployment", "other")
    assert refused.exit_code == 1
    assert "no target device has reported its platform yet" in one_line(refused.output)


@pytest.mark.parametrize("budget", ["0", "-1", "1e12"])
def test_a_budget_that_is_no_duration_is_refused(hub: InProcessHub, budget: str) -> None:
    refused = create("--max-latency-ms", budget)
    assert refused.exit_code == 1
    assert "max latency" in refused.output and "milliseconds" in one_line(refused.output)


@pytest.mark.parametrize("option", ["--max-latency-ms", "--max-error-rate",
                                    "--max-latency-ratio"])
@pytest.mark.parametrize("budget", ["nan", "inf"])
def test_a_limit_that_is_no_number_is_refused_before_sending(hub: InProcessHub, option: str,
                                                             budget: str) -> None:
    refused = create(option, budget)
    assert refused.exit_code == 2
    assert option in refused.output and "give a finite number" in one_line(refused.output)


def test_profiles_are_read_back_and_go_with_their_version(hub: InProcessHub, p99: float) -> None:
    rows = hub.client.get("/api/v1/models/tiny/versions/1/profiles").json()
    assert rows == hub.client.get("/api/v1/models/tiny/versions/latest").json()["profiles"]
    assert [(r["runtime"], r["batch"], r["host"]) for r in rows] == [("onnxruntime", 1, "lab")]
    assert hub.client.delete("/api/v1/models/tiny/versions/1").status_code == 204
    assert hub.db.query("SELECT * FROM model_profiles") == []
    assert hub.client.get("/api/v1/models/tiny/versions/1/profiles").status_code == 404
