"""The pipeline's way to the hub: the `edgefleet` CLI for what it does (build, roll out,
watch), the REST API for reads and registration. Nothing else of edgefleet's is used."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

# The CLI of the checkout the pipeline runs from (`pip install` puts the same on PATH).
EDGEFLEET = (sys.executable, "-m", "edgefleet")


class HubError(RuntimeError):
    """The hub refused a request, or a CLI command failed; the text says why."""


@dataclass(frozen=True)
class Hub:
    url: str
    token: str

    def _client(self) -> httpx.Client:
        # A hub with its own CA: EDGEFLEET_CA names it, as for the CLI.
        ca = os.environ.get("EDGEFLEET_CA")
        return httpx.Client(base_url=self.url, timeout=60,
                            verify=ssl.create_default_context(cafile=ca) if ca else True,
                            headers={"Authorization": f"Bearer {self.token}"})

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            with self._client() as client:
                answer = client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise HubError(f"cannot reach the hub at {self.url}: {exc}") from None
        if answer.status_code >= 400:
            raise HubError(f"{method} {path}: {answer.status_code} {answer.text[:500]}")
        return answer.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def cli(self, *args: str, echo: bool = False) -> subprocess.CompletedProcess[str]:
        """Run `edgefleet ARGS` against this hub; ECHO: its output goes to ours as it comes."""
        # The token goes by environment: a command line is visible to every local user.
        env = {**os.environ, "EDGEFLEET_HUB": self.url, "EDGEFLEET_TOKEN": self.token}
        return subprocess.run([*EDGEFLEET, *args], text=True, env=env, check=False,
                              stdout=None if echo else subprocess.PIPE,
                              stderr=None if echo else subprocess.PIPE)

    def cli_json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        if done.returncode != 0:
            raise HubError(f"edgefleet {' '.join(args)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-1000:]}")
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise HubError(f"edgefleet {' '.join(args)} printed no JSON: "
                           f"{done.stdout[-500:]!r}") from None

    def register(self, model: str, files: dict[str, Path], *, metrics: dict[str, float],
                 lineage: dict[str, Any], tags: dict[str, str], description: str) -> Any:
        """Upload FILES (name -> path) and register them as MODEL's next version."""
        refs = []
        for name, path in files.items():
            blob = self.request("POST", "/api/v1/blobs", content=path.read_bytes())
            refs.append({"path": name, "digest": blob["digest"]})
        return self.request("POST", f"/api/v1/models/{model}/versions", json={
            "files": refs, "metrics": metrics, "lineage": lineage, "tags": tags,
            "description": description})

    def telemetry(self, device_id: str, since: datetime) -> list[dict[str, Any]]:
        """DEVICE_ID's raw inference points since SINCE."""
        rows: list[dict[str, Any]] = self.get(
            f"/api/v1/devices/{device_id}/telemetry", since=since.isoformat(),
            kind="inference", resolution="raw", limit=100_000)
        return rows
