"""The agent's state file (agent/state.py), in process: what a restart finds."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

from agent.state import STATE_FILE, AgentState, Installed, Serving, StateFile, Update


def installed(version: int) -> Installed:
    return Installed(version=version, digest=f"sha256:{version:064x}",
                     directory=f"/data/versions/d/{version}-abc", entrypoint="model.onnx",
                     framework="onnx", prefer=["onnxruntime:CPU"],
                     package_prefer=["openvino:GPU"], sample_request={"inputs": []})


def full_state() -> AgentState:
    return AgentState(
        applied_generation=7,
        serving={"d": Serving("d", "diabetes", primary=installed(2), candidate=installed(3),
                              traffic=10, shadow=True, previous=installed(1))},
        update=Update(generation=7, deployment="d", model="diabetes", role="candidate",
                      version=3, repository="models/diabetes", digest=f"sha256:{3:064x}",
                      size=512, prefer=["onnxruntime:CPU"], state="self_test",
                      since="2026-01-01T00:00:00Z", traffic=10, shadow=True,
                      error=None, staged=installed(3)),
        pending_desired=base64.b64encode(b"signed desired state").decode(),
        statuses=[{"name": "d", "model": "diabetes", "version": 2, "state": "serving",
                   "since": "2026-01-01T00:00:00Z", "error": None, "runtime": "onnxruntime",
                   "device": "CPU"}],
        refusals=[{"generation": 6, "reason": "expired", "message": "too old",
                   "at": "2026-01-01T00:00:00Z"}],
    )


def test_a_fresh_device_starts_from_nothing(tmp_path: Path) -> None:
    state = StateFile(tmp_path).load()
    assert state == AgentState() and state.pending_payload is None


def test_everything_saved_comes_back(tmp_path: Path) -> None:
    state = full_state()
    StateFile(tmp_path).save(state)
    again = StateFile(tmp_path).load()
    assert again == state
    assert again.pending_payload == b"signed desired state"
    assert again.serving["d"].route().candidate is not None
    assert again.serving["d"].route().traffic == 10


def test_saving_replaces_the_file_whole(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    files.save(full_state())
    files.save(AgentState(applied_generation=8))
    assert files.load() == AgentState(applied_generation=8)
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary file left
    assert stat.S_IMODE((tmp_path / STATE_FILE).stat().st_mode) == 0o644


def test_a_state_file_without_the_newer_fields_loads_with_their_defaults(tmp_path: Path) -> None:
    # Written by an agent from before candidates, rollback copies and refusals.
    primary = {k: v for k, v in full_state().serving["d"].primary.__dict__.items()
               if k not in ("package_prefer", "sample_request")}
    (tmp_path / STATE_FILE).write_text(json.dumps({
        "applied_generation": 3,
        "serving": {"d": {"name": "d", "model": "diabetes", "primary": primary}},
    }))
    state = StateFile(tmp_path).load()
    assert state.applied_generation == 3 and state.update is None and state.refusals == []
    serving = state.serving["d"]
    assert serving.candidate is None and serving.previous is None and not serving.shadow
    assert serving.primary.package_prefer == [] and serving.primary.sample_request is None
