"""The agent as an OCI image, built by the packager's own code from a real Debian base
(mmdebstrap, cached in ~/.cache/edgefleet/bases) and real wheels (cached): reproducible
(two builds, one index digest), signed like a package, running `edgefleet agent run`."""

from __future__ import annotations

import json
import tarfile
import tomllib
from pathlib import Path

import pytest

from contract.cosign import verify_signature
from contract.errors import PackageError, VerificationError
from contract.oci import OCILayout, parse_index, parse_manifest, read_blob
from contract.signing import generate_private_key
from packager import agent_image

ROOT = Path(__file__).resolve().parent.parent


def test_the_requirements_are_the_agents_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {*project["dependencies"], *project["optional-dependencies"]["agent"]}
    assert set(agent_image.AGENT_REQUIREMENTS) == wanted


def test_unknown_runtimes_are_refused() -> None:
    with pytest.raises(PackageError, match="unknown runtime 'tensorrt'"):
        agent_image.requirements(["tensorrt"])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two builds on a loaded machine
def test_the_agent_image_is_reproducible_signed_and_runs_the_agent(tmp_path: Path) -> None:
    key = generate_private_key()
    first = agent_image.build_agent_image(tmp_path / "a", ["linux/amd64"], epoch=1_700_000_000,
                                          key=key)
    again = agent_image.build_agent_image(tmp_path / "b", ["linux/amd64"], epoch=1_700_000_000)
    assert first.index.digest == again.index.digest

    store = OCILayout(tmp_path / "a")
    verify_signature(store, first.index.digest, key.public_key(),
                     repository=agent_image.REPOSITORY)
    with pytest.raises(VerificationError):
        verify_signature(store, first.index.digest, generate_private_key().public_key())

    [image] = parse_index(read_blob(store, first.index, what="index"), what="index")
    manifest = parse_manifest(read_blob(store, image, what="manifest"), what="manifest")
    config = json.loads(read_blob(store, manifest.config, what="config"))
    assert config["architecture"] == "amd64"
    assert config["config"]["Entrypoint"] == ["python3", "-m", "edgefleet", "agent", "run"]
    assert "--enrollment-file" in config["config"]["Cmd"]
    with store.open(manifest.layers[-1].digest) as blob, \
            tarfile.open(fileobj=blob, mode="r:gz") as tar:
        names = set(tar.getnames())
    assert "opt/edgefleet/python/agent/cli.py" in names
    assert "opt/edgefleet/python/packager/distribution.py" in names
    assert not any(n.startswith("opt/edgefleet/python/hub/") for n in names)
