"""Moving large bodies without holding them or stalling the event loop.

Uploads are gathered into ~1 MiB pieces and hashed and written in a thread
of their own while the next pieces arrive, so a big upload neither blocks
other requests on the same loop nor waits on its own writes. Downloads are sent
in 1 MiB pieces, not Starlette's 64 KiB, to cut the per-chunk thread
hand-offs, and a Range they cannot serve is refused in the caller's error
shape (Starlette answers text/plain).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, Response
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

PIECE = 1 << 20
IN_FLIGHT = 8


def _write_all(write: Callable[[bytes], None], chunks: list[bytes]) -> None:
    for chunk in chunks:
        write(chunk)


async def receive_into(request: Request, write: Callable[[bytes], None]) -> int:
    """Stream the request body through WRITE (run in a thread); returns the byte count.

    Each ~1 MiB piece is handed to a thread of this upload's own, which writes
    the pieces in order while the next ones arrive. Up to IN_FLIGHT pieces may
    wait for it: waiting for each write before reading on left the socket
    unread whenever the scheduler kept the writer waiting, and on a busy
    machine that was most of the time. Raises starlette's ClientDisconnect
    when the client goes away mid-body; a failed write is raised when the
    loop next waits on it, at most IN_FLIGHT pieces later.
    """
    loop = asyncio.get_running_loop()
    writing: deque[asyncio.Future[None]] = deque()
    pending: list[bytes] = []
    held = total = 0
    with ThreadPoolExecutor(1, thread_name_prefix="upload") as writer:
        try:
            async for chunk in request.stream():
                pending.append(chunk)
                held += len(chunk)
                if held >= PIECE:
                    if len(writing) == IN_FLIGHT:
                        await writing[0]
                        writing.popleft()
                    writing.append(loop.run_in_executor(writer, _write_all, write, pending))
                    total, pending, held = total + held, [], 0
            if pending:
                writing.append(loop.run_in_executor(writer, _write_all, write, pending))
            while writing:
                await writing[0]
                writing.popleft()
            return total + held
        finally:
            # Failing mid-body with writes queued: they end before the caller aborts the
            # writer under them, and their own errors, if any, are not reported twice.
            if writing:
                await asyncio.wait(writing)
            for queued in writing:
                if not queued.cancelled():
                    queued.exception()


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
