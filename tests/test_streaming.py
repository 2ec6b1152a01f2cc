"""The hub's upload pipeline (hub/api/streaming.py) on a body that arrives as an ASGI
server hands it over, in 64 KiB messages: pieces are written in order while the
body streams, and a write that fails mid-body stops the upload with its own error."""

from __future__ import annotations

import asyncio
import os

import pytest
from starlette.requests import Request
from starlette.types import Message

from hub.api.streaming import PIECE, receive_into

MESSAGE = 64 << 10


def streamed(messages: list[bytes]) -> Request:

    async def receive() -> Message:
        await asyncio.sleep(0)  # the next bytes are off the socket only later
        chunk = messages.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(messages)}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def upload(messages: list[bytes], written: list[bytes], fail_after: int | None = None) -> int:
    def write(chunk: bytes) -> None:
        if fail_after is not None and sum(map(len, written)) >= fail_after:
            raise OSError(28, "No space left on device")
        written.append(chunk)

    return asyncio.run(receive_into(streamed(messages), write))


def in_messages(body: bytes) -> list[bytes]:
    return [body[i:i + MESSAGE] for i in range(0, len(body), MESSAGE)]


def test_every_byte_is_written_in_order() -> None:
    body = os.urandom(11 * PIECE + 12345)
    written: list[bytes] = []
    assert upload(in_messages(body), written) == len(body)
    assert b"".join(written) == body


def test_a_failed_write_stops_the_upload_with_its_error() -> None:
    body = os.urandom(32 * PIECE)
    messages, written = in_messages(body), []
    with pytest.raises(OSError, match="No space left"):
        upload(messages, written, fail_after=2 * PIECE)
    assert b"".join(written) == body[:2 * PIECE]
    assert messages, "the rest of the body is not read once a write has failed"
