"""What the serving process is asked to load for a saved version (agent/state.py).

Used by updates (agent/updates.py) and by the daemon's reloads of what serves
(agent/daemon.py: a restart, a crashed serving process, a route change), which
therefore do not load the update code.
"""

from __future__ import annotations

from pathlib import Path

from agent.serving.body import DeploymentBody, RuntimeSettings, VersionBody
from agent.state import Installed, Serving
from contract.sketch import SketchSpec


def version_body(installed: Installed, *, self_test: bool = False) -> VersionBody:
    """The serving process's description of one version to load."""
    return VersionBody(
        version=str(installed.version),
        model_dir=Path(installed.directory) / "model",
        entrypoint=installed.entrypoint,
        framework=installed.framework,
        runtime=RuntimeSettings(prefer=tuple(installed.prefer or installed.package_prefer)),
        self_test=(installed.sample_request or None) if self_test else None,
        batching=installed.batching,
        sketch=None if installed.sketch is None else SketchSpec.from_json(installed.sketch),
    )


def deployment_body(serving: Serving) -> DeploymentBody:
    """What SERVING asks of the serving process; a shadow's traffic is its copy rate."""
    if serving.candidate is None:
        return DeploymentBody(version_body(serving.primary))
    return DeploymentBody(version_body(serving.primary), version_body(serving.candidate),
                          traffic=serving.traffic, shadow=serving.shadow)
