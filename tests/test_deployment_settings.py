"""Per-deployment resources and batching at the hub: the REST API refuses hostile values
with one line (422), stores what it takes (schema 5), puts it in the signed desired
state, shows it in `deploy`, `device show` and `rollout show`; a settings-only change is a
new generation; a rolled-back rollout gives the devices their previous settings. The CLI
runs its own REST client against the in-process hub (hubapp.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from contract.settings import Batching, Resources, Settings
from hub import deployments, desired
from hub.cli import deploy as deploy_cli
from hub.cli import devices as devices_cli
from hub.cli import rollouts as rollouts_cli
from hub.cli.client import HubClient
from hub.cli.config import Connection
from hub.rollouts import commands
from hub.rollouts.engine import Engine
from hub.storage.db import SCHEMA_VERSION, Database
from hubapp import InProcessHub
from postgres import as_older_hub_left_it

DEVICES = ["dev-a", "dev-b"]
URL = "/api/v1/devices/dev-a/deployments"


@pytest.fixture
def hub(inproc: InProcessHub, monkeypatch: pytest.MonkeyPatch) -> InProcessHub:
    for version in (1, 2):
        inproc.publish("tiny", version)
    inproc.add_devices(DEVICES, site="lab")

    def client(hub: str | None, token: str | None) -> HubClient:
        made = HubClient(Connection(hub="http://testserver", token=None))
        made._http = inproc.client
        made._probed = True
        return made

    for module in (deploy_cli, devices_cli, rollouts_cli):
        monkeypatch.setattr(module, "client", client)
    return inproc


def cli(command: Any, *args: str) -> Any:
    return CliRunner().invoke(command, list(args), catch_exceptions=False,
                              env={"COLUMNS": "250"})


def signed_settings(hub: InProcessHub, device: str = "dev-a") -> list[Settings]:
    generation, rows = deployments.desired_snapshot(hub.db, [device])[device]
    state = desired.build(device, generation, rows, issued_at=datetime.now(UTC),
                          validity=timedelta(days=1))
    return [d.settings for d in state.deployments]


def test_deploy_with_settings_from_the_cli_to_the_signed_state(hub: InProcessHub) -> None:
    done = cli(deploy_cli.deploy, "tiny:1", "--device", "dev-a", "--cpus", "0.5",
               "--memory", "512Mi", "--gpus", "1", "--batch-size", "32", "--batch-delay-ms", "2")
    assert done.exit_code == 0, done.output
    assert ("dev-a: tiny runs tiny:1 with cpus 0.5, memory 512Mi, nvidia.com/gpu=1, batching "
            "32 rows/2 ms (desired generation 1)") in done.output
    record = hub.client.get(URL).json()["desired"][0]
    assert record["resources"] == {"cpus": "0.5", "memory": "512Mi",
                                   "accelerators": {"nvidia.com/gpu": 1}}
    assert record["batching"] == {"max_batch_size": 32, "max_delay_ms": 2}
    assert signed_settings(hub) == [Settings(Resources(500, 512 * 2**20,
                                                       (("nvidia.com/gpu", 1),)),
                                             Batching(32, 2))]
    shown = cli(devices_cli.device, "show", "dev-a")
    assert "cpus 0.5, memory 512Mi, nvidia.com/gpu=1, batching 32 rows/2 ms" in shown.output
    # A deployment without settings says nothing: the agent's and the package's defaults.
    cli(deploy_cli.deploy, "tiny:1", "--device", "dev-b")
    assert signed_settings(hub, "dev-b") == [Settings()]
    assert hub.client.get("/api/v1/devices/dev-b/deployments").json()["desired"][0][
        "resources"] == {}


def test_a_settings_only_change_is_a_new_generation_and_the_same_is_none(
        hub: InProcessHub) -> None:
    def deploy(**body: Any) -> int:
        answer = hub.client.post(URL, json={"model": "tiny", "version": 1, **body})
        assert answer.status_code == 201, answer.text
        return int(answer.json()["generation"])

    assert deploy(resources={"memory": "1Gi"}) == 1
    assert deploy(resources={"memory": 2**30}) == 1       # the same, in bytes: no change
    assert deploy(resources={"memory": "1Gi"}, batching="off") == 2
    assert signed_settings(hub) == [Settings(Resources(memory_bytes=2**30), Batching.OFF)]
    assert deploy(resources={"cpus": 2}) == 3
    assert deploy() == 4                                  # back to saying nothing


@pytest.mark.parametrize("body, complaint", [
    ({"resources": {"cpus": "nan"}}, "cpus 'nan': use cores"),
    ({"resources": {"cpus": 0}}, "cpus (millicores): 0 is outside"),
    ({"resources": {"cpus": "1e9"}}, "cpus '1e9'"),
    ({"resources": {"cpus": 10**9}}, "cpus "),
    ({"resources": {"cpus": 2000}}, "outside 10..1024000"),
    ({"resources": {"cpus": True}}, None),
    ({"resources": {"memory": "-1"}}, "memory '-1'"),
    ({"resources": {"memory": "1Ei"}}, "memory '1Ei'"),
    ({"resources": {"memory": 2**62}}, "outside 16777216.."),
    ({"resources": {"memory": 10**30}}, None),
    ({"resources": {"memory": "512Mi\n"}}, None),
    ({"resources": {"accelerators": {"gpu": 1}}}, "not an extended resource name"),
    ({"resources": {"accelerators": {"nvidia.com/gpu": -1}}}, "outside 0..64"),
    ({"resources": {"accelerators": {f"x.io/r{i}": 1 for i in range(9)}}}, None),
    ({"resources": {"disk": "1Gi"}}, None),
    ({"batching": {"max_batch_size": 0}}, "max_batch_size: 0 is outside 1..4096"),
    ({"batching": {"max_batch_size": 10**12}}, "outside 1..4096"),
    ({"batching": {"max_batch_size": 8, "max_delay_ms": 10**6}}, "max_delay_ms: 1000000 is"),
    ({"batching": {"max_batch_size": 1, "max_delay_ms": 5}}, "batching is off"),
    ({"batching": "on"}, None),
    ({"batching": {"max_batch_size": "32"}}, None),
])
def test_hostile_settings_are_422_with_one_line_and_change_nothing(
        hub: InProcessHub, body: dict[str, Any], complaint: str | None) -> None:
    answer = hub.client.post(URL, json={"model": "tiny", "version": 1, **body})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail.strip()
    if complaint is not None:
        assert complaint in detail
    assert hub.client.get(URL).json()["desired"] == []
    rollout = hub.client.post("/api/v1/rollouts", json={"model": "tiny", "version": 1,
                                                        "target": {"site": "lab"}, **body})
    assert rollout.status_code == 422, rollout.text
    assert hub.client.get("/api/v1/rollouts").json() == []


def test_cli_usage_errors_are_one_line() -> None:
    done = CliRunner().invoke(deploy_cli.deploy, ["tiny:1", "--device", "dev-a",
                                                  "--batch-delay-ms", "2"])
    assert done.exit_code == 2 and "--batch-delay-ms is about --batch-size" in done.output


def test_a_rollout_gives_its_settings_and_its_rollback_gives_the_old_ones_back(
        hub: InProcessHub) -> None:
    hub.client.post(URL, json={"model": "tiny", "version": 1,
                               "resources": {"memory": "256Mi"}}).raise_for_status()
    deployments.assign(hub.db, "dev-b", name="tiny", model="tiny", version=1)
    hub.applied(DEVICES)
    hub.report(DEVICES, "tiny", "tiny", 1, "serving")
    done = cli(rollouts_cli.rollout, "create", "tiny:2", "--target", "site=lab", "--cpus",
               "1.5", "--batch-size", "16", "--json")
    assert done.exit_code == 0, done.output
    rollout_id = json.loads(done.output)["id"]
    assert json.loads(done.output)["resources"] == {"cpus": "1.5"}
    Engine(hub.db, hub.notify).tick()
    new = Settings(Resources(cpu_millis=1500), Batching(16))
    assert signed_settings(hub, "dev-a") == signed_settings(hub, "dev-b") == [new]
    shown = cli(rollouts_cli.rollout, "show", rollout_id)
    assert "cpus 1.5, batching 16 rows/0 ms" in shown.output
    commands.roll_back(hub.db, rollout_id, actor="test", notify=hub.notify)
    assert signed_settings(hub, "dev-a") == [Settings(Resources(memory_bytes=256 * 2**20))]
    assert signed_settings(hub, "dev-b") == [Settings()]


def test_a_schema_4_database_gets_settings(hub: InProcessHub) -> None:
    deployments.assign(hub.db, "dev-a", name="tiny", model="tiny", version=1)
    as_older_hub_left_it(hub.db, 4, columns=(("deployments", "settings"),
                                             ("rollout_devices", "previous_settings")),
                         tables=("webhook_deliveries", "webhooks", "events",  # 6
                                 "model_profiles",  # 7
                                 "drift_baselines", "drift_sketches", "drift_results",  # 8
                                 "device_commands"))  # 9
    db = Database(hub.db.target)
    assert db.query_one("SELECT value FROM meta WHERE key = 'schema_version'") == {
        "value": str(SCHEMA_VERSION)}
    assert [d["resources"] for d in deployments.for_device(db, "dev-a")] == [{}]
    # The same deployment again changes nothing: "{}" is what it said before.
    generation = deployments.assign(db, "dev-a", name="tiny", model="tiny", version=1)
    assert generation == 1
