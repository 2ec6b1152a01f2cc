"""Events and webhooks against a real hub process, with real HTTP receivers.

The receivers are HTTP servers of this test process on the loopback: one that
answers at once, one that answers 500 until told otherwise, one that holds every
request until released (slower than the hub's webhook timeout), and a port where
nothing listens. Each receiver checks the signature as the docs tell a user to.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.cli.events import parse_stream
from hubproc import EDGEFLEET, HubProcess, free_port, start_hub

SECRET = "s3cret-s3cret-s3cret-32"
# Fast retries and a short timeout, so a test sees several attempts; 4 attempts a delivery.
HUB_ARGS = ("--webhook-retry-seconds", "0.3", "--webhook-attempts", "4",
            "--webhook-timeout-seconds", "2")


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def verified(secret: str, headers: Any, body: bytes) -> bool:
    """The receiver's check, as docs/architecture.md shows it."""
    stamp = headers["Edgefleet-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), stamp.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(stamp)) < 300
    return fresh and hmac.compare_digest(expected, headers["Edgefleet-Signature"])


@dataclass
class Receiver:
    """An HTTP server taking webhook POSTs. STATUS is what it answers; with HOLD set,
    each request waits until HOLD is released."""

    status: int = 200
    hold: threading.Event | None = None
    got: list[dict[str, Any]] = field(default_factory=list)  # signed events taken, in order
    forged: int = 0
    answered: list[int] = field(default_factory=list)
    port: int = 0
    server: ThreadingHTTPServer | None = None

    def start(self, port: int = 0) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hold is not None:
                    receiver.got.append({"held": True})
                    receiver.hold.wait(60)
                    return
                status = receiver.status
                if not verified(SECRET, self.headers, body):
                    receiver.forged += 1
                elif 200 <= status < 300:
                    event = json.loads(body)
                    assert str(event["id"]) == self.headers["Edgefleet-Event-Id"]
                    receiver.got.append(event)
                receiver.answered.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def ids(self) -> list[int]:
        return [e["id"] for e in self.got if "id" in e]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = start_hub(tmp_path_factory.mktemp("hub") / "data", extra_args=HUB_ARGS)
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.stop()


def subscribe(api: httpx.Client, url: str, *types: str, **filter: str) -> str:
    answer = api.post("/api/v1/webhooks", json={"url": url, "types": list(types),
                                                "filter": filter, "secret": SECRET})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def make_tokens(api: httpx.Client, prefix: str, n: int) -> list[int]:
    """N token.created events; their seqs."""
    for i in range(n):
        api.post("/api/v1/tokens", json={"name": f"{prefix}-{i}", "role": "viewer"}
                 ).raise_for_status()
    # An event is recorded a moment after the request it tells of has been answered.
    deadline = time.monotonic() + 10
    while True:
        page = api.get("/api/v1/events", params={"type": "token.created", "limit": 1000}).json()
        seqs = [e["id"] for e in page["events"] if e["subject"].startswith(prefix + "-")]
        if len(seqs) >= n or time.monotonic() > deadline:
            return seqs
        time.sleep(0.05)


def deliveries(api: httpx.Client, webhook: str, state: str | None = None) -> list[dict]:
    params = {"state": state} if state else {}
    return api.get(f"/api/v1/webhooks/{webhook}/deliveries", params=params).json()


def test_state_changes_are_events_with_one_schema(api: httpx.Client) -> None:
    seqs = make_tokens(api, "schema", 2)
    denied = api.post("/api/v1/tokens", json={"name": "x", "role": "nobody"})
    assert denied.status_code == 422  # audited as failed: no event
    page = api.get("/api/v1/events", params={"type": "token.*"}).json()
    mine = [e for e in page["events"] if e["id"] in seqs]
    assert [e["subject"] for e in mine] == ["schema-0", "schema-1"]
    assert set(mine[0]) == {"schema", "id", "type", "at", "actor", "subject", "detail"}
    assert mine[0]["schema"] == 1 and mine[0]["type"] == "token.created"
    assert mine[0]["actor"] == "admin" or mine[0]["actor"]
    assert not any(e["subject"] == "x" for e in page["events"])
    # Pages: forward from a seq, backward from one.
    after = api.get("/api/v1/events", params={"after": seqs[0]}).json()
    assert after["events"][0]["id"] == seqs[1]
    before = api.get("/api/v1/events", params={"before": seqs[1], "limit": 1}).json()
    assert [e["id"] for e in before["events"]] == [seqs[0]]
    assert api.get("/api/v1/events", params={"type": "nothing.*"}).status_code == 422


def test_malformed_subscriptions_are_refused_with_422(api: httpx.Client) -> None:
    good = {"url": "http://127.0.0.1:9/hook", "types": ["rollout.*"], "secret": SECRET}
    for change in ({"url": "ftp://x/hook"}, {"url": "not a url"}, {"url": "http://u:p@h/x"},
                   {"types": []}, {"types": ["nonsense.*"]}, {"filter": {"colour": "red"}},
                   {"secret": "short"}, {"extra": 1}, {"types": "rollout.*"}):
        answer = api.post("/api/v1/webhooks", json={**good, **change})
        assert answer.status_code == 422, (change, answer.text)
        assert set(answer.json()) == {"error", "detail"}
    assert not [w for w in api.get("/api/v1/webhooks").json() if w["url"] == good["url"]]
    viewer = api.post("/api/v1/tokens", json={"name": "v", "role": "viewer"}).json()["token"]
    as_viewer = api.post("/api/v1/webhooks", json=good,
                         headers={"Authorization": f"Bearer {viewer}"})
    assert as_viewer.status_code == 403


def test_slow_failing_and_down_endpoints_hold_up_nobody(
        hub: HubProcess, api: httpx.Client, receivers: list[Receiver]) -> None:
    ok = Receiver().start()
    flaky = Receiver(status=500).start()
    slow = Receiver(hold=threading.Event()).start()
    receivers += [ok, flaky, slow]
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    hooks = {name: subscribe(api, url, "token.*", subject="iso-*")
             for name, url in (("ok", ok.url), ("flaky", flaky.url), ("slow", slow.url),
                               ("down", down))}
    seqs = make_tokens(api, "iso", 5)
    make_tokens(api, "other", 1)  # filtered out by subject
    # While the slow endpoint holds its requests, the others are served and the API answers.
    wait_for(lambda: slow.got, "the slow endpoint to be holding a request")
    wait_for(lambda: sorted(ok.ids()) == seqs, "every event at the healthy endpoint")
    assert len(slow.ids()) == 0 and slow.got  # still held
    assert api.get("/api/v1/whoami", timeout=5).status_code == 200
    assert ok.forged == 0
    # The flaky one was retried: 500s, then 200 once it recovers.
    wait_for(lambda: flaky.answered.count(500) >= 5, "failed attempts at the flaky endpoint")
    flaky.status = 200
    wait_for(lambda: set(seqs) <= set(flaky.ids()), "the flaky endpoint to get every event")
    delivered = deliveries(api, hooks["flaky"], "delivered")
    assert any(d["attempts"] > 1 for d in delivered)
    # The down one: dead letters after every attempt, with the reason.
    dead = wait_for(lambda: len(d := deliveries(api, hooks["down"], "dead")) == 5 and d,
                    "dead letters for the endpoint that is down")
    assert {d["attempts"] for d in dead} == {4} and {d["last_status"] for d in dead} == {None}
    assert all("Connect" in d["last_error"] for d in dead)
    # The slow one: its attempts time out and count as failures.
    timed_out = wait_for(lambda: [d for d in deliveries(api, hooks["slow"])
                                  if "no answer within 2 s" in (d["last_error"] or "")],
                         "the slow endpoint's attempts to time out")
    assert timed_out[0]["state"] in ("pending", "dead")
    listed = {w["id"]: w for w in api.get("/api/v1/webhooks").json()}
    assert listed[hooks["ok"]]["delivered"] == 5 and listed[hooks["down"]]["dead"] == 5
    assert "secret" not in listed[hooks["ok"]]
    metrics = api.get("/metrics").text
    dead_now = re.search(r'edgefleet_webhook_deliveries\{state="dead"\} (\d+)', metrics)
    assert dead_now and int(dead_now[1]) >= 5
    assert 'edgefleet_webhook_attempts_total{outcome="failed"}' in metrics
    for webhook in hooks.values():
        api.delete(f"/api/v1/webhooks/{webhook}").raise_for_status()


def test_dead_letters_are_replayed_once_the_endpoint_is_up(
        hub: HubProcess, api: httpx.Client, receivers: list[Receiver], tmp_path: Path) -> None:
    port = free_port()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    env = {**_cli_env(hub, tmp_path)}

    def cli(*args: str) -> Any:
        done = subprocess.run([*EDGEFLEET, *args, "--json"], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    added = cli("webhook", "add", f"http://127.0.0.1:{port}/hook", "--type", "token.created",
                "--filter", "subject=replay-*", "--secret-file", str(secret_file))
    seqs = make_tokens(api, "replay", 3)
    wait_for(lambda: len(cli("webhook", "deliveries", added["id"], "--state", "dead")) == 3,
             "three dead letters")
    up = Receiver().start(port)
    receivers.append(up)
    assert cli("webhook", "replay", added["id"]) == {"queued": 3}
    wait_for(lambda: sorted(up.ids()) == seqs, "the replayed deliveries")
    assert up.forged == 0
    assert not cli("webhook", "deliveries", added["id"], "--state", "dead")
    one = cli("webhook", "deliveries", added["id"])[0]["id"]
    assert cli("webhook", "replay", added["id"], "--delivery", str(one)) == {"queued": 1}
    wait_for(lambda: len(up.ids()) == 4, "the one delivery sent again")
    assert [w["id"] for w in cli("webhook", "list")] .count(added["id"]) == 1
    cli("webhook", "remove", added["id"])
    bad = subprocess.run([*EDGEFLEET, "webhook", "add", "gopher://x", "--type", "token.*",
                          "--secret-file", str(secret_file)], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert bad.returncode == 1 and "HTTP 422" in bad.stderr and len(bad.stderr.splitlines()) == 1


def _sse(hub: HubProcess, headers: dict[str, str], params: dict[str, Any], count: int
         ) -> list[dict[str, Any]]:
    """COUNT events from a real streaming HTTP connection, then hang up."""
    found: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{hub.url}/api/v1/events", params=params, timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}",
                               "Accept": "text/event-stream", **headers}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in parse_stream(response.iter_lines()):
            found.append(event)
            if len(found) == count:
                break
    return found


def test_the_stream_resumes_after_last_event_id(hub: HubProcess, api: httpx.Client) -> None:
    first = make_tokens(api, "sse", 4)
    # From just before the first: its four, then hang up after two.
    head = _sse(hub, {"Last-Event-ID": str(first[0] - 1)}, {"type": "token.created"}, 2)
    assert [e["id"] for e in head] == first[:2]
    more = make_tokens(api, "sse2", 2)
    rest = _sse(hub, {"Last-Event-ID": str(head[-1]["id"])}, {"type": "token.*"}, 4)
    assert [e["id"] for e in rest] == first[2:] + more
    # A stream from now gets only what happens after it opened: the hub fixes where it
    # starts before it sends the headers, so once they are here the stream is open.
    with httpx.stream("GET", f"{hub.url}/api/v1/events", params={"type": "token.*"},
                      timeout=30, headers={"Authorization": f"Bearer {hub.admin_token}",
                                           "Accept": "text/event-stream"}) as response:
        newest = make_tokens(api, "sse3", 1)
        assert next(parse_stream(response.iter_lines()))["id"] == newest[0]
    # A revoked token's stream ends (within the hub's 5 s recheck), and cannot start again.
    viewer = api.post("/api/v1/tokens", json={"name": "sse-v", "role": "viewer"}).json()
    with httpx.stream("GET", f"{hub.url}/api/v1/events", params={"type": "model.*"},
                      timeout=30, headers={"Authorization": f"Bearer {viewer['token']}",
                                           "Accept": "text/event-stream"}) as response:
        api.delete(f"/api/v1/tokens/{viewer['id']}").raise_for_status()
        assert list(parse_stream(response.iter_lines())) == []  # ended, no error mid-way
    assert _sse_status(hub, viewer["token"]) == 401
    bad = httpx.get(f"{hub.url}/api/v1/events", headers={
        "Authorization": f"Bearer {hub.admin_token}", "Accept": "text/event-stream",
        "Last-Event-ID": "abc"}, timeout=10)
    assert bad.status_code == 422


def _sse_status(hub: HubProcess, token: str) -> int:
    with httpx.stream("GET", f"{hub.url}/api/v1/events", timeout=30, headers={
            "Authorization": f"Bearer {token}", "Accept": "text/event-stream"}) as response:
        return response.status_code


def _cli_env(hub: HubProcess, home: Path) -> dict[str, str]:
    return {**os.environ, "EDGEFLEET_HUB": hub.url, "EDGEFLEET_TOKEN": hub.admin_token,
            "EDGEFLEET_CONFIG": str(home / "config.json"), "COLUMNS": "200"}


def test_events_cli_lists_and_escapes(hub: HubProcess, api: httpx.Client, tmp_path: Path
                                      ) -> None:
    api.post("/api/v1/tokens", json={"name": "evil\x1b[2J\u202e", "role": "viewer"}
             ).raise_for_status()
    env = _cli_env(hub, tmp_path)
    listed = subprocess.run([*EDGEFLEET, "events", "--type", "token.created", "--limit", "1"],
                            capture_output=True, text=True, env=env, timeout=120, check=True)
    assert "evil\\x1b[2J\\u202e" in listed.stdout and "\x1b" not in listed.stdout
    as_json = json.loads(subprocess.run(
        [*EDGEFLEET, "events", "--type", "token.*", "--limit", "1", "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=True).stdout)
    assert as_json[0]["subject"] == "evil\x1b[2J\u202e"


def test_follow_reconnects_across_a_hub_restart_and_kill_9_mid_retry(
        tmp_path: Path, receivers: list[Receiver]) -> None:
    with contextlib.ExitStack() as stack:
        _follow_and_kill(tmp_path, receivers, stack)


def _follow_and_kill(tmp_path: Path, receivers: list[Receiver], stack: contextlib.ExitStack
                     ) -> None:
    """A second hub: `events --follow` through a restart; a delivery being retried when
    the hub is killed -9 goes on after it comes back, and nothing is lost or renumbered."""
    data = tmp_path / "data"
    hub = start_hub(data, extra_args=("--webhook-retry-seconds", "1", "--webhook-attempts", "50",
                                      "--webhook-timeout-seconds", "2"))
    stack.callback(lambda: hub.process.poll() is None and hub.stop(signal.SIGKILL))
    flaky = Receiver(status=500).start()
    receivers.append(flaky)
    with httpx.Client(base_url=hub.url, timeout=30,
                      headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
        webhook = subscribe(api, flaky.url, "token.created")
        start = api.get("/api/v1/events").json()["last"]
        errors = tmp_path / "follower.err"
        follower = subprocess.Popen(
            [*EDGEFLEET, "events", "--follow", "--type", "token.created", "--after", str(start)],
            stdout=subprocess.PIPE, stderr=stack.enter_context(open(errors, "w")), text=True,
            env=_cli_env(hub, tmp_path))
        stack.enter_context(follower)  # closes its pipe
        stack.callback(lambda: follower.poll() is None and follower.kill())
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")),
                         daemon=True).start()  # type: ignore[union-attr]
        before = make_tokens(api, "k9", 2)
        wait_for(lambda: len(lines) >= 2, "the follower to print two events")
        wait_for(lambda: flaky.answered.count(500) >= 4, "retries of the failing endpoint")
        tried = {d["event_seq"]: d["attempts"] for d in deliveries(api, webhook)}
    assert hub.stop(signal.SIGKILL) == -signal.SIGKILL
    flaky.status = 200
    hub = start_hub(data, port=hub.port, mqtt_port=hub.mqtt_port)
    try:
        with httpx.Client(base_url=hub.url, timeout=30,
                          headers={"Authorization": f"Bearer {hub.admin_token}"}) as api:
            wait_for(lambda: set(before) <= set(flaky.ids()), "deliveries after the restart")
            after = {d["event_seq"]: d for d in deliveries(api, webhook)}
            assert {s: after[s]["state"] for s in before} == dict.fromkeys(before, "delivered")
            assert all(after[s]["attempts"] > tried[s] for s in before)  # counted on
            listed = api.get("/api/v1/events", params={"type": "token.created"}).json()
            assert [e["id"] for e in listed["events"]][-2:] == before
            later = make_tokens(api, "k9b", 1)
            assert later[0] > before[-1]
            wait_for(lambda: len(lines) >= 3, "the follower to resume after the restart")
        printed = [int(line.split("\t")[0]) for line in lines]
        assert printed[-3:] == [*before, *later] and len(set(printed)) == len(printed)
        assert lines[-1].split("\t")[2] == "token.created"  # plain tab-separated lines
    finally:
        stopped = hub.stop()  # with the follower's stream open: it ends as the hub stops
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    assert stopped == 0, hub.log()
    assert "reconnecting in" in errors.read_text()
