"""`edgefleet rollout show / watch / list` against the in-process hub: the CLI's own REST
client, its HTTP sent through FastAPI's TestClient instead of a socket.

`show` prints settings as a person writes them (no Python reprs) and the soak; `watch`
with stdout not a terminal prints one plain line per change and exits 0 (completed),
3 (stopped without completing) or 4 (--timeout passed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from hub.cli import rollouts as cli
from hub.cli.client import HubClient
from hub.cli.config import Connection
from hub.rollouts import reads
from hub.rollouts.engine import Engine
from hubapp import InProcessHub

DEVICES = ["dev-a", "dev-b", "dev-c"]


@pytest.fixture
def hub(inproc: InProcessHub, monkeypatch: pytest.MonkeyPatch) -> InProcessHub:
    for version in (1, 2):
        inproc.publish("tiny", version)
    inproc.add_devices(DEVICES, site="lab")
    inproc.deploy(DEVICES, "tiny", 1, "tiny")

    def client(hub: str | None, token: str | None) -> HubClient:
        made = HubClient(Connection(hub="http://testserver", token=None))
        made._http = inproc.client
        made._probed = True  # in process: no wrong URL to probe for
        return made

    monkeypatch.setattr(cli, "client", client)
    return inproc


def run(*args: str) -> Any:
    return CliRunner().invoke(cli.rollout, list(args), catch_exceptions=False,
                              env={"COLUMNS": "200"})


def create(hub: InProcessHub, *args: str) -> str:
    done = run("create", "tiny:2", "--target", "site=lab", *args, "--json")
    assert done.exit_code == 0, done.output
    return str(__import__("json").loads(done.output)["id"])


def test_show_prints_settings_and_the_soak_without_python_reprs(hub: InProcessHub) -> None:
    rollout_id = create(hub, "--waves", "1,all", "--soak", "10m", "--auto-rollback")
    engine = Engine(hub.db, hub.notify)
    engine.tick()
    first = next(d["device_id"] for d in reads.show(hub.db, rollout_id, devices=True)["devices"]
                 if d["wave"] == 1)
    hub.applied([first])
    hub.report([first], "tiny", "tiny", 2, "serving")
    engine.tick()
    out = run("show", rollout_id).output
    assert "target site=lab" in out and "auto-rollback on" in out and "soak 10m" in out
    assert "wave 1 soaking: 9m5" in out or "wave 1 soaking: 10m00s left" in out, out
    assert "next wave at" in out
    for repr_ in ("{'", "['", "True", "False", "None"):
        assert repr_ not in out, out


def test_create_and_list_say_what_they_did(hub: InProcessHub) -> None:
    done = run("create", "tiny:2", "--target", "site=nowhere")
    assert done.exit_code == 0
    assert "no device matches the target yet: devices that join it get the version" in (
        " ".join(done.output.split()))
    refused = CliRunner().invoke(cli.rollout, ["create", "tiny:2", "--target", "site=lab",
                                               "--max-failures", "150%"])
    assert refused.exit_code == 1
    assert "max failures '150%'" in refused.output and "Traceback" not in refused.output


def test_watch_piped_prints_a_line_per_change_and_exits_0_when_completed(
        hub: InProcessHub) -> None:
    rollout_id = create(hub, "--waves", "1,all")
    stop = threading.Event()

    def devices_and_engine() -> None:
        engine = Engine(hub.db, hub.notify)
        stop.wait(0.5)  # watch sees the rollout as created first
        while not stop.is_set():
            engine.tick()
            assigned = [d["device_id"] for d in
                        reads.show(hub.db, rollout_id, devices=True)["devices"]
                        if d["state"] == "assigned"]
            hub.applied(assigned)
            hub.report(assigned, "tiny", "tiny", 2, "serving")
            time.sleep(0.1)

    worker = threading.Thread(target=devices_and_engine)
    worker.start()
    try:
        done = run("watch", rollout_id, "--interval", "0.05", "--timeout", "30")
    finally:
        stop.set()
        worker.join()
    assert done.exit_code == 0, done.output
    lines = [line for line in done.output.splitlines() if f" {rollout_id} " in line]
    assert len(lines) == len(set(line.split(" ", 1)[1] for line in lines)), lines  # changes only
    assert f"{rollout_id} created wave 0/2: 3 pending, 0 serving, 0 failed" in lines[0], lines
    assert lines[-1].endswith(f"{rollout_id} completed wave 2/2: 3 serving, 0 failed"), lines
    assert "Summary: completed; 3/3 serving, 0 failed" in done.output


@pytest.fixture
def ticking(hub: InProcessHub) -> Iterator[Engine]:
    yield Engine(hub.db, hub.notify)


def test_watch_exit_codes_say_how_it_ended(hub: InProcessHub, ticking: Engine) -> None:
    running = create(hub, "--waves", "1,all")
    ticking.tick()
    done = run("watch", running, "--interval", "0.05", "--timeout", "0.3")
    assert done.exit_code == 4, done.output
    assert "gave up after --timeout 0.3s" in done.output
    assert len([line for line in done.output.splitlines() if running in line]) == 1

    assert run("rollback", running).exit_code == 0
    done = run("watch", running)
    assert done.exit_code == 3 and "Summary: rolled_back" in done.output
    assert run("watch", running, "--json").exit_code == 3


def test_a_devices_error_is_shown_as_text_by_show_and_watch(hub: InProcessHub) -> None:
    """An error a device reports is untrusted text: Rich markup in it (`[/]` would crash the
    renderer, `[link=...]` would make a link) and terminal escapes are shown, not obeyed."""
    rollout_id = create(hub, "--waves", "all")
    engine = Engine(hub.db, hub.notify)
    engine.tick()
    hostile = "[/] [link=https://evil.example]x[/link] \x1b[31mred\x1b]0;title\x07"
    hub.applied(DEVICES)
    hub.report(DEVICES[:1], "tiny", "tiny", 2, "failed", error=hostile)
    engine.tick()
    for args in (("show", rollout_id), ("show", rollout_id, "--devices"),
                 ("watch", rollout_id, "--interval", "0.05", "--timeout", "0.2")):
        out = run(*args).output
        assert "[/] [link=https://evil.example]x[/link]" in out, out
        assert "\x1b" not in out and "\x07" not in out, out
