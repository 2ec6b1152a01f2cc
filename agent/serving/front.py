"""The scoring port's HTTP protocol: uvicorn's httptools one, each response sent in one piece.

uvicorn writes a response's status line and headers, then its body, each
with a `transport.write` of its own, so each with its own send() system
call, which on loopback also delivers the segment to the client and wakes
it. Profiled with 32 clients on a small model, send() was half of the event
loop's time. Here the writes made during one turn of the loop are joined
and sent once at the end of the turn (a response's head and body are
written in the same turn), which halves the system calls; nothing waits
longer than that turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _Corked:
    """A transport whose writes within one loop turn leave as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written goes out before the close, as with a plain transport
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, get_extra_info, pause/resume_reading, set_protocol...)
        # is the real transport's.
        return getattr(self._transport, name)


class FrontProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        corked: Any = _Corked(transport, self.loop)
        super().connection_made(corked)
