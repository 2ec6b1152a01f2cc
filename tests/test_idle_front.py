"""agent/idle_front.py on a real listening socket: health answered by the front itself, any
other request handed on, byte for byte, to the server its wake-up started on the same
socket."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.idle_front import IdleFront, health_answer
from agent.serving.sockets import tcp_listener


class _Echo(BaseHTTPRequestHandler):
    """The serving process's stand-in: says which request it got, and its body."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer({"path": self.path, "body": body.decode()})

    def do_GET(self) -> None:
        self._answer({"path": self.path, "body": ""})

    def _answer(self, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Port:
    def __init__(self) -> None:
        self.listener = tcp_listener("127.0.0.1", 0)
        self.port = self.listener.getsockname()[1]
        self.woken = 0
        self.server: ThreadingHTTPServer | None = None
        self.fail = False
        self.front = IdleFront(self.listener, self.wake)
        self.front.resume()

    def wake(self) -> None:
        """What ServingProcess.start does: pause the front, start a server on the socket."""
        self.woken += 1
        if self.fail:
            raise OSError("no serving process today")
        self.front.pause()
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Echo, bind_and_activate=False)
        server.socket.close()  # made unbound: the listener is the one to serve
        server.socket = self.listener
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        self.front.close()
        self.listener.close()


@pytest.fixture
def port() -> Iterator[Port]:
    made = Port()
    yield made
    made.close()


def test_health_is_answered_by_the_front_on_one_keep_alive_connection(port: Port) -> None:
    connection = port.connect()
    for path, expected in (("/v2/health/live", {"live": True}),
                           ("/v2/health/ready?x=1", {"ready": True}),
                           ("/v2/health/live", {"live": True})):
        connection.request("GET", path)
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())) == (200, expected)
    connection.close()
    assert port.woken == 0


def test_any_other_request_wakes_the_server_and_is_relayed_to_it(port: Port) -> None:
    connection = port.connect()
    connection.request("GET", "/v2/health/live")
    assert connection.getresponse().read() == b'{"live":true}'
    # On the same connection: handed on with its body, and what follows goes along.
    connection.request("POST", "/v2/models/tiny/infer", body=b'{"inputs": []}')
    answer = json.loads(connection.getresponse().read())
    assert answer == {"path": "/v2/models/tiny/infer", "body": '{"inputs": []}'}
    connection.request("GET", "/v2/health/live")
    assert json.loads(connection.getresponse().read())["path"] == "/v2/health/live"
    connection.close()
    # New connections go to the server itself now; the front was woken once.
    other = port.connect()
    other.request("GET", "/metrics")
    assert json.loads(other.getresponse().read())["path"] == "/metrics"
    other.close()
    assert port.woken == 1


def test_a_server_that_cannot_start_is_a_503_and_the_front_answers_on(port: Port) -> None:
    port.fail = True
    connection = port.connect()
    connection.request("GET", "/v2")
    response = connection.getresponse()
    assert response.status == 503 and "could not be started" in response.read().decode()
    connection.close()
    again = port.connect()
    again.request("GET", "/v2/health/ready")
    assert again.getresponse().status == 200
    again.close()


def test_a_paused_front_leaves_connections_to_whoever_serves_next(port: Port) -> None:
    port.front.pause()
    client = socket.create_connection(("127.0.0.1", port.port), timeout=10)
    client.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    port.front.resume()  # the connection waited in the backlog
    assert client.recv(4096).endswith(b'{"live":true}')
    client.close()


@pytest.mark.parametrize("head, answered", [
    (b"GET /v2/health/live HTTP/1.1\r\nHost: x", True),
    (b"GET /v2/health/live HTTP/1.0", True),
    (b"HEAD /v2/health/live HTTP/1.1", False),  # the server says what it makes of it
    (b"GET /v2/health/live HTTP/1.1\r\nContent-Length: 3", False),
    (b"GET /v2/health/live HTTP/1.1\r\nTransfer-Encoding: chunked", False),
    (b"GET /v2/health HTTP/1.1", False),
    (b"garbage", False),
])
def test_which_requests_the_front_answers(head: bytes, answered: bool) -> None:
    assert (health_answer(head) is not None) == answered


def test_http_1_0_and_connection_close_end_the_connection() -> None:
    assert health_answer(b"GET /v2/health/live HTTP/1.0") is not None
    for head in (b"GET /v2/health/live HTTP/1.0",
                 b"GET /v2/health/live HTTP/1.1\r\nConnection: close"):
        answer = health_answer(head)
        assert answer is not None and answer[1] is False and b"connection: close" in answer[0]


def test_a_flood_of_idle_connections_is_bounded_and_health_answers_after(port: Port) -> None:
    """Connections that send nothing hold a thread each: past MAX_CONNECTIONS they are closed
    at once; once they go, the front answers again."""
    from agent.idle_front import MAX_CONNECTIONS

    idle = [socket.create_connection(("127.0.0.1", port.port)) for _ in range(MAX_CONNECTIONS)]
    extra = socket.create_connection(("127.0.0.1", port.port), timeout=10)
    assert extra.recv(1) == b""  # closed without an answer
    extra.close()
    for sock in idle:
        sock.close()
    connection = port.connect()
    connection.request("GET", "/v2/health/live")
    assert connection.getresponse().status == 200
    connection.close()
    assert port.woken == 0
