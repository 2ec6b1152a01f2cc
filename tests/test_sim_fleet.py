"""The fleet simulator against a real hub (`edgefleet hub serve`) and a real Mosquitto.

Devices enroll over REST, keep their own MQTT sessions, take desired states
the hub publishes for its deploy endpoint, and report back; a watcher client
on the same broker sees what they send on the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
import pytest

from agent.mqtt import Message
from agent.sim import Fleet, PerVersion, SimOptions
from agent.sim.mqtt_lite import Client, ConnectOptions, parse_url
from agent.sim.processes import split
from conftest import Cli
from contract import protocol, signing
from hubproc import HubProcess, start_hub
from modelgen import make_onnx
from mosquitto import Mosquitto, mosquitto, start_mosquitto  # noqa: F401  (fixture)

S = protocol.UpdateState
FAST = {"telemetry_interval": 0.2, "step_latency": 0.1, "connect_jitter": 0.2, "keepalive": 10}


@dataclass
class Site:
    hub: HubProcess
    broker: Mosquitto
    token: str            # enrollment token, tags {"site": "sim"}
    packages: dict[int, str]  # version of model "tiny" -> package digest

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.hub.url, timeout=30, headers={
            "Authorization": f"Bearer {self.hub.admin_token}"})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("sim")
    broker = start_mosquitto(base / "mosquitto")
    hub = start_hub(base / "data", extra_args=("--mqtt-url", broker.url))
    cli = Cli(hub, base)
    model = make_onnx(base / "model.onnx")
    packages = {}
    with httpx.Client(base_url=hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
        for version in (1, 2):
            digest = api.post("/api/v1/blobs", content=model.read_bytes()).json()["digest"]
            api.post("/api/v1/models/tiny/versions", json={
                "files": [{"path": "model.onnx", "digest": digest}]}).raise_for_status()
            built = cli.json("package", "build", f"tiny:{version}", "--no-deps",
                             "--platform", "linux/arm64")
            assert isinstance(built, dict)
            packages[version] = built["digest"]
        token = api.post("/api/v1/enrollment-tokens", json={"tags": {"site": "sim"}})
        token.raise_for_status()
    yield Site(hub, broker, token.json()["token"], packages)
    assert hub.stop() == 0, hub.log()
    broker.stop()


def run(body: Callable[[], Coroutine[Any, Any, None]], timeout: float = 40) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15) -> Any:
    """CHECK's first true answer, asked every 50 ms."""
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


class Watcher:
    """A client on the devices' broker that keeps what it sees, by topic."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.seen: dict[str, list[Message]] = defaultdict(list)
        self.client = Client(*parse_url(broker.url), ConnectOptions(f"watcher-{name}"),
                             on_message=lambda m: self.seen[m.topic].append(m))

    async def __aenter__(self) -> Self:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.disconnect()


async def hub_devices(api: httpx.AsyncClient, fleet: Fleet) -> dict[str, dict[str, Any]]:
    ids = {d.id for d in fleet.devices}
    listed = (await api.get("/api/v1/devices", params={"limit": 100_000})).json()
    return {d["id"]: d for d in listed if d["id"] in ids}


def options(tmp_path: Path, **extra: Any) -> SimOptions:
    return SimOptions(data_dir=tmp_path / "sim", **{**FAST, **extra})


def test_a_fleet_enrolls_shows_online_sends_telemetry_and_comes_back_as_itself(
        site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        telemetry = [f for f in protocol.HUB_SUBSCRIPTIONS if f.endswith("/telemetry")]
        async with site.api() as api, Watcher(site.broker, "t") as watcher:
            await watcher.client.subscribe([(telemetry[0], 1)])
            async with Fleet(site.hub.url, site.token, 20, options(tmp_path)) as fleet:
                await fleet.wait(lambda f: f.connected == 20, timeout=15, what="connected")
                ids = [d.id for d in fleet.devices]
                assert len(set(ids)) == 20 and fleet.all_connected_after is not None
                shown = await until(lambda: _all(hub_devices(api, fleet), 20, status="online"),
                                    "20 devices online in the hub")
                record = next(iter(shown.values()))
                assert record["tags"]["site"] == "sim"  # from the enrollment token
                assert record["platform"] == "linux/arm64" and record["name"].startswith("sim-")
                await asyncio.sleep(1)  # a few telemetry rounds
            # A clean stop says "offline" itself (a DISCONNECT does not fire the will).
            await until(lambda: _all(hub_devices(api, fleet), 20, status="offline"),
                        "20 devices offline after the stop")
            sent_first = {d.id: d.next_seq for d in fleet.devices}

            # The same data dir: the same devices, no token needed, sequence numbers go
            # on, also for devices that sat out a smaller run in between.
            for count in (10, 20):
                again = Fleet(None, None, count, options(tmp_path))
                async with again:
                    assert [d.id for d in again.devices] == ids[:count]
                    await again.wait(lambda f, n=count: f.connected == n, timeout=15,
                                     what="reconnected")
                    await asyncio.sleep(0.5)
            assert all(d.next_seq > sent_first[d.id] for d in again.devices)
        # On the wire: every point once, in order, none missing, across the restart.
        for device in again.devices:
            batches = [protocol.parse_telemetry(m.payload, device_id=device.id)
                       for m in watcher.seen[protocol.telemetry_topic(device.id)]]
            seqs = [p.seq for batch in batches for p in batch.points]
            assert seqs == list(range(1, device.next_seq)), device.name
        kinds = {p.kind for batch in batches for p in batch.points}
        assert kinds == {"system"}  # nothing serves yet: no inference points
        async with site.api() as api:
            stored = (await api.get(f"/api/v1/devices/{device.id}/telemetry",
                                    params={"limit": 100_000})).json()
            assert sorted(p["seq"] for p in stored) == seqs
            assert len(await hub_devices(api, again)) == 20  # nobody enrolled twice
    run(body)


async def _all(listing: Coroutine[Any, Any, dict[str, dict[str, Any]]], count: int,
               **expected: Any) -> dict[str, dict[str, Any]] | None:
    found = await listing
    ok = len(found) == count and all(
        all(d[k] == v for k, v in expected.items()) for d in found.values())
    return found if ok else None


def test_deployments_are_applied_and_a_broken_version_rolls_back(
        site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        opts = options(tmp_path, fail_versions=frozenset({("tiny", 2)}), requests_per_second=100,
                       error_rate=PerVersion(0.0, {("tiny", 1): 0.5}))
        async with site.api() as api, Fleet(site.hub.url, site.token, 20, opts) as fleet, \
                Watcher(site.broker, "r") as watcher:
            await fleet.wait(lambda f: f.connected == 20, timeout=15, what="connected")
            first = fleet.devices[0]
            await watcher.client.subscribe([(protocol.reported_topic(first.id), 1)])
            for device in fleet.devices:
                answer = await api.post(f"/api/v1/devices/{device.id}/deployments",
                                        json={"model": "tiny", "version": 1})
                assert answer.status_code == 201, answer.text
            await fleet.wait(lambda f: all(d.versions() == {"tiny": 1} for d in f.devices)
                             and not any(d.updating for d in f.devices),
                             timeout=15, what="tiny:1 everywhere")
            assert fleet.status()["serving"] == {"tiny:1": 20}

            async def inference() -> list[dict[str, Any]]:
                return [p["values"] for p in (await api.get(
                    f"/api/v1/devices/{first.id}/telemetry", params={"kind": "inference"})).json()]
            points = await until(inference, "inference telemetry")
            assert {(p["deployment"], p["version"]) for p in points} == {("tiny", 1)}
            # --error-rate tiny:1=0.5: about half the simulated requests fail
            assert 0.2 < sum(p["errors"] for p in points) / sum(p["count"] for p in points) < 0.8

            async def reported(device_id: str) -> list[tuple[int, str]]:
                shown = (await api.get(f"/api/v1/devices/{device_id}/deployments")).json()
                return sorted((r["version"], r["state"]) for r in shown["reported"])
            for device in fleet.devices:
                await until(lambda d=device: _equal(reported(d.id), [(1, "serving")]),
                            f"the hub sees {device.name} serving tiny:1")

            # The broken version: failed, rolled back, and version 1 serves on.
            broken = fleet.devices[:2]
            for device in broken:
                await api.post(f"/api/v1/devices/{device.id}/deployments",
                               json={"model": "tiny", "version": 2})
            await fleet.wait(lambda f: all(d.state_of("tiny", 2) is S.ROLLED_BACK
                                           for d in broken), timeout=15, what="rolled back")
            assert all(d.versions() == {"tiny": 1} for d in broken)
            assert fleet.status()["failed"] == 2
            for device in broken:
                shown = await until(lambda d=device: _equal(reported(d.id),
                                                   [(1, "serving"), (2, "rolled_back")]),
                                    "the hub sees the rollback")
                assert shown
                record = (await api.get(f"/api/v1/devices/{device.id}")).json()
                assert record["applied_generation"] == 2
                failure = [d for d in record["reported"]["deployments"] if d["version"] == 2]
                assert "self-test failed" in failure[0]["error"]
            # Every state on the way, in order, as the real agent reports them.
        path = [[(d.version, d.state) for d in protocol.parse_reported(
                    m.payload, device_id=first.id).deployments]
                for m in watcher.seen[protocol.reported_topic(first.id)]]
        states_of = [dict(p) for p in path]
        v1 = [s[1] for s in states_of if 1 in s]
        v2 = [s[2] for s in states_of if 2 in s]
        assert _squeeze(v1)[:6] == [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.STARTING,
                                    S.SELF_TEST, S.SERVING]
        assert _squeeze(v2) == [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.STARTING, S.SELF_TEST,
                                S.FAILED, S.ROLLING_BACK, S.ROLLED_BACK]
        assert all(s.get(1) is S.SERVING for s in states_of if 2 in s)  # the old one served on
    run(body)


async def _equal(value: Coroutine[Any, Any, Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _now(value: Any) -> Any:
    return value


def _squeeze(states: list[S]) -> list[S]:
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def test_forged_and_replayed_desired_states_are_refused_and_reported(
        site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        async with site.api() as api, Fleet(site.hub.url, site.token, 1,
                                             options(tmp_path)) as fleet, \
                Watcher(site.broker, "d") as watcher:
            device = fleet.devices[0]
            topic = protocol.desired_topic(device.id)
            deploy = f"/api/v1/devices/{device.id}/deployments"
            await api.post(deploy, json={"model": "tiny", "version": 1})
            await fleet.wait(lambda f: device.applied_generation == 1, timeout=15,
                             what="generation 1")
            await watcher.client.subscribe([(topic, 1)])
            old = (await until(lambda: _now(watcher.seen[topic]), "the retained desired"))[0]
            await api.post(deploy, json={"model": "tiny", "version": 1,
                                         "prefer": ["onnxruntime:CPU"]})
            await fleet.wait(lambda f: device.applied_generation == 2, timeout=15,
                             what="generation 2")

            await watcher.client.publish(Message(topic, old.payload))  # a replay
            forged = protocol.sign_desired(protocol.DesiredState(
                device.id, 9, datetime.now(UTC), datetime.now(UTC) + timedelta(hours=1), ()),
                signing.generate_private_key())
            await watcher.client.publish(Message(topic, forged))
            await fleet.wait(lambda f: len(device.refusals) == 2, timeout=15, what="refusals")
            assert [(r.generation, r.reason) for r in device.refusals] == [
                (1, protocol.Reason.REPLAY), (9, protocol.Reason.BAD_SIGNATURE)]
            assert device.applied_generation == 2 and device.versions() == {"tiny": 1}

            async def refusals() -> list[tuple[int, str]]:
                record = (await api.get(f"/api/v1/devices/{device.id}")).json()
                return [(r["generation"], r["reason"]) for r in record["reported"]["refusals"]]
            await until(lambda: _equal(refusals(), [(1, "replay"), (9, "bad_signature")]),
                        "the refusals in the hub")
    run(body)


def test_a_simulated_device_answers_a_profile_through_the_agents_command_handling(
        site: Site, tmp_path: Path) -> None:
    """The real result path: taken (running), then failed with why; the CLI says it in one
    line. A replay of it and a forgery are refused by the agent's checks and reported."""
    cli = Cli(site.hub, tmp_path)

    async def body() -> None:
        async with site.api() as api, Fleet(site.hub.url, site.token, 1,
                                             options(tmp_path)) as fleet, \
                Watcher(site.broker, "c") as watcher:
            device = fleet.devices[0]
            topic = protocol.commands_topic(device.id)
            await watcher.client.subscribe([(topic, 1)])
            await fleet.wait(lambda f: device.connected, timeout=15, what="the device online")
            done = await asyncio.to_thread(
                cli.run, "model", "profile", "tiny:1", "--device", device.id, "--timeout", "30",
                ok=False)
            assert done.returncode == 1
            assert done.stderr.strip().splitlines()[-1] == (
                f"Error: device {device.id} could not profile tiny:1: profiling is not "
                "supported on a simulated device (edgefleet sim): it has no runtime to measure "
                "tiny with")
            sent = (await until(lambda: _now(watcher.seen[topic]), "the command sent"))[0]
            command = json.loads(sent.payload)
            answered = (await api.get(f"/api/v1/devices/{device.id}/commands/"
                                      f"{command['id']}")).json()
            assert answered["state"] == "failed" and answered["rows"] == []

            await watcher.client.publish(Message(topic, sent.payload))  # a replay
            now = datetime.now(UTC)
            forged = protocol.sign_command(protocol.Command(
                "c-forged", device.id, now, now + timedelta(minutes=5),
                protocol.CommandKind.PROFILE, protocol.ProfileArgs("tiny", 1, "default", 1, 1)),
                signing.generate_private_key())
            await watcher.client.publish(Message(topic, forged))

            async def refusals() -> list[str]:
                record = (await api.get(f"/api/v1/devices/{device.id}")).json()
                return [r["reason"] for r in record["reported"]["refusals"]]
            await until(lambda: _equal(refusals(), ["replay", "bad_signature"]),
                        "the refusals in the hub")
            assert command["id"] in device.refusals[0].message
    run(body, timeout=90)


def test_a_device_that_drops_off_shows_offline_then_online(site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        async with site.api() as api, Fleet(site.hub.url, site.token, 3,
                                             options(tmp_path)) as fleet:
            await fleet.wait(lambda f: f.connected == 3, timeout=15, what="connected")
            device = fleet.devices[1]
            path = f"/api/v1/devices/{device.id}"
            await until(lambda: _status(api, path, "online"), "online")
            device.go_offline(2)
            assert not device.connected
            await until(lambda: _status(api, path, "offline"), "the will", timeout=2)
            await until(lambda: _status(api, path, "online"), "back online", timeout=10)
            assert device.connects == 2 and device.drops == 1
            assert all(d.connects == 1 for d in fleet.devices if d is not device)
    run(body)


async def _status(api: httpx.AsyncClient, path: str, status: str) -> bool:
    return bool((await api.get(path)).json()["status"] == status)


def test_the_command_line_tags_via_its_own_token_and_stops_cleanly_on_sigterm(
        site: Site, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "agent.sim", "--devices", "3", "--hub", site.hub.url,
               "--data-dir", str(tmp_path / "cli"), "--name-prefix", "cli-",
               "--telemetry-interval", "0.2", "--json-status-every", "0.2"]
    refused = subprocess.run([*command, "--token", site.token, "--tag", "team=x"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 2 and "devices cannot choose their tags" in refused.stderr
    env = {**os.environ, "EDGEFLEET_TOKEN": site.hub.admin_token}
    process = subprocess.Popen([*command, "--tag", "team=cli"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            status = json.loads(line)
            if status["connected"] == 3:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        process.kill()
        _, err = process.communicate()
    assert "connected" in err and "3/3" in err
    with httpx.Client(base_url=site.hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {site.hub.admin_token}"}) as api:
        mine = [d for d in api.get("/api/v1/devices", params={"tag": "team=cli"}).json()]
        assert sorted(d["name"] for d in mine) == ["cli-00000", "cli-00001", "cli-00002"]
        deadline = time.monotonic() + 10
        while any(api.get(f"/api/v1/devices/{d['id']}").json()["status"] != "offline"
                  for d in mine):
            assert time.monotonic() < deadline, "the devices did not say offline"
            time.sleep(0.1)


def test_the_fleet_comes_back_after_the_broker_restarts(
        site: Site, mosquitto: Mosquitto, tmp_path: Path) -> None:
    async def body() -> None:
        # Enrolled with the hub, connected to a broker of their own (--mqtt-url).
        opts = options(tmp_path, mqtt_urls=(mosquitto.url,))
        async with Fleet(site.hub.url, site.token, 10, opts) as fleet:
            await fleet.wait(lambda f: f.connected == 10, timeout=15, what="connected")
            await asyncio.to_thread(mosquitto.restart)
            await fleet.wait(lambda f: all(d.connects == 2 for d in f.devices)
                             and f.connected == 10, timeout=15, what="reconnected")
            async with Watcher(mosquitto, "s") as watcher:
                await watcher.client.subscribe([(protocol.status_topic(d.id), 1)
                                                for d in fleet.devices])
                await until(lambda: _now(len(watcher.seen) == 10), "retained births")
            assert {m[-1].payload for m in watcher.seen.values()} == {protocol.ONLINE}
    run(body)


def test_a_fleet_spread_over_leaf_brokers_bridged_to_the_hubs_takes_a_deployment(
        site: Site, tmp_path: Path) -> None:
    """bench/rollout.py --brokers: one broker here holds under 20,000 connections (the
    machine's open-file limit), so larger fleets connect to leaves bridged to the hub's."""
    leaves = [start_mosquitto(tmp_path / f"leaf-{i}", bridge_to=site.broker.port)
              for i in range(2)]

    async def body() -> None:
        opts = options(tmp_path, mqtt_urls=tuple(leaf.url for leaf in leaves))
        async with site.api() as api, Fleet(site.hub.url, site.token, 6, opts) as fleet, \
                Watcher(leaves[0], "l0") as first, Watcher(leaves[1], "l1") as second:
            await fleet.wait(lambda f: f.connected == 6, timeout=15, what="connected")
            for watcher in (first, second):  # the births stay on each device's own leaf
                await watcher.client.subscribe([(protocol.status_topic(d.id), 1)
                                                for d in fleet.devices])
            await until(lambda: _now(len(first.seen) == len(second.seen) == 3), "births")
            assert set(first.seen) == {protocol.status_topic(d.id) for d in fleet.devices[::2]}
            for device in fleet.devices:
                answer = await api.post(f"/api/v1/devices/{device.id}/deployments",
                                        json={"model": "tiny", "version": 1})
                assert answer.status_code == 201, answer.text
            await fleet.wait(lambda f: all(d.versions() == {"tiny": 1} for d in f.devices),
                             timeout=15, what="tiny:1 on every leaf's devices")

            async def online_and_serving() -> bool:  # what devices sent went up the bridges
                found = await hub_devices(api, fleet)
                reported = [(await api.get(f"/api/v1/devices/{d}/deployments")).json()
                            ["reported"] for d in found]
                return len(found) == 6 and all(d["status"] == "online" for d in found.values()) \
                    and all([(r["version"], r["state"]) for r in rows] == [(1, "serving")]
                            for rows in reported)
            await until(online_and_serving, "the hub seeing every device online and serving")
    try:
        run(body)
    finally:
        for leaf in leaves:
            leaf.stop()


def test_a_simulated_fleet_follows_a_key_rotation(site: Site, tmp_path: Path) -> None:
    """Last in the module: the site's hub has another key afterwards."""
    async def body() -> None:
        async with site.api() as api, Fleet(site.hub.url, site.token, 20,
                                            options(tmp_path)) as fleet:
            await fleet.wait(lambda f: f.connected == 20, timeout=15, what="connected")
            for device in fleet.devices:
                await api.post(f"/api/v1/devices/{device.id}/deployments",
                               json={"model": "tiny", "version": 1})
            await fleet.wait(lambda f: all(d.versions() == {"tiny": 1} for d in f.devices),
                             timeout=15, what="tiny:1 everywhere")
            rotated = (await api.post("/api/v1/keys/rotate", json={})).json()

            async def trusting() -> bool:
                found = await hub_devices(api, fleet)
                return len(found) == 20 and all(
                    d["inventory"].get("hub_key") == rotated["current"] for d in found.values())
            await until(trusting, "every simulated device reporting the new key", timeout=30)
            for device in fleet.devices:
                await api.post(f"/api/v1/devices/{device.id}/deployments",
                               json={"model": "tiny", "version": 2})
            await fleet.wait(lambda f: all(d.versions() == {"tiny": 2} for d in f.devices),
                             timeout=20, what="tiny:2, signed by the new key, everywhere")
            assert not any(d.refusals for d in fleet.devices)
    run(body, timeout=90)


def test_the_device_range_splits_into_disjoint_parts() -> None:
    assert split(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert split(3, 3) == [(0, 1), (1, 1), (2, 1)]
    for count, processes in ((0, 1), (3, 4), (5, 0)):
        with pytest.raises(ValueError, match="processes for"):
            split(count, processes)


def test_the_command_line_refuses_a_bad_number_of_processes(tmp_path: Path) -> None:
    for processes, devices, expected in (("0", "3", "0 is not in the range x>=1"),
                                         ("4", "3", "4 processes for 3 devices")):
        refused = subprocess.run(
            [sys.executable, "-m", "agent.sim", "--devices", devices, "--processes", processes,
             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=30,
            check=False)
        assert refused.returncode == 2 and expected in refused.stderr, refused.stderr


def _sim_children(process: subprocess.Popen[str]) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.pid).children()
            if "multiprocessing" in " ".join(p.cmdline()) and "spawn_main" in " ".join(p.cmdline())]


def test_a_fleet_in_three_processes_counts_as_one_and_stops_with_its_parent(
        site: Site, tmp_path: Path) -> None:
    data = tmp_path / "parts"
    command = [sys.executable, "-m", "agent.sim", "--devices", "7", "--processes", "3",
               "--hub", site.hub.url, "--token", site.token, "--data-dir", str(data),
               "--name-prefix", "part-", "--telemetry-interval", "0.2",
               "--json-status-every", "0.2"]

    def until_connected(process: subprocess.Popen[str]) -> dict[str, Any]:
        assert process.stdout is not None
        for line in process.stdout:
            status = json.loads(line)
            if status["connected"] == 7 and status["sent"] > 7:
                return status
        raise AssertionError(f"the sim ended: {process.wait(5)}")

    # SIGTERM: every child takes its devices offline, saves its part, and exits.
    process = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        status = until_connected(process)
        assert status["devices"] == 7 and status["enrolled"] == 7
        assert status["all_connected_after"] is not None
        children = _sim_children(process)
        assert len(children) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE
                       for child in children)
    finally:
        process.kill()
        _, err = process.communicate()
    assert "stopped: 7 devices" in err, err
    saved = {path.name: set(json.loads(path.read_text())) for path in data.glob("sim-*.json")}
    assert saved == {"sim-state.0-2.json": {"part-00000", "part-00001", "part-00002"},
                     "sim-state.3-4.json": {"part-00003", "part-00004"},
                     "sim-state.5-6.json": {"part-00005", "part-00006"}}
    with httpx.Client(base_url=site.hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {site.hub.admin_token}"}) as api:
        mine = [d for d in api.get("/api/v1/devices").json() if d["name"].startswith("part-")]
        assert len(mine) == 7
        deadline = time.monotonic() + 10
        while any(api.get(f"/api/v1/devices/{d['id']}").json()["status"] != "offline"
                  for d in mine):
            assert time.monotonic() < deadline, "the devices did not say offline"
            time.sleep(0.1)

    # A one-process sim takes every part's sequence numbers over: none is reused.
    again = Fleet(None, None, 7, SimOptions(data_dir=data))
    assert again._load_state().keys() == {f"part-{i:05d}" for i in range(7)}

    # SIGKILL: nothing is left behind (the children die with the parent).
    process = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        until_connected(process)
        children = _sim_children(process)
        assert len(children) == 3
        process.kill()
        process.wait(5)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"orphans: {alive}"
    finally:
        process.kill()
        process.communicate()


def test_a_child_that_cannot_enroll_stops_the_sim_with_its_reason(
        site: Site, tmp_path: Path) -> None:
    failed = subprocess.run(
        [sys.executable, "-m", "agent.sim", "--devices", "4", "--processes", "2",
         "--hub", site.hub.url, "--token", "efe_not-a-token", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False)
    assert failed.returncode == 1, failed.stderr
    assert "Error:" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
