"""Eligibility: a pure function of a status snapshot and the rules; the Linux probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_profiles import ConfigError
from edge_runtime import DeviceStatus, EligibilityRules, SystemProbe, check_eligibility


def test_defaults_accept_anything_and_unknowns_never_exclude() -> None:
    result = check_eligibility(DeviceStatus(), EligibilityRules(
        require_charging=True, min_battery_percent=50, min_free_memory_mb=100,
        allow_metered=False, require_idle=True))
    assert result.eligible and result.reasons == []
    assert result.idle is None


@pytest.mark.parametrize(
    ("status", "rules", "reason"),
    [
        (DeviceStatus(charging=False), EligibilityRules(require_charging=True), "not charging"),
        (DeviceStatus(battery_percent=10, charging=False),
         EligibilityRules(min_battery_percent=30), "battery 10% below 30%"),
        (DeviceStatus(free_memory_mb=50), EligibilityRules(min_free_memory_mb=200),
         "free memory 50 MB below 200 MB"),
        (DeviceStatus(metered=True), EligibilityRules(allow_metered=False), "metered"),
        (DeviceStatus(load_per_core=1.5), EligibilityRules(require_idle=True), "busy"),
    ],
)
def test_each_rule_says_why(status: DeviceStatus, rules: EligibilityRules, reason: str) -> None:
    result = check_eligibility(status, rules)
    assert not result.eligible
    assert any(reason in r for r in result.reasons), result.reasons


def test_low_battery_is_fine_while_charging() -> None:
    status = DeviceStatus(battery_percent=10, charging=True, load_per_core=0.1)
    result = check_eligibility(status, EligibilityRules(min_battery_percent=30, require_idle=True))
    assert result.eligible and result.idle is True and result.charging is True


def test_rules_are_checked() -> None:
    with pytest.raises(ConfigError):
        EligibilityRules(min_battery_percent=120)
    with pytest.raises(ConfigError):
        EligibilityRules(idle_load_per_core=0)


def _supply(root: Path, name: str, **files: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    for key, value in files.items():
        (d / key).write_text(value + "\n")


def test_system_probe_reads_power_supply(tmp_path: Path) -> None:
    _supply(tmp_path, "BAT0", type="Battery", capacity="57", status="Discharging")
    _supply(tmp_path, "AC", type="Mains", online="0")
    status = SystemProbe(power_supply_dir=tmp_path, metered=True)()
    assert status.battery_percent == 57.0 and status.charging is False
    assert status.metered is True
    assert status.free_memory_mb is None or status.free_memory_mb > 0
    assert status.load_per_core is None or status.load_per_core >= 0


def test_system_probe_without_battery_reports_none(tmp_path: Path) -> None:
    _supply(tmp_path, "AC", type="Mains", online="1")
    status = SystemProbe(power_supply_dir=tmp_path)()
    assert status.battery_percent is None and status.charging is None
    missing = SystemProbe(power_supply_dir=tmp_path / "absent")()
    assert missing.battery_percent is None and missing.metered is None
