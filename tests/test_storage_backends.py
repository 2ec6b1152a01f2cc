"""The hub's storage layer on both of its databases, SQLite and PostgreSQL
(tests/postgres.py runs a private server): one schema, the registry's and the devices'
reads and writes, a constraint's refusal, and a whole hub process on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from agent.mqtt import Message
from contract import protocol
from hub import devices, drift_sketches, events, registry
from hub.ingest import write_batch
from hub.leader import Leader
from hub.retention import Retention, RetentionPolicy
from hub.storage import errors
from hub.storage.blobs import STALE_UPLOAD, FileBlobStore
from hub.storage.db import Database
from hubproc import start_hub
from postgres import PostgresServer


def test_both_databases_get_the_same_schema(tmp_path: Path, postgres_url: str) -> None:
    lite, pg = Database(tmp_path / "hub.db"), Database(postgres_url)
    shapes = [{table: db.dialect.columns(db.conn, table) for table in db.dialect.tables(db.conn)}
              for db in (lite, pg)]
    assert shapes[0] == shapes[1]
    assert {"models", "devices", "rollouts", "events", "meta"} <= set(shapes[0])
    pg.close()


def test_registry_numbers_lists_and_deletes_versions(any_db: Database, tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    writer = blobs.writer()
    writer.write(b"weights")
    digest, _ = writer.commit()
    for team in ("a", "b"):
        registry.register_version(any_db, blobs, name="tiny", files=[("model.bin", digest)],
                                  created_by="test", tags={"team": team}, metrics={"acc": 0.5})
    [model] = registry.list_models(any_db)
    assert (model["name"], model["versions"], model["latest_version"]) == ("tiny", 2, 2)
    assert registry.get_version(any_db, "tiny", "latest")["tags"] == {"team": "b"}
    assert [v["version"] for v in registry.list_versions(any_db, "tiny", tags=[("team", "a")])
            ] == [1]
    registry.delete_version(any_db, blobs, "tiny", 1)
    assert [v["version"] for v in registry.list_versions(any_db, "tiny")] == [2]


def test_devices_enroll_are_tagged_found_and_deleted(any_db: Database) -> None:
    _, secret = devices.create_enrollment_token(any_db, tags={"site": "lab"},
                                                expires_in=timedelta(hours=1), max_uses=1,
                                                created_by="test")
    device, _ = devices.enroll(any_db, secret=secret, public_key="key", name="one")
    with pytest.raises(Exception, match="already used"):
        devices.enroll(any_db, secret=secret, public_key="key", name="two")
    devices.update_tags(any_db, device["id"], set_tags={"room": "7"}, remove=[])
    assert [d["id"] for d in devices.list_devices(any_db, tags=[("room", "7")])] == [device["id"]]
    assert devices.list_devices(any_db, tags=[("room", "8")]) == []
    devices.delete_device(any_db, device["id"])
    assert devices.ids(any_db) == set()


def test_the_database_tells_its_size_and_it_grows_with_what_is_stored(any_db: Database
                                                                        ) -> None:
    before = any_db.sizes()
    assert set(before) == ({"db", "wal"} if any_db.dialect.name == "sqlite" else {"db"})
    assert before["db"] > 0
    with any_db.transaction() as conn:
        for n in range(2000):
            conn.execute("INSERT INTO events (at, type, subject, actor, detail)"
                         " VALUES (?, ?, ?, ?, ?)", ("2026-01-01T00:00:00Z", "test", f"s{n}",
                                                     "test", "x" * 200))
    after = any_db.sizes()
    assert sum(after.values()) > sum(before.values())


def test_tag_filters_take_every_key_the_grammar_allows_and_nothing_else(any_db: Database
                                                                          ) -> None:
    _, secret = devices.create_enrollment_token(
        any_db, tags={"site.eu/west-1": "lab \"a\"", "x": "1"},
        expires_in=timedelta(hours=1), max_uses=1, created_by="test")
    device, _ = devices.enroll(any_db, secret=secret, public_key="key", name="one")
    found = [d["id"] for d in devices.list_devices(
        any_db, tags=[("site.eu/west-1", 'lab "a"'), ("x", "1")])]
    assert found == [device["id"]]
    for tags in ([("x", "2")], [("site", 'lab "a"')], [("x\"') = '1' OR ('1", "1")]):
        assert devices.list_devices(any_db, tags=tags) == []


def test_statistics_are_renewed_once_a_table_grew_much(any_db: Database) -> None:
    if any_db.dialect.name != "postgresql":
        assert any_db.refresh_statistics() == []  # SQLite takes none
        return
    any_db.refresh_statistics()  # the new schema's, whatever the server counted so far
    with any_db.transaction() as conn:
        for n in range(2000):
            conn.execute("INSERT INTO events (at, type, subject, actor, detail)"
                         " VALUES (?, ?, ?, ?, ?)", ("2026-01-01T00:00:00Z", "t", f"s{n}", "t", ""))
    deadline = time.monotonic() + 15
    # The server counts the rows a moment after the commit.
    while "events" not in any_db.refresh_statistics():
        assert time.monotonic() < deadline, "events was never analyzed"
        time.sleep(0.2)
    counted = any_db.query_one("SELECT reltuples FROM pg_class WHERE relname = 'events'")
    assert counted is not None and counted["reltuples"] >= 2000
    assert "events" not in any_db.refresh_statistics()  # nothing changed since


def test_a_constraint_refuses_a_write_and_nothing_of_it_stays(any_db: Database) -> None:
    insert = ("INSERT INTO api_tokens (id, name, role, token_hash, created_at, created_by)"
              " VALUES (?, 'n', 'admin', 'same-hash', '2026', 'test')")
    with any_db.transaction() as conn:
        conn.execute(insert, ("tok-1",))
    with pytest.raises(errors.CONFLICT), any_db.transaction() as conn:
        conn.execute("INSERT INTO models (name, created_at, next_version) VALUES ('m', '', 1)")
        conn.execute(insert, ("tok-2",))  # the token_hash is unique
    assert any_db.query("SELECT name FROM models") == []
    assert [r["id"] for r in any_db.query("SELECT id FROM api_tokens")] == ["tok-1"]


def test_a_reported_state_merges_into_the_inventory(any_db: Database) -> None:
    """json_patch, as the ingest writes a device's report (PostgreSQL has its own)."""
    with any_db.transaction() as conn:
        conn.execute("INSERT INTO devices (id, name, tags, inventory) VALUES ('d', 'd',"
                     " '{\"site\":\"lab\"}', '{\"os\":\"linux\",\"gpu\":\"none\"}')")
        conn.execute("UPDATE devices SET inventory = json_patch(inventory, ?)",
                      ('{"gpu":null,"ram":{"mb":512}}',))
    row = any_db.query_one("SELECT json_extract(inventory, '$.ram.mb') AS mb,"
                           " json_extract(inventory, '$.gpu') AS gpu FROM devices")
    assert row is not None and (str(row["mb"]), row["gpu"]) == ("512", None)


def test_the_ingest_writes_status_reports_and_each_point_once(any_db: Database) -> None:
    with any_db.transaction() as conn:
        conn.execute("INSERT INTO devices (id, name, tags, inventory, status) VALUES"
                     " ('dev-1', 'one', '{\"site\":\"lab\"}', '{\"disk_mb\":9}', 'offline')")
    report = protocol.ReportedState(device_id="dev-1", applied_generation=0, deployments=(),
                                    platform="linux/arm64", accelerators=("onnxruntime:CPU",),
                                    agent_version="0.1", inventory={"cpu_count": 4})
    points = Message(protocol.telemetry_topic("dev-1"), protocol.build_telemetry(
        protocol.TelemetryBatch("dev-1", tuple(protocol.Point(seq, datetime.now(UTC), "system",
                                                              {"cpu": seq})
                                               for seq in (1, 2)))))
    write_batch(any_db, [Message(protocol.status_topic("dev-1"), protocol.ONLINE),
                         Message(protocol.reported_topic("dev-1"),
                                 protocol.build_reported(report)), points])
    write_batch(any_db, [replace(points, retain=False)])  # sent again: stored once
    device = devices.get_device(any_db, "dev-1")
    assert (device["status"], device["platform"]) == ("online", "linux/arm64")
    assert device["tags"] == {"site": "lab", "arch": "arm64", "accel.onnxruntime.CPU": "yes"}
    assert {r["seq"] for r in any_db.query("SELECT seq FROM telemetry")} == {1, 2}
    inventory = any_db.query_one("SELECT inventory FROM devices")
    assert inventory is not None and '"disk_mb"' in inventory["inventory"]
    Retention(any_db, RetentionPolicy(), pause=0, duty=1).run_once()  # its SQL on both
    assert [r["seq"] for r in any_db.query("SELECT seq FROM telemetry_rolled")] == [2]


def test_one_batch_writes_the_reports_of_many_devices(any_db: Database) -> None:
    """A batch's reports go in one statement each (hub/ingest.py): each replaces its own
    device's rows only, and each newly failed version is one event."""
    names = [f"dev-{n}" for n in range(4)]
    with any_db.transaction() as conn:
        conn.executemany("INSERT INTO devices (id, name, tags, status) VALUES (?, ?, '{}',"
                         " 'online')", [(d, d) for d in names])
    start = datetime.now(UTC)
    S = protocol.UpdateState

    def report(device: str, generation: int, *states: tuple[int, protocol.UpdateState]
               ) -> Message:
        return Message(protocol.reported_topic(device), protocol.build_reported(
            protocol.ReportedState(
                device_id=device, applied_generation=generation, platform="linux/arm64",
                accelerators=(), agent_version="0.1", deployments=tuple(
                    protocol.DeploymentStatus("tiny", "tiny", version, state, start,
                                              error="boom" if state == S.FAILED else None)
                    for version, state in states))))

    write_batch(any_db, [report(d, 1, (1, S.SERVING)) for d in names])
    write_batch(any_db, [report(names[0], 2, (1, S.SERVING), (2, S.FAILED)),
                         report(names[1], 2, (2, S.SERVING)),
                         report(names[2], 2, (1, S.SERVING), (2, S.FAILED))])
    write_batch(any_db, [report(names[0], 2, (1, S.SERVING), (2, S.FAILED)),  # old news
                         report(names[2], 2, (2, S.FAILED))])
    stored = {(r["device_id"], r["version"], r["state"]) for r in any_db.query(
        "SELECT device_id, version, state FROM deployment_status")}
    assert stored == {(names[0], 1, "serving"), (names[0], 2, "failed"),
                      (names[1], 2, "serving"), (names[2], 2, "failed"),
                      (names[3], 1, "serving")}
    assert [d["applied_generation"] for d in map(
        lambda n: devices.get_device(any_db, n), names)] == [2, 2, 2, 1]
    assert sorted(e.subject for e in events.newest(any_db)
                  if e.type == "deployment.failed") == [f"{names[0]}/tiny", f"{names[2]}/tiny"]


def test_of_a_device_s_reports_in_one_batch_only_the_newest_is_read(any_db: Database) -> None:
    """A device sends a report per update state; a batch holding several of one device
    parses and writes the newest only (the newest that parses), and counts the others."""
    with any_db.transaction() as conn:
        conn.execute("INSERT INTO devices (id, name, tags, status) VALUES"
                     " ('dev-1', 'one', '{}', 'offline')")
    S = protocol.UpdateState

    def report(device: str, state: protocol.UpdateState) -> Message:
        return Message(protocol.reported_topic(device), protocol.build_reported(
            protocol.ReportedState(
                device_id=device, applied_generation=1, platform="linux/arm64",
                accelerators=(), agent_version="0.1", deployments=(protocol.DeploymentStatus(
                    "tiny", "tiny", 2, state, datetime.now(UTC)),))))

    broken = Message(protocol.reported_topic("dev-1"), b"{not json")
    counters = write_batch(any_db, [report("dev-1", S.DOWNLOADING), broken,
                                    report("dev-9", S.STAGED), report("dev-9", S.SERVING),
                                    report("dev-1", S.SERVING)])
    assert counters.ingested == {"reported": 3}  # dev-1's newest and the two it supersedes
    assert counters.dropped == {("reported", "unknown_device"): 2}
    assert [(r["device_id"], r["state"]) for r in any_db.query(
        "SELECT device_id, state FROM deployment_status")] == [("dev-1", "serving")]
    assert devices.get_device(any_db, "dev-1")["status"] == "online"
    # A broken newest one is dropped, and the one before it is read and written instead.
    counters = write_batch(any_db, [report("dev-1", S.STAGED), report("dev-1", S.FAILED),
                                    broken])
    assert (counters.ingested, counters.dropped) == ({"reported": 2},
                                                     {("reported", "malformed"): 1})
    assert [r["state"] for r in any_db.query("SELECT state FROM deployment_status")] == [
        "failed"]


def test_a_hub_process_on_postgresql(tmp_path: Path, postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    hub = start_hub(tmp_path / "data", extra_args=("--database-url", url))
    try:
        with httpx.Client(base_url=hub.url, verify=hub.verify, timeout=30,
                          headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
            digest = api.post("/api/v1/blobs", content=b"weights").json()["digest"]
            answer = api.post("/api/v1/models/tiny/versions",
                              json={"files": [{"path": "model.bin", "digest": digest}]})
            assert answer.status_code == 201, answer.text
            assert api.get("/api/v1/models").json()[0]["latest_version"] == 1
            token = api.post("/api/v1/enrollment-tokens", json={"tags": {"site": "lab"}})
            assert token.status_code == 201, token.text
            assert len(api.get("/api/v1/audit").json()) >= 2
    finally:
        assert hub.stop() == 0, hub.log()
    assert not (tmp_path / "data" / "hub.db").exists()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT model, version FROM model_versions").fetchall() == [
            ("tiny", 1)]


def test_one_hub_leads_the_rollout_engine_until_its_session_ends(tmp_path: Path,
                                                                   postgres_url: str) -> None:
    assert Leader(Database(tmp_path / "hub.db")).held()  # SQLite: the only hub
    first = Leader(Database(postgres_url), recheck=0)  # asks the database every time
    second = Leader(Database(postgres_url), recheck=0)
    assert first.held() and not second.held()
    assert first.held()  # still
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # as if its hub died
        admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_locks"
                      " WHERE locktype = 'advisory' AND granted")
    assert second.held()
    assert not first.held() and not first.held()  # lost it, and cannot take it back
    second.release()
    assert first.held()


def test_a_leader_asks_the_database_once_per_recheck(postgres_url: str) -> None:
    leader = Leader(Database(postgres_url), recheck=3600)
    assert leader.held()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_locks"
                      " WHERE locktype = 'advisory' AND granted")
    assert leader.held()  # the answer kept: no round trip saw the session end
    leader.release()  # forgets the answer with the lock
    assert leader.held()  # a fresh ask: the lock is free again, so it takes it
    leader.release()


def test_a_hub_killed_outright_hands_the_rollout_engine_to_the_other(
        tmp_path: Path, postgres_url: str) -> None:
    leading = start_hub(tmp_path / "a", extra_args=("--database-url", postgres_url))
    other = start_hub(tmp_path / "b", extra_args=("--database-url", postgres_url))
    try:
        deadline = time.monotonic() + 10
        while "this hub now leads" not in leading.log():
            assert time.monotonic() < deadline, leading.log()
            time.sleep(0.1)
        leading.stop(signal.SIGKILL)
        killed = time.monotonic()
        while "this hub now leads" not in other.log():
            assert time.monotonic() < killed + 10, other.log()
            time.sleep(0.1)
    finally:
        assert other.stop() == 0, other.log()


def test_a_starting_hub_keeps_another_replicas_upload_and_drops_crash_leftovers(
        tmp_path: Path) -> None:
    first = FileBlobStore(tmp_path / "blobs")
    upload = first.writer()  # under way in one replica
    upload.write(b"half of it")
    leftover = tmp_path / "blobs" / "tmp" / "cut-off"
    leftover.write_bytes(b"a crash's")
    day_ago = time.time() - STALE_UPLOAD - 60
    os.utime(leftover, (day_ago, day_ago))
    FileBlobStore(tmp_path / "blobs")  # another replica starts on the same directory
    assert not leftover.exists()
    upload.write(b", then the rest")
    digest, _ = upload.commit()
    with first.open(digest) as stored:
        assert stored.read() == b"half of it, then the rest"


def test_a_replica_skips_a_report_older_than_the_one_stored(any_db: Database) -> None:
    with any_db.transaction() as conn:
        conn.execute("INSERT INTO devices (id, name, tags, status) VALUES"
                     " ('dev-1', 'one', '{}', 'online')")
    start = datetime.now(UTC)

    def report(generation: int, *states: tuple[int, protocol.UpdateState, int]) -> Message:
        return Message(protocol.reported_topic("dev-1"), protocol.build_reported(
            protocol.ReportedState(
                device_id="dev-1", applied_generation=generation, platform="linux/arm64",
                accelerators=(), agent_version="0.1", deployments=tuple(
                    protocol.DeploymentStatus("tiny", "tiny", version, state,
                                              start + timedelta(seconds=at))
                    for version, state, at in states))))

    def stored() -> list[tuple[int, str]]:
        return sorted((r["version"], r["state"]) for r in any_db.query(
            "SELECT version, state FROM deployment_status"))

    S = protocol.UpdateState
    old = report(2, (1, S.SERVING, 0), (2, S.SELF_TEST, 5))
    new = report(2, (1, S.SERVING, 0), (2, S.SERVING, 6))
    assert write_batch(any_db, [new], shared=True).dropped == {}
    counters = write_batch(any_db, [old], shared=True)  # the other replica's, late
    assert counters.dropped == {("reported", "stale"): 1}
    assert stored() == [(1, "serving"), (2, "serving")]
    write_batch(any_db, [report(3, (2, S.SERVING, 6))], shared=True)  # v1 removed: newer
    assert stored() == [(2, "serving")]


def test_hubs_opening_one_postgresql_database_at_once_all_open(postgres_url: str) -> None:
    with ThreadPoolExecutor(6) as pool:  # replicas started together
        opened = list(pool.map(lambda _: Database(postgres_url), range(6)))
    for db in opened:
        db.close()


def test_sketch_counts_beyond_64_bits_are_added_exactly(any_db: Database) -> None:
    """drift_sketches rows are read and written by orjson, except a count orjson would
    read as a float (20 digits or more) or cannot write: json's then, exact as before."""
    key = ("tiny", 1, "2025-06-01T12:00:00.000000Z", "dev-1")
    for counts in ([2**63, 1], [2**63, 1], [2**64, 5]):
        with any_db.transaction() as conn:
            drift_sketches.add_sketches(conn, {key: {"x[0]": counts}})
    stored = any_db.query("SELECT counts FROM drift_sketches")[0]["counts"]
    assert json.loads(stored) == {"x[0]": [2**65, 7]}
    assert stored == json.dumps({"x[0]": [2**65, 7]}, separators=(",", ":"))
