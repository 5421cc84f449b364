"""Eligibility: may this device train right now?

Two halves, so tests and simulators never read the real machine: a *probe* takes a
``DeviceStatus`` snapshot (free memory, battery, charging, metered network, load),
and :func:`check_eligibility` is a pure function of that snapshot and the ``EligibilityRules``.
What the platform does not tell is ``None``, and an unknown value never makes a
device ineligible (a gateway has no battery; most Linux hosts cannot tell whether
their uplink is metered, so that is configured).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker_bridge import Eligibility
from device_profiles import ConfigError

POWER_SUPPLY_DIR = Path("/sys/class/power_supply")


@dataclass(frozen=True, kw_only=True)
class DeviceStatus:
    """A snapshot of what eligibility depends on; ``None`` means the platform does not say."""

    free_memory_mb: float | None = None
    battery_percent: float | None = None
    charging: bool | None = None
    metered: bool | None = None
    load_per_core: float | None = None


@dataclass(frozen=True, kw_only=True)
class EligibilityRules:
    """When a device takes on training work (all off by default except ``allow_metered``)."""

    require_charging: bool = False
    min_battery_percent: float | None = None
    min_free_memory_mb: float | None = None
    allow_metered: bool = True
    require_idle: bool = False
    idle_load_per_core: float = 0.7
    """A device counts as idle while its 1-minute load average per core is below this."""

    def __post_init__(self) -> None:
        if self.min_battery_percent is not None and not 0 <= self.min_battery_percent <= 100:
            raise ConfigError("min_battery_percent must be within 0..100")
        if self.min_free_memory_mb is not None and self.min_free_memory_mb < 0:
            raise ConfigError("min_free_memory_mb must not be negative")
        if not self.idle_load_per_core > 0:
            raise ConfigError("idle_load_per_core must be positive")


StatusProbe = Callable[[], DeviceStatus]


def check_eligibility(status: DeviceStatus, rules: EligibilityRules) -> Eligibility:
    """Apply ``rules`` to ``status``; the reasons say which rule failed, in plain words."""
    reasons: list[str] = []
    if rules.require_charging and status.charging is False:
        reasons.append("not charging")
    if (
        rules.min_battery_percent is not None
        and status.battery_percent is not None
        and status.battery_percent < rules.min_battery_percent
        and status.charging is not True
    ):
        reasons.append(
            f"battery {status.battery_percent:.0f}% below {rules.min_battery_percent:.0f}%"
        )
    if (
        rules.min_free_memory_mb is not None
        and status.free_memory_mb is not None
        and status.free_memory_mb < rules.min_free_memory_mb
    ):
        reasons.append(
            f"free memory {status.free_memory_mb:.0f} MB below {rules.min_free_memory_mb:.0f} MB"
        )
    if not rules.allow_metered and status.metered is True:
        reasons.append("network is metered")
    idle = None if status.load_per_core is None else status.load_per_core < rules.idle_load_per_core
    if rules.require_idle and idle is False:
        reasons.append(f"busy (load {status.load_per_core:.2f} per core)")
    return Eligibility(
        eligible=not reasons,
        reasons=reasons,
        free_memory_mb=status.free_memory_mb,
        battery_percent=status.battery_percent,
        charging=status.charging,
        metered=status.metered,
        idle=idle,
    )


# -- the real machine (Linux; None elsewhere) -------------------------------------------


def _free_memory_mb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _battery(root: Path) -> tuple[float | None, bool | None]:
    """Battery percentage and charging state from ``/sys/class/power_supply``."""
    try:
        supplies = sorted(root.iterdir())
    except OSError:
        return None, None
    percent: float | None = None
    charging: bool | None = None
    mains_online: bool | None = None
    for supply in supplies:
        kind = _read(supply / "type")
        if kind == "Battery" and percent is None:
            capacity = _read(supply / "capacity")
            if capacity is not None:
                try:
                    percent = float(capacity)
                except ValueError:
                    percent = None
            state = _read(supply / "status")
            if state is not None:
                charging = state in ("Charging", "Full")
        elif kind in ("Mains", "USB") and _read(supply / "online") == "1":
            mains_online = True
    if charging is None and percent is not None and mains_online:
        charging = True
    if percent is None and mains_online:  # no battery at all, on mains: power is no concern
        return None, None
    return percent, charging


def _load_per_core() -> float | None:
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    try:
        cores = len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        cores = os.cpu_count() or 1
    return round(load / cores, 3)


@dataclass(frozen=True, kw_only=True)
class SystemProbe:
    """Reads this machine; ``metered`` is not measurable portably, so it is configured."""

    metered: bool | None = None
    power_supply_dir: Path = field(default=POWER_SUPPLY_DIR)

    def __call__(self) -> DeviceStatus:
        percent, charging = _battery(self.power_supply_dir)
        return DeviceStatus(
            free_memory_mb=_free_memory_mb(),
            battery_percent=percent,
            charging=charging,
            metered=self.metered,
            load_per_core=_load_per_core(),
        )
