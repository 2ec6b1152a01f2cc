"""A small real fleet for the rollout tests.

A real Mosquitto, a real `edgefleet hub serve` using it (`--mqtt-url`), and
real `edgefleet agent run` processes, each with its own data dir and scoring
port. Tests drive the hub the way a user does, with the CLI
(`edgefleet rollout ...`) and the REST API, and check the devices through
what the agents report and through real scoring requests.

Tests that share one fleet keep out of each other's way by targeting their
own tag (`Fleet.tag`) and using their own deployment names.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from agentproc import AgentProcess, enrollment_token, infer, start_agent, wait_for
from conftest import Cli
from hubproc import HubProcess, start_hub
from mosquitto import Mosquitto, start_mosquitto

DONE = ("completed", "aborted", "rolled_back")


def parse_time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass
class Fleet:
    base: Path
    broker: Mosquitto
    hub: HubProcess
    cli: Cli
    agents: list[AgentProcess] = field(default_factory=list)

    # -- hub ----------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.hub.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.hub.admin_token}"})

    def get(self, path: str, **params: Any) -> Any:
        with self._client() as c:
            answer = c.get(path, params=params)
        answer.raise_for_status()
        return answer.json()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._client() as c:
            answer = c.request(method, path, **kwargs)
        answer.raise_for_status()
        return answer.json()

    def restart_hub(self, sig: int = signal.SIGTERM) -> None:
        """Stop the hub (SIGKILL: as a crash) and start it again on the same data dir and port."""
        code = self.hub.stop(sig)
        if sig == signal.SIGTERM:
            assert code == 0, self.hub.log()
        self.hub = start_hub(self.hub.data_dir, port=self.hub.port,
                             extra_args=("--mqtt-url", self.broker.url))
        self.cli = Cli(self.hub, self.base)

    # -- devices ------------------------------------------------------------------

    def start_agents(self, count: int, tags: dict[str, str] | None = None) -> list[AgentProcess]:
        """Enroll and start COUNT agents at once (each one takes a few seconds to come up)."""
        token = enrollment_token(self.hub, tags=tags or {}, max_uses=count)
        started: list[AgentProcess | BaseException | None] = [None] * count
        first = len(self.agents)

        def one(i: int) -> None:
            try:
                started[i] = start_agent(self.hub, self.base / f"agent{first + i}", token=token)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
                started[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        agents = [a for a in started if isinstance(a, AgentProcess)]
        self.agents += agents  # so close() stops them, even when another failed
        failures = [outcome for outcome in started if not isinstance(outcome, AgentProcess)]
        if failures:
            raise RuntimeError(f"{len(failures)} agent(s) did not start: {failures[0]!r}")
        return agents

    def restart_agent(self, agent: AgentProcess) -> AgentProcess:
        """Start a stopped agent again: same data dir (identity, state), same scoring port."""
        assert agent.process.poll() is not None
        again = start_agent(self.hub, agent.data_dir, port=agent.port)
        self.agents[self.agents.index(agent)] = again
        return again

    def tag(self, agents: Iterable[AgentProcess], **tags: str) -> None:
        for agent in agents:
            self.request("PATCH", f"/api/v1/devices/{agent.device_id}/tags", json={"set": tags})

    def reported(self, agent: AgentProcess, deployment: str) -> dict[int, dict[str, Any]]:
        """What the hub has from the agent for DEPLOYMENT: version -> reported row."""
        rows = self.get(f"/api/v1/devices/{agent.device_id}/deployments")["reported"]
        return {r["version"]: r for r in rows if r["name"] == deployment}

    def desired(self, agent: AgentProcess, deployment: str) -> dict[str, Any] | None:
        rows = self.get(f"/api/v1/devices/{agent.device_id}/deployments")["desired"]
        return next((r for r in rows if r["name"] == deployment), None)

    def serving_version(self, agent: AgentProcess, deployment: str) -> int | None:
        """The version the agent itself says serves (its state file), or None."""
        serving = agent.state().get("serving", {}).get(deployment)
        return serving["primary"]["version"] if serving else None

    def wait_serving(self, agents: Sequence[AgentProcess], deployment: str, version: int,
                     timeout: float = 60) -> None:
        """Until every agent reports VERSION of DEPLOYMENT serving and answers with it."""
        for agent in agents:
            wait_for(lambda a=agent: self.reported(a, deployment).get(version, {}).get("state")
                     == "serving", timeout=timeout,
                     what=f"{agent.device_id} reporting {deployment} v{version} serving")
            assert self.serving_version(agent, deployment) == version
            assert self.score(agent, deployment) == str(version)

    def score(self, agent: AgentProcess, deployment: str) -> str:
        """A real scoring request to the agent; the model_version that answered."""
        answer = infer(agent, deployment, [[1.0, 2.0, 3.0]])
        assert answer["outputs"][0]["shape"] == [1, 2]
        return str(answer["model_version"])

    def deploy(self, agents: Iterable[AgentProcess], ref: str, deployment: str) -> None:
        """The starting point of a test: DEPLOYMENT runs REF on AGENTS (set directly)."""
        agents = list(agents)
        for agent in agents:
            self.cli.run("deploy", ref, "--device", agent.device_id, "--deployment", deployment)
        self.wait_serving(agents, deployment, int(ref.split(":")[1]))

    # -- rollouts -----------------------------------------------------------------

    def create(self, ref: str, *args: str) -> dict[str, Any]:
        record = self.cli.json("rollout", "create", ref, *args)
        assert isinstance(record, dict)
        return record

    def show(self, rollout_id: str) -> dict[str, Any]:
        record = self.get(f"/api/v1/rollouts/{rollout_id}", devices="true")
        assert isinstance(record, dict)
        return record

    def members(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        """device id -> its row in the rollout (wave, state, assigned_at, serving_at, error)."""
        return {d["device_id"]: d for d in self.show(rollout_id)["devices"]}

    def wait_rollout(self, rollout_id: str, *states: str, timeout: float = 90) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            record = self.show(rollout_id)
            if record["state"] in states:
                return record
            assert record["state"] not in DONE, f"{rollout_id} ended {record['state']}: {record}"
            return None

        return wait_for(reached, timeout=timeout, what=f"{rollout_id} to be {'/'.join(states)}")

    def audit(self, rollout_id: str) -> list[dict[str, Any]]:
        """The audit entries about ROLLOUT_ID, oldest first."""
        entries = self.get("/api/v1/audit", limit=1000)
        return [e for e in reversed(entries) if e["target"] == rollout_id]

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        code = self.hub.stop()
        self.broker.stop()
        assert code == 0, self.hub.log()


def start_fleet(base: Path, agents: int = 3, tags: dict[str, str] | None = None) -> Fleet:
    broker = start_mosquitto(base / "mosquitto")
    try:
        hub = start_hub(base / "hub", extra_args=("--mqtt-url", broker.url))
    except BaseException:
        broker.stop()
        raise
    fleet = Fleet(base, broker, hub, Cli(hub, base))
    try:
        fleet.start_agents(agents, tags)
    except BaseException:
        fleet.close()
        raise
    return fleet


def agent_logs(fleet: Fleet) -> str:
    return "\n".join(f"--- {a.device_id}\n{a.log()[-3000:]}" for a in fleet.agents)


def dump(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1)
