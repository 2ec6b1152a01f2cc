"""The V2 gRPC messages as Python classes, built from oip.proto's compiled descriptor.

The classes live in a descriptor pool of their own, so a process that also
imports another copy of the V2 messages (tritonclient's) has no name clash,
and any protobuf runtime that reads descriptors (4.x and later) serves.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pool, message_factory

from agent.serving.oip.descriptor import SERIALIZED

SERVICE: Final = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
_pool.AddSerializedFile(SERIALIZED)


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")

# method -> (request class, response class), as the service declares them
METHODS: Final[dict[str, tuple[Any, Any]]] = {
    method.name: (_message(method.input_type.name), _message(method.output_type.name))
    for method in _pool.FindServiceByName(SERVICE).methods
}
