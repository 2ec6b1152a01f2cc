"""Tags the hub derives from a device's reported state, so rollouts can target them."""

from __future__ import annotations

from contract.protocol import ReportedState
from hub.ingest import derived_tags


def report(**inventory: str | int) -> ReportedState:
    return ReportedState(device_id="dev-1", applied_generation=0, deployments=(),
                         platform="linux/arm64", accelerators=("onnxruntime:CPU",),
                         agent_version="0.1", inventory=inventory)


def test_a_container_device_is_tagged_with_its_engine() -> None:
    tags = derived_tags(report(container_engine="podman", container_engine_version="4.3.1"))
    assert tags == {"arch": "arm64", "accel.onnxruntime.CPU": "yes",
                    "runtime.container": "podman"}


def test_a_native_device_has_no_container_tag() -> None:
    assert "runtime.container" not in derived_tags(report(cpu_count=4))
