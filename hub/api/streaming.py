"""Moving large bodies without holding them or stalling the event loop.

Uploads are gathered into ~1 MiB pieces and hashed and written in a worker
thread, so a big upload does not block other requests on the same
loop. Downloads are sent in 1 MiB pieces, not
Starlette's 64 KiB, to cut the per-chunk thread hand-offs.
"""

from __future__ import annotations

from collections.abc import Callable

from anyio import to_thread
from fastapi import Request
from fastapi.responses import FileResponse

PIECE = 1 << 20


async def receive_into(request: Request, write: Callable[[bytes], None]) -> int:
    """Stream the request body through WRITE (run in a thread); returns the byte count.

    Raises starlette's ClientDisconnect when the client goes away mid-body.
    """
    pending = bytearray()
    total = 0
    async for chunk in request.stream():
        pending += chunk
        total += len(chunk)
        if len(pending) >= PIECE:
            piece, pending = bytes(pending), bytearray()
            await to_thread.run_sync(write, piece)
    if pending:
        await to_thread.run_sync(write, bytes(pending))
    return total


class LargeFileResponse(FileResponse):
    chunk_size = PIECE
