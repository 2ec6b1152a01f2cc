"""The Open Inference Protocol over gRPC: oip.proto, its compiled descriptor, the
messages, the wire format and the service."""
