"""The ids of commands an agent took (agent/commands.py `SeenCommands`): saved before a
command runs, so a replay after a restart is still refused, and forgotten once expired."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import commands
from contract import protocol as p

NOW = datetime(2025, 1, 31, 12, tzinfo=UTC)


def command(cid: str, minutes: int) -> p.Command:
    return p.Command(cid, "dev-1", NOW, NOW + timedelta(minutes=minutes),
                     p.CommandKind.PROFILE, p.ProfileArgs("tiny", 1, "default", 1, 1))


def test_taken_ids_survive_a_restart_until_they_expire(tmp_path: Path) -> None:
    seen = commands.SeenCommands(tmp_path / commands.SEEN_FILE)
    assert seen.take(command("c-short", 1), NOW) and seen.take(command("c-long", 30), NOW)
    again = commands.SeenCommands(tmp_path / commands.SEEN_FILE)  # the agent restarted
    assert again.ids(NOW) == {"c-short", "c-long"}
    assert again.ids(NOW + timedelta(minutes=5)) == {"c-long"}
    assert again.take(command("c-next", 30), NOW + timedelta(minutes=5))
    # The expired one left the file: read at a time it was valid, it is not there.
    assert commands.SeenCommands(tmp_path / commands.SEEN_FILE).ids(NOW) == {"c-long", "c-next"}


def test_too_many_live_commands_are_not_taken(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "MAX_SEEN", 4)  # each take is an fsynced write
    seen = commands.SeenCommands(tmp_path / commands.SEEN_FILE)
    for i in range(4):
        assert seen.take(command(f"c-{i}", 60), NOW)
    assert not seen.take(command("c-one-more", 60), NOW)
    assert seen.take(command("c-later", 60), NOW + timedelta(minutes=61))
