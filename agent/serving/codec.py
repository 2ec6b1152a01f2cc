"""Wire framing of the Open Inference Protocol's binary tensor data extension.

A request or response body is a JSON header, optionally followed by raw
tensor bytes; the `Inference-Header-Content-Length` HTTP header says where the
JSON ends. Each binary tensor's size is in its `parameters.binary_data_size`,
and tensors follow one another in the order they are listed. BYTES elements
are each a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from agent.serving.errors import BadRequest, PayloadTooLarge
from contract.jsondepth import nests_deeper

HEADER_LENGTH = "Inference-Header-Content-Length"

MAX_JSON_DEPTH = 40  # the request, its inputs, a tensor of numpy's 32 dimensions, and room
# Parsed JSON takes ~27 times its size (24 MiB of numbers peaked at +644 MiB), binary
# tensor data about once: the JSON part of a body has a limit of its own.
MAX_JSON_BYTES = 8 << 20
_LENGTH = struct.Struct("<I")


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header of a request body and the binary section after it."""
    end = len(body)
    if header_length is not None:
        try:
            end = int(header_length)
        except ValueError:
            end = -1
        if not 0 <= end <= len(body):
            raise BadRequest(
                f"{HEADER_LENGTH} is {header_length!r}; it must be the size in bytes of the"
                f" JSON header, between 0 and the body's {len(body)} bytes"
            )
    if end > MAX_JSON_BYTES:
        raise PayloadTooLarge(
            f"the request's JSON is {end} bytes; this server parses at most {MAX_JSON_BYTES}:"
            " send large tensors as binary data (the binary_tensor_data extension)")
    text = body if end == len(body) else body[:end]
    if nests_deeper(text, MAX_JSON_DEPTH):
        raise BadRequest(f"the inference request nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        # orjson: 3-5x the stdlib reader on a JSON tensor. It accepts a subset of what
        # the stdlib does (no NaN, no integers past 64 bits, no lone surrogates), so
        # what it refuses goes to the stdlib reader, which accepts or words the error.
        header = orjson.loads(text)
    except orjson.JSONDecodeError:
        header = _stdlib_loads(text)
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    return header, memoryview(body)[end:]


def _stdlib_loads(text: bytes) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"malformed JSON in the inference request: {e}") from None


def _not_json(constant: str) -> float:
    raise BadRequest(f"{constant} is not JSON; send non-finite numbers as binary tensor data")


def join_body(header: dict[str, Any], blobs: Sequence[bytes]) -> tuple[bytes, dict[str, str]]:
    """A response body and its content headers: plain JSON unless there are binary tensors."""
    head = orjson.dumps(header)  # compact, like json.dumps(separators=(",", ":")), ~5x faster
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(head)),
    }


def decode_bytes(chunk: memoryview, count: int, where: str) -> np.ndarray:
    """COUNT length-prefixed elements filling CHUNK exactly, as an object array of bytes."""
    elements = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + _LENGTH.size > len(chunk):
            raise BadRequest(f"{where}: BYTES data ends after {i} of {count} elements")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += _LENGTH.size
        if offset + length > len(chunk):
            raise BadRequest(
                f"{where}: BYTES element {i} claims {length} bytes but only"
                f" {len(chunk) - offset} remain"
            )
        elements[i] = bytes(chunk[offset : offset + length])
        offset += length
    if offset != len(chunk):
        raise BadRequest(
            f"{where}: {len(chunk) - offset} bytes left over after {count} BYTES elements"
        )
    return elements


def encode_bytes(array: np.ndarray) -> bytes:
    """Length-prefixed elements of a str/bytes array, in row-major order (str as UTF-8)."""
    parts = []
    for item in array.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)
