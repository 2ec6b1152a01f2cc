"""Canonical JSON: the one byte encoding of documents that are hashed or signed.

OCI manifests and indexes (contract/oci.py) and the wire protocol's signed
messages (contract/protocol.py) both use it. Standard library only: the agent's
protocol module imports it at start-up.
"""

from __future__ import annotations

import json


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: the same document gives the same bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
