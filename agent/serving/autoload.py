"""`edgefleet serve --load NAME:VERSION`: load the package this image carries, at start.

In Kubernetes mode no agent sits next to the serving pod to drive its
control socket, and none needs to: the pod's image *is* the package (its
model and serving layers are the image's files, pulled by the signed digest
and checked by the container runtime). So the serving process loads the
model named by the image's serving.json (`EDGEFLEET_SERVING`, set in the
image config by the packager) as deployment NAME, version VERSION, and runs
the package's sample request on it before its scoring API starts answering:
`/v2/health/ready` (the pod's readiness probe) only succeeds once the
self-test has passed (and with `--batching`, `EDGEFLEET_SERVE_BATCHING`, the
deployment's batching, refused like a control body's on a model that
cannot), and a failing load or self-test exits the process (non-zero),
which Kubernetes shows as a crash loop. With `--sketch`
(`EDGEFLEET_SERVE_SKETCH`: the version's drift bins, contract/sketch.py's
JSON) it counts what it answers into them, as a control body's `sketch` does;
the agent reads the counts from `/metrics/sketches` (agent/kube/scrape.py).
The Deployment sets `EDGEFLEET_SERVE_LOAD` (and `EDGEFLEET_SERVE_BATCHING`,
`EDGEFLEET_SERVE_SKETCH` when the deployment has them); nothing is fetched at
run time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from agent.serving.body import (
    NAME_PATTERN,
    DeploymentBody,
    RuntimeSettings,
    VersionBody,
)
from contract.errors import PackageError
from contract.layers import SERVING_FILE
from contract.serving import read_serving
from contract.settings import Batching, SettingsError, effective_batching
from contract.sketch import SketchError, SketchSpec

ENV: str = "EDGEFLEET_SERVE_LOAD"
SERVING_ENV: str = "EDGEFLEET_SERVING"   # the image config's: where serving.json is
DEFAULT_SERVING: str = f"/{SERVING_FILE}"


class AutoloadError(ValueError):
    """What to load cannot be read; one line."""


@dataclass(frozen=True)
class Autoload:
    name: str
    version: str
    serving_file: Path
    batching: Batching | None = None  # the deployment's (--batching); None: the package's
    sketch: SketchSpec | None = None   # the version's drift bins (--sketch); None: none

    @classmethod
    def parse(cls, text: str, serving_file: Path, batching: str | None = None,
              sketch: str | None = None) -> Autoload:
        """NAME:VERSION as --load takes it; BATCHING as --batching does (SIZE:DELAY_MS, off);
        SKETCH as --sketch does (contract/sketch.py's JSON)."""
        name, sep, version = text.partition(":")
        if not sep or not re.fullmatch(NAME_PATTERN, name) \
                or not re.fullmatch(NAME_PATTERN, version):
            raise AutoloadError(f"--load {text[:80]!r} is not NAME:VERSION")
        try:
            chosen = None if batching is None else Batching.parse(batching)
        except SettingsError as exc:
            raise AutoloadError(f"--batching: {exc}") from None
        try:
            bins = None if sketch is None else SketchSpec.from_json(json.loads(sketch))
        except json.JSONDecodeError:
            raise AutoloadError("--sketch: not JSON") from None
        except SketchError as exc:
            raise AutoloadError(f"--sketch: {exc}") from None
        return cls(name, version, serving_file, chosen, bins)

    def body(self) -> DeploymentBody:
        """The control body that loads and self-tests this image's model."""
        try:
            serving = read_serving(self.serving_file.read_bytes())
        except (OSError, PackageError) as exc:
            raise AutoloadError(f"cannot read {self.serving_file}: {exc}") from None
        given = serving.get("batching")  # the package's default, where serving.json has one
        try:
            package = None if given is None else Batching.from_json(given)
        except SettingsError as exc:
            raise AutoloadError(f"{self.serving_file}: {exc}") from None
        return DeploymentBody(VersionBody(
            version=self.version, model_dir=self.serving_file.parent / "model",
            entrypoint=serving["entrypoint"], framework=serving["framework"],
            runtime=RuntimeSettings(prefer=tuple(serving.get("prefer") or ())),
            self_test=serving.get("sample_request"),
            batching=effective_batching(self.batching, package),
            sketch=self.sketch,
        ))
