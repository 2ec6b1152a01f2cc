"""One load-generating process of bench/serving_speed.py: closed-loop clients, cheap per request.

    python bench/serving_load.py http|grpc TARGET PAYLOAD_FILE CONNECTIONS START UNTIL

CONNECTIONS clients, each on its own keep-alive connection (HTTP) or channel
(gRPC), send PAYLOAD_FILE's bytes (a whole HTTP/1.1 request, or a serialized
ModelInferRequest), wait for the answer and send again. Requests sent
between the wall-clock times START and UNTIL are counted (before START the
clients warm up). Prints one JSON object: statuses, latencies of answered
requests and of refusals (503 / UNAVAILABLE), in seconds, and this process's
CPU seconds from START to the end (what the load generator itself costs).

HTTP clients are asyncio Protocols that only find the response's end (the
Content-Length) in the bytes received: no parser, no client library, a few
microseconds a request, so the server, not the load generator, is what is
measured. This module imports neither numpy nor the project; gRPC clients
use grpcio's asyncio channel (its per-call cost is much higher, see the
bench's docstring).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Anchored: Inference-Header-Content-Length ends in the same words.
_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")
SERVICE = "inference.GRPCInferenceService"
KEY = "bench-serving-key"

Record = Callable[[int, float, float], None]


class _HttpClient(asyncio.Protocol):
    def __init__(self, payload: bytes, until: float, record: Record,
                 done: asyncio.Future[None]) -> None:
        self.payload = payload
        self.until = until
        self.record = record
        self.done = done
        self.buffer = bytearray()
        self.need = -1
        self.status = 0
        self.began = 0.0
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.buffer.clear()
        self.need = -1
        self.sent_at = time.time()
        self.began = time.perf_counter()
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end + 2])
            self.status = int(head[9:12])
            found = _LENGTH.search(head)
            self.need = end + 4 + (int(found.group(1)) if found else 0)
        if len(self.buffer) < self.need:
            return
        self.record(self.status, time.perf_counter() - self.began, self.sent_at)
        if time.time() < self.until:
            self._send()
        else:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _http(target: str, payload: bytes, until: float, record: Record) -> None:
    host, port = target.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_connection(lambda: _HttpClient(payload, until, record, done),
                                 host, int(port))
    await done


async def _grpc(target: str, payload: bytes, until: float, record: Record) -> None:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
        metadata = (("x-api-key", KEY),)
        while time.time() < until:
            sent_at = time.time()
            began = time.perf_counter()
            try:
                await infer(payload, metadata=metadata)
                status = 200
            except grpc.aio.AioRpcError as e:
                status = 503 if e.code() == grpc.StatusCode.UNAVAILABLE else 500
            record(status, time.perf_counter() - began, sent_at)


def main() -> None:
    kind, target, payload_file, connections, start, until = sys.argv[1:]
    payload = Path(payload_file).read_bytes()
    began, ends = float(start), float(until)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    refusals: list[float] = []

    def record(status: int, seconds: float, sent_at: float) -> None:
        if sent_at < began:
            return  # warm-up
        statuses[status] = statuses.get(status, 0) + 1
        (latencies if status == 200 else refusals).append(seconds)

    cpu_at_start = [0.0]

    async def mark_start() -> None:
        await asyncio.sleep(max(0.0, began - time.time()))
        cpu_at_start[0] = time.process_time()

    async def run() -> None:
        client = _grpc if kind == "grpc" else _http
        await asyncio.gather(mark_start(), *(client(target, payload, ends, record)
                                             for _ in range(int(connections))))

    asyncio.run(run())
    json.dump({"statuses": statuses, "latencies": latencies, "refusals": refusals,
               "cpu": time.process_time() - cpu_at_start[0]}, sys.stdout)


if __name__ == "__main__":
    main()
