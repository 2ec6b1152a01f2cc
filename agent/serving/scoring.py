"""One inference request, from the bytes received to the bytes answered, in any wire format.

On the event loop: find the deployment (404 before queueing), admit the
request (503 when the queue is full or the wait would be over budget), pick
the version, take a slot. In a worker thread: decode and check the tensors,
run the model, encode the response, so large payloads never stall the loop.
The slot and the version's reference are released when the thread's work is
done, whatever happened to the caller. A version that batches (batching.py)
shares one runtime call among the requests that arrive while it is busy.
The wire formats are `Call`s: RestCall here, the gRPC one in oip/wire.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent.runtimes.base import ModelRuntimeError
from agent.serving import codec, tensors
from agent.serving.batching import Batcher
from agent.serving.errors import BadRequest, ModelFailed, Overloaded, ServingError
from agent.serving.limits import Limiter
from agent.serving.shadow import Shadow
from agent.serving.table import ModelTable, ModelVersion
from agent.serving.telemetry import Telemetry
from contract.tensors import Signature

log = logging.getLogger("edgefleet.serving")


class Call(Protocol):
    """One inference request in one wire format (REST here, gRPC in oip/wire.py): decoded
    against a model's signature, and answered in the same format."""

    @property
    def size(self) -> int: ...  # bytes received, for the choice of running it inline

    def decode(self, signature: Signature) -> tensors.Request: ...

    def encode(
        self, version: ModelVersion, request: tensors.Request, outputs: Mapping[str, np.ndarray]
    ) -> tuple[bytes, dict[str, str]]: ...


@dataclass
class RestCall:
    """A REST body: JSON, or JSON and binary tensor data (codec.py). The body is
    read once the request is admitted (Scorer.infer); until then its size is the
    one declared."""

    header_length: str | None
    declared_size: int = 0
    body: bytes = b""

    @property
    def size(self) -> int:
        return len(self.body) or self.declared_size

    def decode(self, signature: Signature) -> tensors.Request:
        header, binary = codec.split_body(self.body, self.header_length)
        return tensors.parse_request(header, binary, signature)

    def encode(
        self, version: ModelVersion, request: tensors.Request, outputs: Mapping[str, np.ndarray]
    ) -> tuple[bytes, dict[str, str]]:
        entries, blobs = tensors.encode_outputs(request, outputs)
        response: dict[str, Any] = {} if request.id is None else {"id": request.id}
        response |= {"model_name": version.deployment, "model_version": version.version,
                     "outputs": entries}
        return codec.join_body(response, blobs)


@dataclass(frozen=True)
class Answer:
    body: bytes
    headers: dict[str, str]
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    infer_seconds: float  # the model alone
    work_seconds: float  # decode, infer and encode: what a worker thread would spend


def run_model(version: ModelVersion, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """VERSION's runtime on INPUTS; its failures as ModelFailed. Blocking."""
    try:
        return version.model.infer(inputs)
    except ModelRuntimeError as e:
        raise ModelFailed(f"model '{version}' failed: {e}") from None
    except Exception as e:
        log.exception("%s raised on valid input", version)
        raise ModelFailed(f"model '{version}' failed: {type(e).__name__}: {e}") from None


def answer(version: ModelVersion, call: Call) -> Answer:
    """Run one request on VERSION; blocking, so call it in a worker thread."""
    began = time.perf_counter()
    request = call.decode(version.model.signature)
    start = time.perf_counter()
    outputs = run_model(version, request.inputs)
    infer_seconds = time.perf_counter() - start
    body, headers = call.encode(version, request, outputs)
    return Answer(body, headers, request.inputs, outputs, infer_seconds,
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
        header_length: str | None, declared_size: int = 0,
    ) -> tuple[bytes, dict[str, str]]:
        """A REST request's answer: body and headers. Its body is read only once the
        request is admitted, so bodies in memory are bounded by the admitted requests,
        not by the clients waiting. DECLARED_SIZE (Content-Length, 0 if unknown) sizes
        its expected work until the body is there."""
        call = RestCall(header_length, declared_size)

        async def receive() -> None:
            call.body = await read_body()

        result = await self.run(name, version, call, receive=receive)
        return result.body, result.headers

    async def run(self, name: str, version: str | None, call: Call,
                  receive: Callable[[], Awaitable[None]] | None = None) -> Answer:
        """CALL answered by deployment NAME (VERSION, or the one its route picks); RECEIVE,
        if given, reads the rest of the call once it is admitted."""
        start = time.perf_counter()
        deployment = self.table.get(name)
        target = deployment.primary if version is None else deployment.find(version)
        expected = target.expected_seconds(call.size)
        try:
            self.limiter.admit(expected, queued=self.limiter.busy)
        except Overloaded:
            self.telemetry.rejected.inc(name)
            raise
        try:
            if receive is not None:
                await receive()
            chosen = self.table.lease(name, version)
        except BaseException:
            self.limiter.leave(expected)
            raise
        labels = (name, chosen.version)
        self.telemetry.requests.inc(*labels)
        try:
            batcher = self._batcher(chosen)
            if batcher is None:
                result = await self._run(chosen, call, expected)
            else:
                result = await self._batched(chosen, batcher, call, expected)
        except ServingError as e:
            reason = "bad_request" if isinstance(e, BadRequest) else "model_error"
            self.telemetry.failures.inc(*labels, reason)
            raise
        except Exception:
            self.telemetry.failures.inc(*labels, "internal")
            raise
        # The work alone, not the wait or the thread hop: otherwise a version once
        # sent to the pool would look slow because of the pool and stay there.
        chosen.observe(result.work_seconds, call.size)
        self.telemetry.infer_latency.observe(result.infer_seconds, *labels)
        self.telemetry.latency.observe(time.perf_counter() - start, *labels)
        self.telemetry.sketch(*labels, result.inputs, result.outputs)
        self.shadow.offer(chosen, result.inputs, result.outputs)
        return result

    async def _run(self, chosen: ModelVersion, call: Call, expected: float) -> Answer:
        """Answer on a worker thread; or, for a small request to a version that
        answers in well under a millisecond, right here: the thread hop would
        cost more than the work (and blocks the loop for less than it saves)."""
        try:
            await self.limiter.slot()
        except BaseException:
            chosen.release()
            self.limiter.leave(expected)
            raise
        if call.size <= INLINE_MAX_BODY and chosen.typical_seconds < INLINE_MAX_SECONDS:
            try:
                return answer(chosen, call)
            finally:
                chosen.release()
                self.limiter.release(expected)
        loop = asyncio.get_running_loop()

        def finished(_: Future[Answer]) -> None:
            chosen.release()
            loop.call_soon_threadsafe(self.limiter.release, expected)

        work = self._pool.submit(answer, chosen, call)
        work.add_done_callback(finished)
        return await asyncio.wrap_future(work)

    def _batcher(self, version: ModelVersion) -> Batcher | None:
        policy = version.spec.batching
        if policy is None:
            return None
        batcher = version.batcher
        if batcher is None:
            labels = (version.deployment, version.version)

            def observe(rows: int) -> None:
                self.telemetry.batch_rows.observe(rows, *labels)

            batcher = Batcher(policy, functools.partial(run_model, version), self.limiter,
                              self._pool, observe)
            version.batcher = batcher
        return batcher

    async def _batched(
        self, chosen: ModelVersion, batcher: Batcher, call: Call, expected: float
    ) -> Answer:
        """Decode and encode here (small requests) or in a thread; the runtime call is
        the batcher's, shared with the requests to CHOSEN that arrive meanwhile."""
        inline = call.size <= INLINE_MAX_BODY
        handed = False
        try:
            began = time.perf_counter()
            signature = chosen.model.signature
            request = (call.decode(signature) if inline
                       else await asyncio.to_thread(call.decode, signature))
            decoded = time.perf_counter() - began
            # From here the batcher releases CHOSEN and the admission when its batch is done.
            waiting = batcher.submit(request.inputs, expected, chosen.release)
            handed = True
            outputs, infer_seconds, share = await waiting
            began = time.perf_counter()
            body, headers = (call.encode(chosen, request, outputs) if inline
                             else await asyncio.to_thread(call.encode, chosen, request, outputs))
            encoded = time.perf_counter() - began
        finally:
            if not handed:
                chosen.release()
                self.limiter.leave(expected)
        return Answer(body, headers, request.inputs, outputs, infer_seconds,
                      decoded + share + encoded)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
