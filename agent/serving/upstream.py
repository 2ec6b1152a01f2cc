"""A version served by another edgefleet serving process on loopback: container mode's proxy.

In container mode the device's one scoring address stays this serving
process (the front); each version runs in its own container on a private
loopback port. The front routes, self-tests, counts and drains an upstream
version exactly like one it loaded, so a switch between containers drops
no request and A/B splits and shadows work unchanged. `infer` sends the
tensors the front has already checked to the container with the binary
tensor extension and reads the outputs back, checked against the
signature the container announced when the front connected.

Connections are kept alive, one per worker thread; one that the container
closed while idle is opened again once.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from collections.abc import Mapping

import numpy as np

from agent.runtimes.base import ModelRuntimeError
from agent.serving import codec, tensors
from agent.serving.errors import ServingError
from contract.tensors import Signature

TIMEOUT = 60.0


class UpstreamModel:
    """A LoadedModel (agent/runtimes/base.py) whose inference runs in a container."""

    fallback_reason: str | None = None

    def __init__(self, url: str, api_key: str | None, timeout: float = TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._path = parts.path
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[http.client.HTTPConnection] = []
        status, _, data = self._send("GET", self._path, None, {})
        if status != 200:
            raise ModelRuntimeError(f"{url} answered {status}: {_error(data)}")
        try:
            metadata = json.loads(data)
            self.signature = Signature.from_dict(metadata)
            # "platform" is RUNTIME_FRAMEWORK (agent/serving/app.py)
            self.runtime = str(metadata["platform"]).rpartition("_")[0] or "unknown"
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelRuntimeError(f"{url} answered unreadable metadata: {exc}") from None
        self.device = f"container:{self._port}"
        # The container's outputs are read as a request's inputs of this signature.
        self._outputs = Signature(inputs=self.signature.outputs, outputs=())

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries, blobs = tensors.encode_outputs(
            tensors.Request(None, dict(inputs), None, binary_outputs=True), inputs)
        body, headers = codec.join_body(
            {"inputs": entries, "parameters": {"binary_data_output": True}}, blobs)
        status, answer_headers, data = self._send("POST", self._path + "/infer", body, headers)
        if status != 200:
            raise ModelRuntimeError(f"the container answered {status}: {_error(data)}")
        try:
            header, binary = codec.split_body(data, answer_headers.get(codec.HEADER_LENGTH))
            outputs = tensors.parse_request({"inputs": header.get("outputs")}, binary,
                                            self._outputs)
        except ServingError as exc:
            raise ModelRuntimeError(f"the container's answer does not fit its signature: "
                                    f"{exc.message}") from None
        return outputs.inputs

    def close(self) -> None:
        with self._lock:
            for connection in self._open:
                connection.close()
            self._open.clear()

    def _send(self, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, bytes]:
        connection = self._connection()
        for attempt in (1, 2):
            reused = connection.sock is not None
            try:
                connection.request(method, path, body=body, headers={**self._headers, **headers})
                response = connection.getresponse()
                return response.status, response.headers, response.read()
            except (http.client.HTTPException, OSError) as exc:
                connection.close()
                if attempt == 1 and reused:
                    continue  # closed by the container while idle: once more on a new one
                raise ModelRuntimeError(f"cannot reach {self.url}: {exc}") from None
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's connection (http.client opens it again by itself once closed)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.connection = connection
            with self._lock:
                self._open.append(connection)
        return connection


def _error(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")


def connect(url: str, api_key: str | None) -> UpstreamModel:
    """The version at URL (see body.UPSTREAM_PATTERN); ModelRuntimeError if it does not answer."""
    return UpstreamModel(url, api_key)

