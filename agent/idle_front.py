"""The scoring port while no serving process runs: health answered here, the rest handed on.

With nothing deployed the agent runs no serving process (it would hold
~60 MB to answer health checks). The agent holds the scoring port's
listening socket itself and, while no serving process runs, this front
accepts on it: GET /v2/health/live and /v2/health/ready get the answers a
serving process with nothing loaded gives ({"live": true}, {"ready": true}),
and any other request starts the serving process (WAKE), which then
accepts on the same socket, and is relayed to it byte for byte with what
was read of it already. Clients see the serving process's own answer, the
first one late by its start-up. Paused, the front leaves the socket to the
serving process; resumed (the serving process stopped), it accepts again.
Connections waiting in the backlog meanwhile are not lost: the socket
stays open in the agent the whole time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("edgefleet.agent")
KEEP_ALIVE_S = 5.0  # idle keep-alive connections closed after this, as uvicorn does
MAX_HEAD = 16384
MAX_CONNECTIONS = 64  # a flood of idle connections costs threads: past this, closed at once
HEALTH = {b"/v2/health/live": b'{"live":true}', b"/v2/health/ready": b'{"ready":true}'}
UNAVAILABLE = b'{"error":"the serving process could not be started; try again later"}'


def _response(status: bytes, body: bytes, close: bool) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + (b"\r\nconnection: close" if close else b"")
            + b"\r\n\r\n" + body)


def health_answer(head: bytes) -> tuple[bytes, bool] | None:
    """The answer to the request HEAD (request line and headers) if it is a health check
    this front answers, and whether the connection stays open; None for anything else."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return None
    body = HEALTH.get(parts[1].partition(b"?")[0])
    headers = dict(line.partition(b":")[::2] for line in lines[1:])
    headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
    if body is None or b"transfer-encoding" in headers \
            or headers.get(b"content-length", b"0") != b"0":
        return None  # a request with a body: the serving process says what it makes of it
    keep = headers.get(b"connection") != b"close" and parts[2] == b"HTTP/1.1"
    return _response(b"200 OK", body, close=not keep), keep


def _relay(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class IdleFront:
    def __init__(self, listener: socket.socket, wake: Callable[[], None]) -> None:
        """LISTENER is the scoring port; WAKE starts the serving process and returns once it
        accepts there (an exception if it cannot)."""
        self._listener = listener
        self._wake = wake
        host, port = listener.getsockname()[:2]
        self._address = ({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)
        self._answering = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = False
        # A pause wakes the accepting thread out of select (a pipe: no timeout polling).
        self._wakeup_r, self._wakeup_w = os.pipe()
        # Non-blocking: the serving process may take a connection select saw first.
        listener.setblocking(False)
        threading.Thread(target=self._accept_loop, name="idle front", daemon=True).start()

    def resume(self) -> None:
        self._answering.set()

    def pause(self) -> None:
        self._answering.clear()
        os.write(self._wakeup_w, b".")

    def close(self) -> None:
        self._closed = True
        self._answering.set()
        os.write(self._wakeup_w, b".")

    def _accept_loop(self) -> None:
        while True:
            self._answering.wait()
            if self._closed:
                return
            ready, _, _ = select.select([self._listener.fileno(), self._wakeup_r], [], [])
            if self._wakeup_r in ready:
                os.read(self._wakeup_r, 64)
                continue
            if not self._answering.is_set():
                continue
            try:
                connection, _ = self._listener.accept()
            except OSError:  # taken by the serving process, or gone with the client
                continue
            if not self._slots.acquire(blocking=False):
                connection.close()
                continue
            threading.Thread(target=self._serve, args=(connection,), daemon=True,
                             name="idle front connection").start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            self._converse(connection)
        finally:
            self._slots.release()

    def _converse(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            connection.settimeout(KEEP_ALIVE_S)
            received = b""
            while True:
                while b"\r\n\r\n" not in received:
                    chunk = connection.recv(65536)
                    if not chunk or len(received) > MAX_HEAD:
                        return
                    received += chunk
                head, _, rest = received.partition(b"\r\n\r\n")
                answer = health_answer(head)
                if answer is None:
                    self._hand_on(connection, received)
                    return
                response, keep = answer
                connection.sendall(response)
                if not keep:
                    return
                received = rest

    def _hand_on(self, connection: socket.socket, received: bytes) -> None:
        """Start the serving process and relay CONNECTION to it, RECEIVED first."""
        try:
            self._wake()
            upstream = socket.create_connection(self._address, timeout=30)
        except Exception as exc:  # whatever it was, the client is told and the agent goes on
            log.error("a scoring request came, but the serving process did not start: %s", exc)
            connection.sendall(_response(b"503 Service Unavailable", UNAVAILABLE, close=True))
            return
        with upstream:
            upstream.settimeout(None)
            connection.settimeout(None)
            upstream.sendall(received)
            threading.Thread(target=_relay, args=(connection, upstream), daemon=True,
                             name="idle front relay").start()
            _relay(upstream, connection)
