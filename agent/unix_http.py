"""HTTP over a Unix socket: how the agent talks to a serving process's control API.

The stdlib client, not httpx: the agent stays small (httpx with its imports costs
~14 MB the daemon need not hold). It is a module of its own so that http.client,
which brings email's parser (~0.9 MB), is loaded only once there is a serving
process to talk to: an idle daemon has none.
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("serving", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))
