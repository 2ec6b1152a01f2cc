"""pyproject.toml's extras agree with the runtime table (contract/runtimes.py), and a device
install brings no model-file parser or converter."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from contract.runtimes import RUNTIMES, Runtime
from packager.deps import PIP_ARCHITECTURES

PROJECT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]


def requirement_names(extras: list[str]) -> set[str]:
    """The distributions `pip install 'edgefleet[EXTRAS]'` asks for, extras of extras included."""
    found = {_name(r) for r in PROJECT["dependencies"]}
    pending = list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in PROJECT["optional-dependencies"][extra]:
            nested = re.fullmatch(r"edgefleet\[(.+)\]", requirement)
            if nested:
                pending += nested.group(1).split(",")
            else:
                found.add(_name(requirement))
    return found


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


@pytest.mark.parametrize("runtime", RUNTIMES.values(), ids=lambda r: r.name)
def test_each_runtime_extra_installs_what_its_packages_carry(runtime: Runtime) -> None:
    extra = {_name(r) for r in PROJECT["optional-dependencies"][runtime.extra]}
    assert extra == set(runtime.requirements)
    assert set(runtime.platforms) <= set(PIP_ARCHITECTURES)


@pytest.mark.parametrize("runtime", RUNTIMES.values(), ids=lambda r: r.name)
def test_a_device_install_brings_no_model_file_parser_or_converter(runtime: Runtime) -> None:
    device = requirement_names(["agent", runtime.extra])
    assert not device & {"onnx", "flatbuffers", "skl2onnx", "onnxconverter-common"}


def test_the_hub_installs_the_model_file_readers() -> None:
    assert {"onnx", "flatbuffers"} <= requirement_names(["hub"])
