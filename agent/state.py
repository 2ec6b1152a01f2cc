"""What the agent remembers across restarts, in one JSON file written atomically.

- `applied_generation`: the last desired state fully processed; anything
  not above it is refused as a replay.
- `serving`: the last known good version(s) of each deployment; what a
  restarted agent loads before anything else.
- `update`: the update in progress and the state it is in, saved before
  each step runs (see agent/updates.py), with the desired state it belongs to.
- `statuses`: what the agent reports for each deployment version.
- `refusals`: the most recent desired states it refused, and why.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.decisions import Route, Running
from contract.files import read_json, write_json
from contract.protocol import UpdateState
from contract.settings import Batching, Settings, effective_batching

STATE_FILE = "state.json"


def status_key(status: dict[str, Any]) -> tuple[str, int, UpdateState]:
    """A saved status (AgentState.statuses) as agent.decisions reads it."""
    return status["name"], status["version"], UpdateState(status["state"])


@dataclass
class Installed:
    """One staged version and everything needed to load it again."""

    version: int
    digest: str
    directory: str
    entrypoint: str
    framework: str
    prefer: list[str]            # as the desired state asks (may be empty)
    package_prefer: list[str] = field(default_factory=list)  # serving.json's default
    sample_request: dict[str, Any] | None = None
    image: str | None = None     # container mode: the engine's image id (the signed config)
    # The deployment's settings it runs with (contract/settings.py JSON; {}: none), and
    # the package's default batching (its serving.json's, if it has one).
    settings: dict[str, Any] = field(default_factory=dict)
    package_batching: dict[str, Any] | None = None
    # The drift bins of its desired state (contract/sketch.py JSON; None: not sketched).
    sketch: list[dict[str, Any]] | None = None

    def running(self) -> Running:
        return Running(self.version, self.digest, tuple(self.prefer), self.deployment_settings)

    @property
    def deployment_settings(self) -> Settings:
        return Settings.from_json(self.settings)

    @property
    def batching(self) -> Batching | None:
        """What it batches with: the deployment's setting, else the package's, else off."""
        package = (None if self.package_batching is None
                   else Batching.from_json(self.package_batching))
        return effective_batching(self.deployment_settings.batching, package)


@dataclass
class Serving:
    """What one deployment serves: a primary and maybe a candidate (split or shadow)."""

    name: str
    model: str
    primary: Installed
    candidate: Installed | None = None
    traffic: int = 0          # candidate's share: answers (split) or copies (shadow)
    shadow: bool = False
    previous: Installed | None = None  # kept on disk for a rollback

    def route(self) -> Route:
        return Route(self.primary.running(),
                     self.candidate.running() if self.candidate else None,
                     self.traffic, self.shadow)


@dataclass
class Update:
    """The update in progress: one version of one deployment moving through the states."""

    generation: int
    deployment: str
    model: str
    role: str                 # "primary" or "candidate"
    version: int
    repository: str
    digest: str
    size: int
    prefer: list[str]
    state: str
    since: str
    traffic: int = 0          # for a candidate: its share (split) or copy rate (shadow)
    shadow: bool = False
    error: str | None = None
    staged: Installed | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the deployment's (Settings JSON)
    sketch: list[dict[str, Any]] | None = None  # the version's drift bins (contract/sketch.py)


@dataclass
class AgentState:
    applied_generation: int = 0
    serving: dict[str, Serving] = field(default_factory=dict)
    update: Update | None = None
    pending_desired: str | None = None  # base64 of the signed payload being applied
    statuses: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pending_payload(self) -> bytes | None:
        return base64.b64decode(self.pending_desired) if self.pending_desired else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentState:
        def installed(value: dict[str, Any] | None) -> Installed | None:
            return Installed(**value) if value else None

        serving = {
            name: Serving(**{**s, "primary": installed(s["primary"]),
                             "candidate": installed(s.get("candidate")),
                             "previous": installed(s.get("previous"))})
            for name, s in data.get("serving", {}).items()
        }
        update = data.get("update")
        return cls(
            applied_generation=data.get("applied_generation", 0),
            serving=serving,
            update=(Update(**{**update, "staged": installed(update.get("staged"))})
                    if update else None),
            pending_desired=data.get("pending_desired"),
            statuses=data.get("statuses", []),
            refusals=data.get("refusals", []),
        )


class StateFile:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / STATE_FILE

    def load(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        return AgentState.from_json(read_json(self.path))

    def save(self, state: AgentState) -> None:
        write_json(self.path, state.to_json())
