"""agent.inventory on this machine, and with runtimes made to look missing or broken."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

from agent import inventory

# This machine's runtimes are all installed and have no accelerator but the CPU.
CPU_ONLY = ["onnxruntime:CPU", "openvino:CPU", "litert:CPU"]


def test_platform_is_this_machines_oci_platform() -> None:
    expected = {"x86_64": "linux/amd64", "aarch64": "linux/arm64", "armv7l": "linux/arm/v7"}
    assert inventory.oci_platform() == expected[platform.machine()]


@pytest.mark.parametrize(
    ("machine", "bits", "expected"),
    [
        ("x86_64", 64, "linux/amd64"),
        ("aarch64", 64, "linux/arm64"),
        ("armv7l", 32, "linux/arm/v7"),
        ("armv6l", 32, "linux/arm/v6"),
        # a Raspberry Pi with a 64-bit kernel and 32-bit Raspberry Pi OS runs arm/v7 packages
        ("aarch64", 32, "linux/arm/v7"),
        ("mips64", 64, "linux/mips64"),
    ],
)
def test_platform_from_machine_and_userland(
    monkeypatch: pytest.MonkeyPatch, machine: str, bits: int, expected: str
) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(inventory, "POINTER_BITS", bits)
    assert inventory.oci_platform() == expected


def test_inventory_describes_this_device_as_json(tmp_path: Path) -> None:
    found = inventory.inventory(tmp_path / "not-created-yet")
    assert json.loads(json.dumps(found)) == found
    assert found["platform"] == inventory.oci_platform()
    assert found["cpu"]["model"] and found["cpu"]["count"] >= 1
    assert 0 < found["memory"]["available_bytes"] <= found["memory"]["total_bytes"]
    assert 0 < found["disk"]["free_bytes"] <= found["disk"]["total_bytes"]
    assert found["accelerators"] == CPU_ONLY
    for name in ["onnxruntime", "openvino", "litert"]:
        assert found["runtimes"][name]["installed"] is True
        assert found["runtimes"][name]["version"]
    assert found["runtimes"]["openvino"]["accelerators"]["openvino:CPU"]  # FULL_DEVICE_NAME


def test_accelerator_list_offers_cpu_on_every_runtime() -> None:
    assert inventory.accelerator_list() == CPU_ONLY


@pytest.mark.parametrize(
    ("runtime", "modules", "extra"),
    [
        ("onnxruntime", ["onnxruntime"], "onnx"),
        ("openvino", ["openvino"], "openvino"),
        ("litert", ["ai_edge_litert.interpreter", "tflite_runtime.interpreter"], "tflite"),
    ],
)
def test_a_missing_runtime_is_reported_absent(
    monkeypatch: pytest.MonkeyPatch, runtime: str, modules: list[str], extra: str
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails
    found = inventory.runtimes()
    assert found[runtime] == {
        "installed": False,
        "error": f"{runtime} is not installed on this device: pip install 'edgefleet[{extra}]'",
    }
    assert inventory.accelerator_list(found) == [a for a in CPU_ONLY if not a.startswith(runtime)]


def test_a_broken_runtime_is_reported_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import openvino

    def no_core() -> None:
        raise RuntimeError("plugins.xml not found")

    monkeypatch.setattr(openvino, "Core", no_core)
    found = inventory.runtimes()
    assert found["openvino"]["installed"] is True
    assert "plugins.xml not found" in found["openvino"]["error"]
    assert inventory.accelerator_list(found) == ["onnxruntime:CPU", "litert:CPU"]


def test_a_device_image_s_class_is_reported_as_facts(tmp_path: Path) -> None:
    from agent import inventory as inv

    info = tmp_path / "image.json"
    info.write_text('{"class": "generic-amd64", "source_date_epoch": 1700000000}')
    found = inv.inventory(tmp_path)
    found["image"] = inv.image_info(info)
    facts = inv.facts(found)
    assert facts["image_class"] == "generic-amd64" and facts["image_built"] == 1700000000
    info.write_text("[not an object")
    assert inv.image_info(info) is None
