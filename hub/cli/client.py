"""The CLI's REST client: one place that turns HTTP failures into one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click
import httpx

from hub.cli.config import Connection
from hub.cli.output import printable

if TYPE_CHECKING:
    from packager.distribution import Registry

TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# A hub answers its health check at once; something that takes longer is not a hub
# (an MQTT broker, say, reads the request and never answers).
PROBE_TIMEOUT = httpx.Timeout(5.0)


def _quoted(path: str) -> str:
    """PATH with every name in it percent-encoded: paths are built from names users
    and devices chose (a file 'a#b' or 'x?y'), never from encoded text, and queries
    go as params."""
    return quote(path, safe="/")


class HubClient:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        headers = {"Authorization": f"Bearer {connection.token}"} if connection.token else {}
        self._http = httpx.Client(base_url=connection.hub, headers=headers, timeout=TIMEOUT,
                                  verify=connection.verify())
        self._probed = False

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _fail(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        if response.status_code == 401 and not self.connection.token:
            # The hub's own message explains the HTTP header; the CLI user needs the flags.
            raise click.ClickException(
                "no API token: pass --token, set EDGEFLEET_TOKEN or run `edgefleet login` "
                "[HTTP 401]")
        try:
            body = response.json()
            message = f"{body.get('error', 'error')}: {body.get('detail', '')}"
        except ValueError:
            message = response.text[:200] or response.reason_phrase
        # The hub's messages quote names and values users and devices chose.
        raise click.ClickException(f"{printable(message)} [HTTP {response.status_code}]")

    def _unreachable(self, exc: httpx.TransportError) -> click.ClickException:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return click.ClickException(
                f"the certificate of {self.connection.hub} is not trusted "
                f"({printable(str(exc))}): give the hub's CA with `edgefleet login --ca "
                "DATA/tls/ca.pem` or EDGEFLEET_CA (the hub prints where it is)")
        return click.ClickException(
            f"cannot reach the hub at {self.connection.hub}: {printable(str(exc))}. "
            "Is `edgefleet hub serve` running there?")

    def _probe(self) -> None:
        """Check once, quickly, that a hub answers at the URL, so that a wrong URL fails
        in seconds with one line instead of a timeout or a misleading 404."""
        if self._probed:
            return
        url = self.connection.hub
        try:
            response = self._http.get("/api/v1/health", timeout=PROBE_TIMEOUT)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from None
        except httpx.TransportError as exc:  # connected, but no HTTP answer came back
            why = f"no answer within {PROBE_TIMEOUT.read:.0f} s" \
                if isinstance(exc, httpx.TimeoutException) else printable(str(exc))
            raise click.ClickException(
                f"{url} does not answer HTTP like an edgefleet hub ({why}); is that the hub's "
                "REST API (default port 8080) and not its MQTT broker?") from None
        try:
            healthy = response.json().get("status") == "ok"
        except (ValueError, AttributeError):
            healthy = False
        if not healthy:
            raise click.ClickException(
                f"{url} answers HTTP {response.status_code} to /api/v1/health but is not an "
                "edgefleet hub; check --hub (e.g. http://127.0.0.1:8080)")
        self._probed = True

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self._probe()
        if isinstance(kwargs.get("params"), dict):
            # httpx would send an unset option as "name=", which the hub reads as a value.
            kwargs["params"] = {k: v for k, v in kwargs["params"].items() if v is not None}
        try:
            response = self._http.request(method, _quoted(path), **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        self._fail(response)
        return response

    def registry(self) -> Registry:
        """A client of the hub's OCI registry (the packager's), once the hub has answered."""
        from packager.distribution import Registry

        self._probe()
        return Registry(self.connection.hub, self.connection.token,
                        verify=self.connection.verify())

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs).json()

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    @contextmanager
    def follow(self, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A long answer read as it comes (an event stream): errors the hub answered are
        one-line errors, but a connection that fails or drops raises httpx's
        TransportError, for the caller to reconnect."""
        self._probe()
        with self._http.stream("GET", _quoted(path), **kwargs) as response:
            if not response.is_success:
                response.read()
                self._fail(response)
            yield response

    @contextmanager
    def stream(self, path: str) -> Iterator[httpx.Response]:
        self._probe()
        try:
            with self._http.stream("GET", _quoted(path)) as response:
                if not response.is_success:
                    response.read()
                    self._fail(response)
                yield response
        except httpx.TransportError as exc:
            raise click.ClickException(
                f"download from {self.connection.hub} failed: {printable(str(exc))}"
            ) from None
