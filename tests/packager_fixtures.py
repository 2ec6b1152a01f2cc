"""Helpers for the packager tests: a tiny real model, packages built without PyPI, and the
skopeo/umoci command lines that check them from outside."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from contract.oci import Platform
from modelgen import make_onnx
from packager.build import BuildResult, build_package
from packager.deps import UnavailableWheel
from packager.modelfile import inspect_model

EPOCH = 1_700_000_000
NAME, VERSION = "diabetes", 2

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")


def model_files(directory: Path) -> dict[str, Path]:
    """A real ONNX model plus a file in a subdirectory, as a registered version may have."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = directory / "labels.txt"
    labels.write_text("low\nhigh\n")
    return {"model.onnx": make_onnx(directory / "model.onnx"), "assets/labels.txt": labels}


def build(layout: Path, files: dict[str, Path], **options: Any) -> BuildResult:
    """build_package with the test's model, a fixed epoch and, unless told otherwise, no deps."""
    arguments: dict[str, Any] = {
        "name": NAME,
        "version": VERSION,
        "files": files,
        "info": inspect_model(files),
        "deps": None,
        "source_date_epoch": EPOCH,
    }
    return build_package(layout, **(arguments | options))


class FakeDeps:
    """A deps provider that writes a small tree per platform instead of calling pip.

    Platforms in MISSING have no wheel, like onnxruntime on linux/arm/v7.
    """

    def __init__(self, root: Path, *, missing: Sequence[str] = ()) -> None:
        self.root = root
        self.missing = set(missing)
        self.calls: list[tuple[tuple[str, ...], str]] = []

    def __call__(self, requirements: Sequence[str], platform: Platform) -> Path:
        self.calls.append((tuple(requirements), str(platform)))
        if str(platform) in self.missing:
            raise UnavailableWheel(requirements[0], platform)
        tree = self.root / str(platform).replace("/", "-")
        (tree / "fakeruntime").mkdir(parents=True, exist_ok=True)
        (tree / "fakeruntime" / "__init__.py").write_text(f"PLATFORM = {str(platform)!r}\n")
        (tree / "fakeruntime" / "native.so").write_bytes(str(platform).encode() * 1000)
        return tree


def run(*command: str | Path) -> str:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def skopeo(*args: str | Path) -> str:
    # The containers policy file is machine configuration; local copies need no policy.
    return run("skopeo", "--insecure-policy", *args)


def unpack_platform(layout: Path, tag: str, bundle: Path, *, arch: str, variant: str = "") -> Path:
    """The root filesystem of one platform's image, as a container runtime would see it.

    umoci unpacks a single manifest, so skopeo first copies that platform's image out of the index.
    """
    single = bundle.with_name(bundle.name + "-image")
    override = ["--override-arch", arch] + (["--override-variant", variant] if variant else [])
    skopeo("copy", *override, f"oci:{layout}:{tag}", f"oci:{single}:{tag}")
    run("umoci", "unpack", "--rootless", "--image", f"{single}:{tag}", bundle)
    return bundle / "rootfs"
