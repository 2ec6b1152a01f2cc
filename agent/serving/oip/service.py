"""The Open Inference Protocol over gRPC (`edgefleet serve --grpc-port`), beside REST.

The same scorer answers both, so gRPC requests share the REST API's limits
(slots, queue, wait budget, batching), its metrics and its routing (A/B,
shadow, the zero-loss switch). The API key travels as request metadata,
`authorization: Bearer KEY` or `x-api-key: KEY`; ServerLive and ServerReady
are open, like REST's health endpoints. Errors map to gRPC status codes; a
503 is UNAVAILABLE with a `retry-after` trailer.

Served by grpcio's asyncio server on the process's one event loop. Requests
are parsed by grpcio (protobuf's C parser); inference responses are
serialized in the worker thread that computed them and pass through as bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import grpc
from grpc import aio

from agent.serving import app as rest
from agent.serving.auth import key_check
from agent.serving.errors import Overloaded, ServingError
from agent.serving.oip import messages
from agent.serving.oip.wire import GrpcCall
from agent.serving.scoring import Scorer

log = logging.getLogger("edgefleet.serving")

# Requests and responses up to this size (grpcio's default is 4 MiB, too small for images).
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

_CODES: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    422: grpc.StatusCode.FAILED_PRECONDITION,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


class BindError(Exception):
    """The gRPC port cannot be listened on."""


class InferenceService:
    """The V2 service's methods, each `async (request, context) -> response`."""

    def __init__(self, scorer: Scorer, api_key: str | None) -> None:
        self.scorer = scorer
        self._check_key = key_check(api_key)
        self._server_metadata = messages.ServerMetadataResponse(
            name="edgefleet", version=rest.server_version(), extensions=[])

    async def ServerLive(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        return messages.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        return messages.ServerReadyResponse(ready=self.scorer.table.ready)

    async def ServerMetadata(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        return await _guarded(context, lambda: self._keyed(context, self._server_metadata))

    async def ModelReady(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        async def ready() -> Any:
            self._authorize(context)
            deployment = self.scorer.table.get(request.name)
            if request.version:
                deployment.find(request.version)
            # A name is only routed once its versions are loaded, so found means ready.
            return messages.ModelReadyResponse(ready=True)

        return await _guarded(context, ready)

    async def ModelMetadata(self, request: Any, context: aio.ServicerContext) -> Any:  # noqa: N802
        async def metadata() -> Any:
            self._authorize(context)
            deployment = self.scorer.table.get(request.name)
            chosen = deployment.find(request.version) if request.version else deployment.primary
            return messages.ModelMetadataResponse(**rest.metadata_of(deployment, chosen))

        return await _guarded(context, metadata)

    async def ModelInfer(self, request: Any, context: aio.ServicerContext) -> bytes:  # noqa: N802
        async def infer() -> bytes:
            self._authorize(context)
            call = GrpcCall(request, request.ByteSize())
            answer = await self.scorer.run(request.model_name, request.model_version or None,
                                           call)
            return answer.body

        return await _guarded(context, infer)

    def _authorize(self, context: aio.ServicerContext) -> None:
        self._check_key(_text_metadata(context))

    async def _keyed(self, context: aio.ServicerContext, response: Any) -> Any:
        self._authorize(context)
        return response


def _text_metadata(context: aio.ServicerContext) -> Mapping[str, str]:
    # Keys arrive lower-case; binary ("-bin") values are bytes and carry no key.
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


async def _guarded(context: aio.ServicerContext, work: Callable[[], Awaitable[Any]]) -> Any:
    """WORK's response, or the RPC ended with the status of the ServingError it raised."""
    try:
        return await work()
    except ServingError as e:
        error = e
    except Exception:
        log.exception("unexpected error in a gRPC call")
        error = ServingError("internal error; see the server's log")
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(error, Overloaded):
        trailers = (("retry-after", str(error.retry_after)),)
    await context.abort(_CODES.get(error.status, grpc.StatusCode.UNKNOWN), error.message,
                        trailing_metadata=trailers)


def _handler(service: InferenceService) -> grpc.GenericRpcHandler:
    handlers = {}
    for name, (request_class, response_class) in messages.METHODS.items():
        # ModelInfer's answer is serialized already, in the worker thread.
        serializer = None if name == "ModelInfer" else response_class.SerializeToString
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=request_class.FromString,
            response_serializer=serializer,
        )
    return grpc.method_handlers_generic_handler(messages.SERVICE, handlers)


def create_server(
    scorer: Scorer, api_key: str | None, host: str, port: int
) -> tuple[aio.Server, int]:
    """A gRPC server answering the V2 service, bound to HOST:PORT (0: any free port), not
    started; and the port it bound. BindError when the port is taken."""
    server = aio.server(options=[
        # grpcio sets SO_REUSEPORT by default: a second server could share a busy port.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    server.add_generic_rpc_handlers((_handler(InferenceService(scorer, api_key)),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise BindError(f"cannot listen on {address} for gRPC: {e}") from None
    if bound == 0:
        raise BindError(f"cannot listen on {address} for gRPC")
    return server, bound
