"""The CLI's REST client: one place that turns HTTP failures into one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import httpx

from hub.cli.config import Connection

TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class HubClient:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        headers = {"Authorization": f"Bearer {connection.token}"} if connection.token else {}
        self._http = httpx.Client(base_url=connection.hub, headers=headers, timeout=TIMEOUT)

    def _fail(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            body = response.json()
            message = f"{body.get('error', 'error')}: {body.get('detail', '')}"
        except ValueError:
            message = response.text[:200] or response.reason_phrase
        hint = ""
        if response.status_code == 401:
            hint = " (pass --token, set EDGEFLEET_TOKEN or run `edgefleet login`)"
        raise click.ClickException(f"{message}{hint} [HTTP {response.status_code}]")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise click.ClickException(
                f"cannot reach the hub at {self.connection.hub}: {exc}. "
                "Is `edgefleet hub serve` running there?"
            ) from None
        self._fail(response)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs).json()

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    @contextmanager
    def stream(self, path: str) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", path) as response:
                if not response.is_success:
                    response.read()
                    self._fail(response)
                yield response
        except httpx.TransportError as exc:
            raise click.ClickException(
                f"download from {self.connection.hub} failed: {exc}"
            ) from None
