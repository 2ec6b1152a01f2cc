"""A webhook receiver that runs the retraining pipeline when the hub says so.

Run: python -m examples.mlops.trigger --secret-file S [--port 8787] [--type drift.detected]
         [-- PIPELINE ARGS...]
and subscribe it: edgefleet webhook add http://THIS-HOST:8787/hook --type drift.detected
         --secret-file S

Every request must carry a valid Edgefleet-Signature (HMAC-SHA256 with the shared
secret of "TIMESTAMP.BODY") and an Edgefleet-Timestamp at most --tolerance seconds
old: anything else is answered 401 and never runs anything. An event whose type
matches --type (a glob) starts `python -m examples.mlops.pipeline PIPELINE ARGS`
in the background, the answer (202) going back at once; events come at least
once, so an event id seen before is only acknowledged. While a run is under way
further triggers are folded into one run after it.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY = 64 * 1024  # an event is well under 2 KiB
SEEN = 10_000  # event ids remembered for deduplication


def verify(secret: bytes, stamp: str | None, signature: str | None, body: bytes, *,
           tolerance: float, now: float) -> str | None:
    """Why a request with headers Edgefleet-Timestamp STAMP and Edgefleet-Signature SIGNATURE
    is not from the hub, or None when it is (docs/architecture.md)."""
    if not stamp or not signature:
        return "no Edgefleet-Timestamp or Edgefleet-Signature header"
    if not stamp.isdigit():
        return "the timestamp is not a number"
    mac = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest("sha256=" + mac, signature):
        return "the signature does not match"
    if abs(now - int(stamp)) > tolerance:  # checked after the MAC: the stamp is signed
        return f"the timestamp is more than {tolerance:g} s from now"
    return None


def log(text: str) -> None:
    print(f"{datetime.now().astimezone():%H:%M:%S} [trigger] {text}", flush=True)


class Runner:
    """Runs the pipeline one at a time; a trigger during a run makes one more run after it."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.lock = threading.Lock()
        self.running = False
        self.again = False

    def trigger(self, why: str) -> None:
        with self.lock:
            if self.running:
                self.again = True
                log(f"{why}: a run is under way; one more follows it")
                return
            self.running = True
        threading.Thread(target=self._loop, args=(why,), daemon=True).start()

    def _loop(self, why: str) -> None:
        while True:
            log(f"{why}: running {' '.join(self.command)}")
            code = subprocess.run(self.command, check=False).returncode
            log(f"pipeline exited {code}")
            with self.lock:
                if not self.again:
                    self.running = False
                    return
                self.again = False
                why = "triggered meanwhile"


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, secret: bytes, types: Sequence[str],
                 tolerance: float, runner: Runner) -> None:
        super().__init__(address, Handler)
        self.secret, self.types, self.tolerance, self.runner = secret, types, tolerance, runner
        self.seen: deque[int] = deque(maxlen=SEEN)
        self.seen_lock = threading.Lock()

    def first_time(self, event_id: int) -> bool:
        with self.seen_lock:
            if event_id in self.seen:
                return False
            self.seen.append(event_id)
            return True


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def _answer(self, status: int, text: str) -> None:
        body = json.dumps({"status": text}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        text = self.headers.get("Content-Length") or "0"
        length = int(text) if text.isdigit() else 0
        if not 0 < length <= MAX_BODY:
            self._answer(413 if length else 400, "a body of 1 byte to 64 KiB is expected")
            return
        body = self.rfile.read(length)
        refused = verify(self.server.secret, self.headers.get("Edgefleet-Timestamp"),
                         self.headers.get("Edgefleet-Signature"), body,
                         tolerance=self.server.tolerance, now=time.time())
        if refused:
            log(f"refused a request from {self.client_address[0]}: {refused}")
            self._answer(401, refused)
            return
        try:
            event = json.loads(body)
            event_id, kind = int(event["id"]), str(event["type"])
        except (ValueError, KeyError, TypeError):
            self._answer(400, "not an edgefleet event")
            return
        if not any(fnmatch.fnmatchcase(kind, t) for t in self.server.types):
            self._answer(202, f"ignored: {kind} is not one of {', '.join(self.server.types)}")
            return
        if not self.server.first_time(event_id):
            self._answer(202, f"event {event_id} was delivered before")
            return
        self.server.runner.trigger(f"event {event_id} {kind} {event.get('subject', '')}")
        self._answer(202, "pipeline triggered")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Quiet: the lines above say what happened."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.mlops.trigger",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--secret-file", type=Path, required=True,
                        help="the secret given to `edgefleet webhook add --secret-file`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--type", dest="types", action="append", metavar="PATTERN",
                        help="event types that run the pipeline, globs; repeatable "
                             "[drift.detected]")
    parser.add_argument("--tolerance", type=float, default=300,
                        help="oldest timestamp taken, seconds [%(default)s]")
    parser.add_argument("pipeline", nargs="*", help="arguments for the pipeline, after --")
    args = parser.parse_args(argv)
    secret = args.secret_file.read_text().strip().encode()
    runner = Runner([sys.executable, "-m", "examples.mlops.pipeline", *args.pipeline])
    server = Receiver((args.host, args.port), secret=secret,
                      types=args.types or ["drift.detected"], tolerance=args.tolerance,
                      runner=runner)
    log(f"listening on http://{args.host}:{server.server_port}/ for "
        f"{', '.join(server.types)}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
