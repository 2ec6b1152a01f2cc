"""Moving large bodies without holding them or stalling the event loop.

Uploads are gathered into ~1 MiB pieces and written in a worker thread
while the next piece arrives (the blob store hashes each chunk in another
thread as it writes it), so a big upload neither blocks other requests on
the same loop nor waits on its own writes. Downloads are sent
in 1 MiB pieces, not Starlette's 64 KiB, to cut the per-chunk thread
hand-offs, and a Range they cannot serve is refused in the caller's error
shape (Starlette answers text/plain).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, Response
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

PIECE = 1 << 20


def _write_all(write: Callable[[bytes], None], chunks: list[bytes]) -> None:
    for chunk in chunks:
        write(chunk)


async def receive_into(request: Request, write: Callable[[bytes], None]) -> int:
    """Stream the request body through WRITE (run in a thread); returns the byte count.

    Each ~1 MiB piece is written while the next one arrives: waiting for each
    write before reading on left the socket unread half the time (uploads at a
    quarter of plain HTTP's speed). At most two pieces are held. Raises
    starlette's ClientDisconnect when the client goes away mid-body.
    """
    loop = asyncio.get_running_loop()
    writing: asyncio.Future[None] = loop.create_future()
    writing.set_result(None)
    pending: list[bytes] = []
    held = total = 0
    try:
        async for chunk in request.stream():
            pending.append(chunk)
            held += len(chunk)
            if held >= PIECE:
                await writing
                writing = loop.run_in_executor(None, _write_all, write, pending)
                total, pending, held = total + held, [], 0
        await writing
        if pending:
            writing = loop.run_in_executor(None, _write_all, write, pending)
            await writing
        return total + held
    finally:
        # Failing mid-body with a write under way: it ends before the caller aborts
        # the writer under it, and its own error, if any, is not reported twice.
        if not writing.done():
            await asyncio.wait([writing])
        if not writing.cancelled():
            writing.exception()


# (status, detail) -> the error response in the API's own shape.
Refusal = Callable[[int, str], Response]


class LargeFileResponse(FileResponse):
    chunk_size = PIECE

    def __init__(self, path: str | os.PathLike[str], *, refuse: Refusal, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.refuse = refuse

    def _range_problem(self, scope: Scope) -> tuple[int, str, int] | None:
        """(status, detail, file size) if the request's Range cannot be served."""
        headers = Headers(scope=scope)
        wanted, if_range = headers.get("range"), headers.get("if-range")
        if wanted is None or scope["method"] not in ("GET", "HEAD") or (
                if_range is not None and not self._should_use_range(if_range)):
            return None
        size = os.stat(self.path).st_size
        try:
            self._parse_range_header(wanted, size)
        except MalformedRangeHeader as exc:
            return 400, f"bad Range header {wanted[:60]!r}: {exc.content}", size
        except RangeNotSatisfiable:
            return 416, f"Range {wanted[:60]!r} starts past the end of the {size}-byte file", size
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = self._range_problem(scope)
        if problem is None:
            await super().__call__(scope, receive, send)
            return
        status, detail, size = problem
        response = self.refuse(status, detail)
        if status == 416:
            response.headers["Content-Range"] = f"bytes */{size}"
        await response(scope, receive, send)
