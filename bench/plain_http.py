"""The plain-HTTP baseline for transfer benchmarks: the standard library only.

The server is a ThreadingHTTPServer run in the benchmark's process: PUT
streams the body to a file (and, with `?fsync=1`, fsyncs it before answering,
as any store that acknowledges an upload must), GET streams a file back, both
in 1 MiB pieces. The client is this file run as a process, so that it pays an
interpreter's start-up as the CLI it is compared with does (not the CLI's
imports, which are the CLI's own cost):

    python bench/plain_http.py put PORT FILE [--fsync]
    python bench/plain_http.py get PORT NAME DEST

It hashes nothing, checks no token and keeps no database: an upper bound on
what any HTTP upload or download of the same bytes can do on this machine.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

CHUNK = 1 << 20
TIMEOUT_S = 120


def handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:
            url = urlsplit(self.path)
            left = int(self.headers["Content-Length"])
            with open(root / Path(url.path).name, "wb") as out:
                while left:
                    chunk = self.rfile.read(min(CHUNK, left))
                    if not chunk:
                        break
                    out.write(chunk)
                    left -= len(chunk)
                if url.query == "fsync=1":
                    out.flush()
                    os.fsync(out.fileno())
            self.send_response(201 if not left else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            path = root / Path(self.path).name
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, CHUNK)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def server(root: Path) -> Iterator[int]:
    """Serve ROOT on a free loopback port (yielded) until the block ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(root))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def put(port: int, source: Path, *, fsync: bool) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S, blocksize=CHUNK)
    try:
        with open(source, "rb") as f:
            conn.request(
                "PUT", f"/{source.name}" + ("?fsync=1" if fsync else ""), body=f,
                headers={"Content-Length": str(source.stat().st_size)},
            )
        response = conn.getresponse()
        response.read()
        if response.status != 201:
            raise RuntimeError(f"baseline PUT answered {response.status}")
    finally:
        conn.close()


def get(port: int, name: str, dest: Path) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", f"/{name}")
        response = conn.getresponse()
        with open(dest, "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
    finally:
        conn.close()


def client_command(*args: str) -> list[str]:
    """The command line that runs this file's client with ARGS."""
    return [sys.executable, __file__, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description="The baseline's client, run as a process.")
    commands = parser.add_subparsers(dest="command", required=True)
    sending = commands.add_parser("put")
    sending.add_argument("port", type=int)
    sending.add_argument("file", type=Path)
    sending.add_argument("--fsync", action="store_true", help="the server fsyncs before 201")
    fetching = commands.add_parser("get")
    fetching.add_argument("port", type=int)
    fetching.add_argument("name")
    fetching.add_argument("dest", type=Path)
    args = parser.parse_args()
    if args.command == "put":
        put(args.port, args.file, fsync=args.fsync)
    else:
        get(args.port, args.name, args.dest)


if __name__ == "__main__":
    main()
