"""Python dependencies per platform: pip's platform tags, its errors, the cache, a real download."""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

import packager.deps
from contract.oci import OCILayout, Platform
from contract.runtimes import RUNTIMES
from packager.deps import (
    DepsError,
    PipDeps,
    PlatformUnavailable,
    UnavailableWheel,
    pip_platform_tags,
)
from packager.layers import deps_layer

ARM64 = Platform("linux", "arm64")
ARMV7 = Platform("linux", "arm", "v7")


def test_each_platform_maps_to_manylinux_tags_up_to_glibc_2_31() -> None:
    assert pip_platform_tags(Platform("linux", "amd64"))[:2] == [
        "manylinux_2_31_x86_64",
        "manylinux_2_30_x86_64",
    ]
    arm64 = pip_platform_tags(ARM64)
    assert {"manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"} <= set(
        arm64
    )
    assert "manylinux_2_34_aarch64" not in arm64
    assert all(tag.endswith("_armv7l") for tag in pip_platform_tags(ARMV7))
    with pytest.raises(PlatformUnavailable, match="no Python wheels are chosen for linux/riscv64"):
        pip_platform_tags(Platform("linux", "riscv64"))


def fake_pip(calls: list[str]) -> object:
    """Stands in for pip install --target: writes what pip writes, host-specific parts included."""

    def install(
        requirements: Sequence[str], platform: Platform, tags: list[str], target: Path, cache: Path
    ) -> None:
        calls.append(str(platform))
        (target / "numpy" / "__pycache__").mkdir(parents=True)
        (target / "numpy" / "__init__.py").write_text("")
        (target / "numpy" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"host")
        (target / "bin").mkdir()
        (target / "bin" / "f2py").write_text("#!/home/someone/.venv/bin/python\n")
        info = target / "numpy-2.0.dist-info"
        info.mkdir()
        (info / "RECORD").write_text(
            "../../bin/f2py,sha256=hostspecific,35\nnumpy/__init__.py,sha256=abc,0\n"
        )

    return install


def test_pip_output_is_normalised_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(packager.deps, "_pip_install", fake_pip(calls))
    deps = PipDeps(tmp_path / "cache")
    tree = deps(RUNTIMES["onnxruntime"].requirements, ARM64)
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")) == [
        "numpy",
        "numpy-2.0.dist-info",
        "numpy-2.0.dist-info/RECORD",
        "numpy/__init__.py",
    ]
    assert (
        tree / "numpy-2.0.dist-info" / "RECORD"
    ).read_text() == "numpy/__init__.py,sha256=abc,0\n"
    assert deps(("numpy", "onnxruntime"), ARM64) == tree
    assert calls == ["linux/arm64"]
    assert deps(RUNTIMES["onnxruntime"].requirements, Platform("linux", "amd64")) != tree
    assert [
        p.name for p in (tmp_path / "cache" / "site-packages").iterdir() if p.name.startswith(".")
    ] == []


def test_the_cache_defaults_to_the_users_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packager.deps, "_pip_install", fake_pip([]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tree = PipDeps()(("numpy",), ARM64)
    assert tree.parent == tmp_path / "edgefleet" / "deps" / "site-packages"


def pip_failing_with(stderr: str) -> object:
    def run(command: list[str], **options: object) -> subprocess.CompletedProcess[str]:
        assert "--only-binary=:all:" in command and "--platform=manylinux2014_armv7l" in command
        return subprocess.CompletedProcess(command, 1, "", stderr)

    return run


def test_a_missing_wheel_names_the_package_and_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        packager.deps.subprocess,
        "run",
        pip_failing_with(
            "WARNING: Location 'file:///x' is ignored\n"
            "ERROR: Could not find a version that satisfies the requirement onnxruntime "
            "(from versions: none)\nERROR: No matching distribution found for onnxruntime\n"
        ),
    )
    with pytest.raises(UnavailableWheel, match="no onnxruntime wheel for linux/arm/v7") as caught:
        PipDeps(tmp_path)(("onnxruntime", "numpy"), ARMV7)
    assert (caught.value.package, caught.value.platform) == ("onnxruntime", ARMV7)
    assert list((tmp_path / "site-packages").iterdir()) == []


def test_a_network_failure_is_not_a_missing_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        packager.deps.subprocess,
        "run",
        pip_failing_with(
            "WARNING: Retrying (Retry(total=4, connect=None)) after connection broken by "
            "'NewConnectionError'\nERROR: No matching distribution found for numpy\n"
        ),
    )
    with pytest.raises(DepsError, match="could not reach the package index"):
        PipDeps(tmp_path)(("numpy",), ARMV7)


@pytest.mark.slow
def test_real_onnxruntime_wheels_for_arm64_and_none_for_armv7(tmp_path: Path) -> None:
    deps = PipDeps(tmp_path / "cache")
    requirements = RUNTIMES["onnxruntime"].requirements
    tree = deps(requirements, ARM64)
    assert (tree / "onnxruntime" / "capi").is_dir()
    assert list(tree.glob("onnxruntime-*.dist-info")) and list(tree.glob("numpy-*.dist-info"))
    assert any(
        p.name.endswith("aarch64-linux-gnu.so") for p in (tree / "onnxruntime" / "capi").iterdir()
    )
    assert not (tree / "bin").exists() and not list(tree.rglob("__pycache__"))
    assert deps(requirements, ARM64) == tree
    # A second, independent install (its own cache) gives the same layer bytes.
    again = PipDeps(tmp_path / "other-cache")(requirements, ARM64)
    first = deps_layer(OCILayout.create(tmp_path / "a"), tree, mtime=0)
    second = deps_layer(OCILayout.create(tmp_path / "b"), again, mtime=0)
    assert first == second
    with tarfile.open(OCILayout(tmp_path / "a").blob_path(first.descriptor.digest)) as tar:
        assert "opt/edgefleet/python/onnxruntime/__init__.py" in tar.getnames()
    with pytest.raises(UnavailableWheel, match="no onnxruntime wheel for linux/arm/v7"):
        deps(requirements, ARMV7)
