"""One inference request, from the body's bytes to the response's.

On the event loop: find the deployment (404 before queueing), take a slot
(503 when the queue is full), pick the version. In a worker thread: decode
and check the tensors, run the model, encode the response, so large
payloads never stall the loop. The slot and the version's reference are
released when the thread's work is done, whatever happened to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.runtimes.base import ModelRuntimeError
from agent.serving import codec, tensors
from agent.serving.errors import BadRequest, ModelFailed, Overloaded, ServingError
from agent.serving.limits import Limiter
from agent.serving.shadow import Shadow
from agent.serving.table import ModelTable, ModelVersion
from agent.serving.telemetry import Telemetry

log = logging.getLogger("edgefleet.serving")


@dataclass(frozen=True)
class Answer:
    body: bytes
    headers: dict[str, str]
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    infer_seconds: float  # the model alone
    work_seconds: float  # decode, infer and encode: what a worker thread would spend


def answer(version: ModelVersion, body: bytes, header_length: str | None) -> Answer:
    """Run one request on VERSION; blocking, so call it in a worker thread."""
    began = time.perf_counter()
    header, binary = codec.split_body(body, header_length)
    request = tensors.parse_request(header, binary, version.model.signature)
    start = time.perf_counter()
    try:
        outputs = version.model.infer(request.inputs)
    except ModelRuntimeError as e:
        raise ModelFailed(f"model '{version}' failed: {e}") from None
    except Exception as e:
        log.exception("%s raised on valid input", version)
        raise ModelFailed(f"model '{version}' failed: {type(e).__name__}: {e}") from None
    infer_seconds = time.perf_counter() - start
    entries, blobs = tensors.encode_outputs(request, outputs)
    response: dict[str, Any] = {} if request.id is None else {"id": request.id}
    response |= {"model_name": version.deployment, "model_version": version.version,
                 "outputs": entries}
    response_body, headers = codec.join_body(response, blobs)
    return Answer(response_body, headers, request.inputs, outputs, infer_seconds,
                  time.perf_counter() - began)


INLINE_MAX_BODY = 16 * 1024
INLINE_MAX_SECONDS = 0.0003


class Scorer:
    def __init__(
        self,
        table: ModelTable,
        limiter: Limiter,
        telemetry: Telemetry,
        shadow: Shadow,
    ) -> None:
        self.table = table
        self.limiter = limiter
        self.telemetry = telemetry
        self.shadow = shadow
        # One thread per slot: the limiter, not the pool's queue, decides who waits.
        self._pool = ThreadPoolExecutor(limiter.max_concurrency, thread_name_prefix="infer")

    async def infer(
        self, name: str, version: str | None, read_body: Callable[[], Awaitable[bytes]],
        header_length: str | None,
    ) -> tuple[bytes, dict[str, str]]:
        """Answer one request. Its body is read only once it has a slot, so bodies in
        memory are bounded by the running inferences, not by the clients waiting."""
        start = time.perf_counter()
        deployment = self.table.get(name)
        if version is not None:
            deployment.find(version)
        try:
            await self.limiter.acquire()
        except Overloaded:
            self.telemetry.rejected.inc(name)
            raise
        try:
            body = await read_body()
            chosen = self.table.lease(name, version)
        except BaseException:
            self.limiter.release()
            raise
        labels = (name, chosen.version)
        self.telemetry.requests.inc(*labels)
        try:
            result = await self._run(chosen, body, header_length)
        except ServingError as e:
            reason = "bad_request" if isinstance(e, BadRequest) else "model_error"
            self.telemetry.failures.inc(*labels, reason)
            raise
        except Exception:
            self.telemetry.failures.inc(*labels, "internal")
            raise
        # The work alone, not the wait or the thread hop: otherwise a version once
        # sent to the pool would look slow because of the pool and stay there.
        work = result.work_seconds
        chosen.typical_seconds = (work if chosen.typical_seconds == float("inf")
                                  else 0.9 * chosen.typical_seconds + 0.1 * work)
        self.telemetry.infer_latency.observe(result.infer_seconds, *labels)
        self.telemetry.latency.observe(time.perf_counter() - start, *labels)
        self.shadow.offer(chosen, result.inputs, result.outputs)
        return result.body, result.headers

    async def _run(self, chosen: ModelVersion, body: bytes, header_length: str | None) -> Answer:
        """Answer on a worker thread; or, for a small request to a version that
        answers in well under a millisecond, right here: the thread hop would
        cost more than the work (and blocks the loop for less than it saves)."""
        if len(body) <= INLINE_MAX_BODY and chosen.typical_seconds < INLINE_MAX_SECONDS:
            try:
                return answer(chosen, body, header_length)
            finally:
                chosen.release()
                self.limiter.release()
        loop = asyncio.get_running_loop()

        def finished(_: Future[Answer]) -> None:
            chosen.release()
            loop.call_soon_threadsafe(self.limiter.release)

        work = self._pool.submit(answer, chosen, body, header_length)
        work.add_done_callback(finished)
        return await asyncio.wrap_future(work)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
