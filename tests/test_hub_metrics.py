"""The hub's own metrics: the text format's builder, `/metrics` in process (auth, route
templates, what the database says), and a real hub with `--metrics-port` whose devices
die while it is down: the hub's liveness marks them offline."""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from agent.mqtt import Message
from agentproc import wait_for
from conftest import Cli
from contract import protocol
from fleetdevice import connect, enroll
from hub import liveness, tokens
from hub.api.app import create_app
from hub.ingest import write_batch
from hub.prometheus import CONTENT_TYPE, Exposition, Histogram
from hub.storage.db import Database, format_time
from hubapp import bare_state
from hubproc import free_port, start_hub

ROOT = Path(__file__).resolve().parent.parent

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line; checks each line's shape."""
    found = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.fullmatch(r"# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+", line), line
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) (\S+)', line)
        assert match, line
        found[match[1]] = float(match[2])
    return found


def test_the_builder_escapes_values_and_refuses_what_would_break_the_format() -> None:
    out = Exposition()
    out.family("x_requests", "counter", "Help with a \\ and a\nnewline.")
    out.sample(3, {"route": 'a"b\\c\nd'})
    latency = Histogram((0.1, 1.0))
    for value in (0.05, 0.5, 5.0):
        latency.observe(value)
    out.family("x_seconds", "histogram", "Latency.")
    out.histogram(latency.snapshot(), {"route": "/r"})
    text = out.text()
    assert "# HELP x_requests Help with a \\\\ and a\\nnewline." in text
    assert 'x_requests_total{route="a\\"b\\\\c\\nd"} 3' in text
    got = samples(text)
    assert [got[f'x_seconds_bucket{{route="/r",le="{le}"}}'] for le in ("0.1", "1", "+Inf")] == [
        1, 2, 3]
    assert got['x_seconds_count{route="/r"}'] == 3 and got['x_seconds_sum{route="/r"}'] == 5.55
    with pytest.raises(ValueError, match="declared twice"):
        out.family("x_seconds", "gauge", "again")
    with pytest.raises(ValueError, match="label name"):
        out.sample(1, {"bad-label": "x"})
    with pytest.raises(ValueError, match="no samples named"):
        out.sample(1, suffix="_total")
    with pytest.raises(ValueError, match="increase strictly"):
        Histogram((1.0, 1.0))


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Database]]:
    db = Database(tmp_path / "hub.db")
    with TestClient(create_app(bare_state(tmp_path, db))) as client:
        yield client, db


def test_metrics_need_a_token_of_any_role_and_count_requests_by_route(
        api: tuple[TestClient, Database]) -> None:
    client, db = api
    assert client.get("/metrics").status_code == 401
    _, viewer = tokens.create(db, name="viewer", role="viewer", created_by="test")
    auth = {"Authorization": f"Bearer {viewer}"}
    with db.transaction() as conn:
        conn.executemany("INSERT INTO devices (id, name, tags, status) VALUES (?, ?, '{}', ?)",
                         [("dev-1", "one", "online"), ("dev-2", "two", "offline"),
                          ("dev-3", "three", "offline")])
    for device in ("dev-1", "dev-2", "nobody"):
        client.get(f"/api/v1/devices/{device}", headers=auth)
    client.get("/no/such/path/3f2a")
    answer = client.get("/metrics", headers=auth)
    assert answer.status_code == 200 and answer.headers["content-type"] == CONTENT_TYPE
    got = samples(answer.text)
    route = 'method="GET",route="/api/v1/devices/{device_id}"'
    assert got[f'edgefleet_http_requests_total{{{route},status="200"}}'] == 2
    assert got[f'edgefleet_http_requests_total{{{route},status="404"}}'] == 1
    assert got[f'edgefleet_http_request_duration_seconds_count{{{route}}}'] == 3
    assert got['edgefleet_http_requests_total{method="GET",route="<unmatched>",status="404"}'] == 1
    assert got['edgefleet_http_requests_total{method="GET",route="/metrics",status="401"}'] == 1
    assert not any("3f2a" in name for name in got)  # paths nobody routes are not labels
    assert got['edgefleet_devices{status="online"}'] == 1
    assert got['edgefleet_devices{status="offline"}'] == 2
    assert got['edgefleet_database_bytes{file="db"}'] > 0
    assert got["edgefleet_blob_store_bytes"] == 0
    assert got["edgefleet_broker_connected"] == 0  # no fleet link in process


def test_silent_devices_are_marked_offline_only_while_the_hub_can_hear(tmp_path: Path) -> None:
    db = Database(tmp_path / "hub.db")
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    with db.transaction() as conn:
        conn.executemany("INSERT INTO devices (id, name, tags, status, last_seen)"
                         " VALUES (?, ?, '{}', ?, ?)",
                         [("dev-old", "a", "online", format_time(now - timedelta(minutes=5))),
                          ("dev-new", "b", "online", format_time(now - timedelta(seconds=5))),
                          ("dev-never", "c", "online", None),
                          ("dev-gone", "d", "offline", None)])
    clock = [now]
    hearing = [False]
    sweeper = liveness.Liveness(db, silent_for=timedelta(minutes=1), receiving=lambda: hearing[0],
                                clock=lambda: clock[0])
    clock[0] += timedelta(minutes=2)
    assert sweeper.sweep() == []  # the hub hears nothing: silence says nothing
    hearing[0] = True
    assert sweeper.sweep() == []  # a whole minute to be heard first, once it hears again
    clock[0] += timedelta(minutes=1)
    assert sweeper.sweep() == ["dev-never", "dev-new", "dev-old"]
    assert sweeper.marked == 3 and sweeper.sweep() == []
    assert {r["id"]: r["status"] for r in db.query("SELECT id, status FROM devices")} == {
        "dev-old": "offline", "dev-new": "offline", "dev-never": "offline",
        "dev-gone": "offline"}


def test_a_live_message_brings_a_device_marked_silent_back_online(tmp_path: Path) -> None:
    db = Database(tmp_path / "hub.db")
    with db.transaction() as conn:
        conn.executemany("INSERT INTO devices (id, name, tags, status) VALUES (?, ?, '{}',"
                         " 'offline')", [(d, d) for d in ("dev-a", "dev-b", "dev-c")])

    def points(device: str) -> Message:
        now = datetime.now(UTC)
        return Message(protocol.telemetry_topic(device), protocol.build_telemetry(
            protocol.TelemetryBatch(device, (protocol.Point(1, now, "system", {"cpu": 1}),))))

    write_batch(db, [
        points("dev-a"),                                          # alive again
        points("dev-b"), Message(protocol.status_topic("dev-b"), protocol.OFFLINE),  # its goodbye
        replace(points("dev-c"), retain=True),                    # old news from the broker
    ])
    assert {r["id"]: r["status"] for r in db.query("SELECT id, status FROM devices")} == {
        "dev-a": "online", "dev-b": "offline", "dev-c": "offline"}


def test_a_real_hub_serves_metrics_on_its_own_port_and_notices_devices_that_died_while_down(
        tmp_path: Path) -> None:
    metrics_port = free_port()
    options = ("--metrics-port", str(metrics_port), "--heartbeat-seconds", "1",
               "--device-offline-heartbeats", "3")
    data = tmp_path / "data"
    hub = start_hub(data, extra_args=options)
    scrape = f"http://127.0.0.1:{metrics_port}/metrics"
    auth = {"Authorization": f"Bearer {hub.admin_token}"}
    survivor, victim = enroll(hub, "survivor"), enroll(hub, "victim")
    alive, dying = connect(survivor), connect(victim, will=None)
    talking = threading.Event()
    seq = iter(range(1, 1_000_000))

    def talk() -> None:  # the survivor sends telemetry every 0.3 s, as an agent would
        while not talking.wait(0.3):
            if alive.session.connected:
                n = next(seq)
                alive.telemetry(range(n, n + 1))

    talker = threading.Thread(target=talk, daemon=True)
    talker.start()
    try:
        dying.telemetry(range(1, 4))

        def both_online() -> dict[str, float] | None:
            got = samples(httpx.get(scrape).text)
            online = got.get('edgefleet_devices{status="online"}') == 2
            return got if online and got.get("edgefleet_ingest_points_total", 0) >= 3 else None

        got = wait_for(both_online, what="both devices online, their points stored")
        assert got["edgefleet_broker_connected"] == 1
        assert got["edgefleet_broker_process_running"] == 1
        assert got['edgefleet_ingest_messages_total{kind="telemetry"}'] >= 1
        assert got["edgefleet_ingest_batch_messages_count"] >= 1
        assert "edgefleet_ingest_lag_seconds" in got
        assert httpx.get(f"{hub.url}/metrics").status_code == 401  # the API's port asks
        assert httpx.get(f"{hub.url}/metrics", headers=auth).status_code == 200

        # The CLI's telemetry command works with its defaults and says what it read.
        cli = Cli(hub, tmp_path)
        shown = cli.run("device", "telemetry", victim["device"]["id"]).stdout
        assert "raw points since" in shown and "inference" in shown, shown
        week = cli.run("device", "telemetry", victim["device"]["id"], "--since", "7d").stdout
        assert "per-hour rollups since" in week, week

        # The victim dies while the hub (and its broker) are down, and no broker ever
        # says so: it has no last will, as with a broker that loses them.
        assert hub.stop() == 0, hub.log()
        dying.session.close()
        hub = start_hub(data, extra_args=options, port=hub.port, mqtt_port=hub.mqtt_port)
        api = f"{hub.url}/api/v1/devices"

        def status(enrollment: dict) -> str:
            return str(httpx.get(f"{api}/{enrollment['device']['id']}", headers=auth)
                       .json()["status"])

        wait_for(lambda: status(victim) == "offline", what="the dead device offline")
        assert status(survivor) == "online"
        got = samples(httpx.get(scrape).text)
        assert got["edgefleet_devices_marked_offline_total"] == 1
        assert "silent for over 0:00:03, now offline: " + victim["device"]["id"] in hub.log()

        back = connect(victim)  # and speaks again: online at once
        try:
            wait_for(lambda: status(victim) == "online", what="the device back online")
        finally:
            back.session.close()
    finally:
        talking.set()
        talker.join()
        alive.session.close()
        assert hub.stop() == 0, hub.log()


def test_the_grafana_dashboard_uses_only_metrics_the_hub_serves(
        api: tuple[TestClient, Database]) -> None:
    client, db = api
    _, viewer = tokens.create(db, name="viewer", role="viewer", created_by="test")
    text = client.get("/metrics", headers={"Authorization": f"Bearer {viewer}"}).text
    served = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        served |= {name + suffix for suffix in {
            "counter": ("_total",), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count")}[kind]}
    dashboard = json.loads((ROOT / "examples/grafana/edgefleet-hub.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel.get("targets", ())
            for name in re.findall(r"edgefleet_[a-z_]+", target["expr"])}
    assert len(used) > 20 and used <= served, used - served
