"""A deployment's settings (contract/settings.py): what users type, range-checked, and the
JSON the desired state carries. Hostile values are one-line SettingsErrors."""

from __future__ import annotations

from typing import Any

import pytest

from contract.settings import (
    Batching,
    Resources,
    Settings,
    SettingsError,
    effective_batching,
    format_cpus,
    format_memory,
    parse_accelerator,
    parse_cpus,
    parse_memory,
)


@pytest.mark.parametrize("text, millis", [("0.5", 500), ("2", 2000), ("500m", 500), (1.25, 1250),
                                          (4, 4000), ("0.01", 10)])
def test_cpus_in_cores_or_millicores(text: Any, millis: int) -> None:
    assert parse_cpus(text) == millis


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0", "0.0001", "1e3", "1,5", "٣", "",
                                  "0.005", "99999999", "5m", "1.5m", True, 0.1 + 0.2, "0x10", " 1"])
def test_hostile_cpus_are_one_line_errors(text: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_cpus(text)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("cpus")


@pytest.mark.parametrize("text, size", [("512Mi", 512 * 2**20), ("1Gi", 2**30), ("1G", 10**9),
                                        ("16777216", 2**24), (2**30, 2**30), ("1.5Gi", 3 * 2**29),
                                        ("500M", 5 * 10**8)])
def test_memory_in_bytes_or_units(text: Any, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["1", "15Mi", "-5Mi", "1.5", "1e9", "lots", "1Ei", "2Pi",
                                  "99999999999999999Pi", "0.5Ki", "512 Mi", "512mi", True, ""])
def test_hostile_memory_is_a_one_line_error(text: Any) -> None:
    with pytest.raises(SettingsError, match=r"^memory"):
        parse_memory(text)


def test_accelerators() -> None:
    assert parse_accelerator("nvidia.com/gpu=1") == ("nvidia.com/gpu", 1)
    assert parse_accelerator("gpu.intel.com/i915=0") == ("gpu.intel.com/i915", 0)
    for bad in ("gpu=1", "nvidia.com/gpu=-1", "nvidia.com/gpu=65", "nvidia.com/gpu",
                "NVIDIA.com/gpu=1", "nvidia.com/=1", "nvidia.com/gpu=1e2"):
        with pytest.raises(SettingsError, match="accelerator"):
            parse_accelerator(bad)
    with pytest.raises(SettingsError, match="at most 8 kinds"):
        Resources(accelerators=tuple((f"x.io/r{i}", 1) for i in range(9)))
    with pytest.raises(SettingsError, match="each name once"):
        Resources(accelerators=(("b.io/x", 1), ("a.io/x", 1)))


def test_batching_text_and_ranges() -> None:
    assert Batching.parse("32:2") == Batching(32, 2)
    assert Batching.parse("32") == Batching(32, 0)
    assert Batching.parse("off") == Batching.OFF == Batching(1)
    assert str(Batching(32, 2)) == "32:2" and str(Batching.OFF) == "off"
    assert not Batching.OFF.enabled and Batching(2).enabled
    for bad in ("0", "5000", "32:-1", "32:2000", "x", "1:5", "٣", "32:2:1", ""):
        with pytest.raises(SettingsError, match="batching"):
            Batching.parse(bad)


def test_precedence_deployment_then_package_then_off() -> None:
    on, package = Batching(32, 2), Batching(8)
    assert effective_batching(on, package) == on
    assert effective_batching(None, package) == package
    assert effective_batching(None, None) is None
    assert effective_batching(Batching.OFF, package) is None  # the deployment turned it off


def test_json_round_trip_strict_and_shown() -> None:
    settings = Settings(Resources(500, 512 * 2**20, (("nvidia.com/gpu", 1),)), Batching(32, 2))
    assert Settings.from_json(settings.to_json()) == settings
    assert Settings().to_json() == {}
    assert settings.shown() == {"resources": {"cpus": "0.5", "memory": "512Mi",
                                              "accelerators": {"nvidia.com/gpu": 1}},
                                "batching": {"max_batch_size": 32, "max_delay_ms": 2}}
    assert Settings(batching=Batching.OFF).shown()["batching"] == "off"
    for bad, complaint in [([], "settings: expected an object"),
                           ({"cpus": 1}, "settings.cpus: unknown field"),
                           ({"resources": {"cpu_millis": "500"}}, "expected an integer"),
                           ({"resources": {"accelerators": []}}, "object of counts"),
                           ({"batching": {"max_delay_ms": 2}}, "max_batch_size: required")]:
        with pytest.raises(SettingsError, match=complaint):
            Settings.from_json(bad)


def test_formats() -> None:
    assert [format_cpus(m) for m in (500, 2000, 1250, 10)] == ["0.5", "2", "1.25", "0.01"]
    assert [format_memory(b) for b in (512 * 2**20, 2**30, 10**9, 3 * 2**29)] == [
        "512Mi", "1Gi", "1G", "1536Mi"]
