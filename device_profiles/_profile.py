"""The device profile: what a device can compute, store and send, and when it is online.

A profile is a frozen, keyword-only dataclass that round-trips through TOML and JSON
so that the same description serves the bundled catalogue, ``fleetlearn profile``
output, the simulator and the aggregator's scheduler.

Compute model (kept deliberately small so it can be calibrated by one measurement):
one optimizer step on a batch of ``b`` samples of a model needing ``F`` training FLOPs
per sample takes ``step_overhead_ms / 1000 + b * F / (gflops * 1e9)`` seconds, where
``gflops`` is the device's sustained FP32 throughput for small-model training on its
CPU. A measured step time for a reference model (``measured_step_ms``) overrides the
estimate in the cost model.

Why this module is longer than 400 lines: a profile's fields, their validation and
its TOML/dict forms are one record's definition.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import numpy as np

from device_profiles._errors import ProfileError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_DAY_S = 86_400.0


class PowerSource(StrEnum):
    """Where a device's energy comes from; battery and solar devices train less eagerly."""

    MAINS = "mains"
    POE = "poe"
    BATTERY = "battery"
    SOLAR = "solar"


class AvailabilityKind(StrEnum):
    """How a device comes and goes."""

    ALWAYS_ON = "always_on"
    DIURNAL = "diurnal"  # online every day between start_hour and end_hour
    CHARGING = "charging"  # online in a nightly charging window, on some nights
    FLAKY = "flaky"  # alternating exponential up/down periods


# Which availability fields each kind uses (the others are left at their defaults).
_AVAILABILITY_FIELDS: dict[AvailabilityKind, tuple[str, ...]] = {
    AvailabilityKind.ALWAYS_ON: (),
    AvailabilityKind.DIURNAL: ("start_hour", "end_hour"),
    AvailabilityKind.CHARGING: ("start_hour", "end_hour", "daily_probability"),
    AvailabilityKind.FLAKY: ("mean_up_s", "mean_down_s"),
}


@dataclass(frozen=True, kw_only=True)
class Availability:
    """When a device is online, as a pattern a simulator can sample deterministically.

    Times are seconds since the start of a simulation, which starts at midnight.
    Windows wrap past midnight when ``end_hour < start_hour`` (a 23-7 charging window).
    """

    kind: AvailabilityKind = AvailabilityKind.ALWAYS_ON
    start_hour: float = 0.0
    end_hour: float = 24.0
    daily_probability: float = 1.0
    mean_up_s: float = 3600.0
    mean_down_s: float = 600.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", AvailabilityKind(self.kind))
        except ValueError as exc:
            known = ", ".join(k.value for k in AvailabilityKind)
            raise ProfileError(f"availability.kind {self.kind!r} is not one of: {known}") from exc
        for name in ("start_hour", "end_hour"):
            value = _finite(f"availability.{name}", getattr(self, name))
            if not 0.0 <= value <= 24.0:
                raise ProfileError(f"availability.{name} must be within 0..24, got {value}")
        if self.kind in (AvailabilityKind.DIURNAL, AvailabilityKind.CHARGING) and (
            self.start_hour % 24.0 == self.end_hour % 24.0
        ):
            raise ProfileError("availability window is empty (start_hour == end_hour)")
        p = _finite("availability.daily_probability", self.daily_probability)
        if not 0.0 <= p <= 1.0:
            raise ProfileError(f"availability.daily_probability must be within 0..1, got {p}")
        for name in ("mean_up_s", "mean_down_s"):
            if _finite(f"availability.{name}", getattr(self, name)) <= 0.0:
                raise ProfileError(f"availability.{name} must be positive")

    # -- simulation ---------------------------------------------------------------

    def intervals(self, start_s: float, end_s: float, *, seed: int) -> list[tuple[float, float]]:
        """Online intervals ``[(on, off), ...]`` clipped to ``[start_s, end_s)``.

        The same seed always gives the same intervals, whatever the window asked for:
        a flaky device's history is generated from time zero, a charging device's
        night-by-night coin flips are keyed by the day number.
        """
        if end_s <= start_s:
            return []
        if self.kind is AvailabilityKind.ALWAYS_ON:
            return [(start_s, end_s)]
        if self.kind is AvailabilityKind.FLAKY:
            return _clip(self._flaky_intervals(end_s, seed), start_s, end_s)
        out: list[tuple[float, float]] = []
        first_day = math.floor(start_s / _DAY_S) - 1  # a window may start the day before
        last_day = math.floor(end_s / _DAY_S)
        for day in range(first_day, last_day + 1):
            if self.kind is AvailabilityKind.CHARGING and not self._plugged_in(day, seed):
                continue
            on = day * _DAY_S + self.start_hour * 3600.0
            length_h = (self.end_hour - self.start_hour) % 24.0 or 24.0
            out.append((on, on + length_h * 3600.0))
        return _clip(out, start_s, end_s)

    def is_available(self, t_s: float, *, seed: int) -> bool:
        """Whether the device is online at ``t_s`` (consistent with :meth:`intervals`)."""
        # A one-second window: clipped intervals that start at t_s started at or before it.
        return any(on <= t_s < off for on, off in self.intervals(t_s, t_s + 1.0, seed=seed))

    def expected_fraction(self) -> float:
        """Long-run fraction of time online: a scheduler's prior before it sees a device."""
        if self.kind is AvailabilityKind.ALWAYS_ON:
            return 1.0
        if self.kind is AvailabilityKind.FLAKY:
            return self.mean_up_s / (self.mean_up_s + self.mean_down_s)
        length_h = (self.end_hour - self.start_hour) % 24.0 or 24.0
        p = self.daily_probability if self.kind is AvailabilityKind.CHARGING else 1.0
        return p * length_h / 24.0

    def _plugged_in(self, day: int, seed: int) -> bool:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, day & 0xFFFFFFFF, 0xC4A6])
        return bool(rng.random() < self.daily_probability)

    def _flaky_intervals(self, end_s: float, seed: int) -> list[tuple[float, float]]:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xF1A4])
        # Start in the stationary distribution so t=0 is not special.
        up = bool(rng.random() < self.expected_fraction())
        t = 0.0
        out: list[tuple[float, float]] = []
        while t < end_s:
            mean = self.mean_up_s if up else self.mean_down_s
            length = float(rng.exponential(mean))
            if up:
                out.append((t, t + length))
            t += length
            up = not up
        return out

    # -- serialisation ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Only the fields this kind uses, so files stay short and unambiguous."""
        out: dict[str, Any] = {"kind": self.kind.value}
        for name in _AVAILABILITY_FIELDS[self.kind]:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> Availability:
        """``strict=False`` (a profile received on the wire) ignores the keys its kind
        does not use instead of refusing them."""
        if not isinstance(data, Mapping):
            raise ProfileError("availability must be a table")
        if "kind" not in data:
            raise ProfileError("availability.kind is missing")
        try:
            kind = AvailabilityKind(data["kind"])
        except ValueError as exc:
            known = ", ".join(k.value for k in AvailabilityKind)
            raise ProfileError(
                f"availability.kind {data['kind']!r} is not one of: {known}"
            ) from exc
        allowed = {"kind", *_AVAILABILITY_FIELDS[kind]}
        if not strict:
            data = {k: v for k, v in data.items() if k in allowed}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ProfileError(f"availability ({kind.value}) has unknown keys: {unknown}")
        optional = {"daily_probability"}  # defaults to every night
        missing = sorted(set(_AVAILABILITY_FIELDS[kind]) - optional - set(data))
        if missing:
            raise ProfileError(f"availability ({kind.value}) is missing: {missing}")
        values = {k: _number(f"availability.{k}", v) for k, v in data.items() if k != "kind"}
        return cls(kind=kind, **values)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """A device class (or one measured machine): compute, memory, network, power, presence.

    ``sources`` maps a field name to the public source its number came from;
    ``estimated`` names the fields that are estimates rather than published figures.
    """

    name: str
    display_name: str
    device_class: str
    cores: int
    memory_mb: int
    storage_gb: float
    gflops: float
    step_overhead_ms: float
    downlink_mbps: float
    uplink_mbps: float
    latency_ms: float
    power: PowerSource
    availability: Availability = field(default_factory=Availability)
    measured_step_ms: tuple[tuple[str, float], ...] = ()
    measured_batch_size: int = 32
    sources: tuple[tuple[str, str], ...] = ()
    estimated: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ProfileError(
                f"profile name {self.name!r} must be lower-case letters, digits, '.', '_', '-'"
            )
        for name in ("display_name", "device_class", "notes"):
            if not isinstance(getattr(self, name), str):
                raise ProfileError(f"{self.name}: {name} must be a string")
        for name in ("cores", "memory_mb", "measured_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ProfileError(f"{self.name}: {name} must be a positive integer, got {value!r}")
        for name in ("gflops", "downlink_mbps", "uplink_mbps"):
            if _finite(f"{self.name}: {name}", getattr(self, name)) <= 0.0:
                raise ProfileError(f"{self.name}: {name} must be positive")
        for name in ("storage_gb", "step_overhead_ms", "latency_ms"):
            if _finite(f"{self.name}: {name}", getattr(self, name)) < 0.0:
                raise ProfileError(f"{self.name}: {name} must not be negative")
        try:
            object.__setattr__(self, "power", PowerSource(self.power))
        except ValueError as exc:
            known = ", ".join(p.value for p in PowerSource)
            raise ProfileError(f"{self.name}: power {self.power!r} is not one of: {known}") from exc
        if not isinstance(self.availability, Availability):
            raise ProfileError(f"{self.name}: availability must be an Availability")
        steps = tuple(sorted((str(k), float(v)) for k, v in self.measured_step_ms))
        for model, ms in steps:
            if _finite(f"{self.name}: measured_step_ms.{model}", ms) <= 0.0:
                raise ProfileError(f"{self.name}: measured_step_ms.{model} must be positive")
        object.__setattr__(self, "measured_step_ms", steps)
        field_names = _field_names()
        srcs = tuple(sorted((str(k), str(v)) for k, v in self.sources))
        bad = sorted({k for k, _ in srcs} - field_names)
        if bad:
            raise ProfileError(f"{self.name}: sources name unknown fields: {bad}")
        object.__setattr__(self, "sources", srcs)
        est = tuple(sorted({str(e) for e in self.estimated}))
        bad = sorted(set(est) - field_names)
        if bad:
            raise ProfileError(f"{self.name}: estimated names unknown fields: {bad}")
        object.__setattr__(self, "estimated", est)

    # -- queries ------------------------------------------------------------------

    def step_ms(self, model: str) -> float | None:
        """The measured step time for ``model`` at ``measured_batch_size``, if any."""
        return dict(self.measured_step_ms).get(model)

    def source(self, field_name: str) -> str | None:
        return dict(self.sources).get(field_name)

    # -- serialisation ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, list, dict) for JSON and TOML."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "availability":
                out[f.name] = value.to_dict()
            elif f.name in ("measured_step_ms", "sources"):
                out[f.name] = dict(value)
            elif f.name == "estimated":
                out[f.name] = list(value)
            elif f.name == "power":
                out[f.name] = value.value
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> DeviceProfile:
        """Validate untrusted plain data: missing, unknown, wrongly typed keys all raise.

        ``strict=False`` is for a profile received in a hello: as everywhere on the wire,
        keys this version does not know are ignored (top-level keys, availability keys
        its kind does not use, and ``sources``/``estimated`` entries naming them), so a
        newer or foreign agent's profile is not thrown away for one extra field. Types
        and ranges are checked the same.
        """
        if not isinstance(data, Mapping):
            raise ProfileError("a profile must be a table/object")
        if not strict:
            data = _known_keys(data)
        label = data.get("name", "<unnamed>")
        required = {f.name for f in fields(cls) if _is_required(f.name)}
        missing = sorted(required - set(data))
        if missing:
            raise ProfileError(f"profile {label!r} is missing: {missing}")
        unknown = sorted(set(data) - _field_names())
        if unknown:
            raise ProfileError(f"profile {label!r} has unknown keys: {unknown}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "availability":
                kwargs[key] = Availability.from_dict(value, strict=strict)
            elif key in ("measured_step_ms", "sources"):
                if not isinstance(value, Mapping):
                    raise ProfileError(f"profile {label!r}: {key} must be a table")
                conv = _number if key == "measured_step_ms" else _string
                kwargs[key] = tuple((str(k), conv(f"{key}.{k}", v)) for k, v in value.items())
            elif key == "estimated":
                if isinstance(value, str) or not isinstance(value, Sequence):
                    raise ProfileError(f"profile {label!r}: estimated must be a list of names")
                kwargs[key] = tuple(_string("estimated[]", v) for v in value)
            elif key in ("cores", "memory_mb", "measured_batch_size"):
                kwargs[key] = _integer(f"{label}: {key}", value)
            elif key in ("name", "display_name", "device_class", "power", "notes"):
                kwargs[key] = _string(f"{label}: {key}", value)
            else:
                kwargs[key] = _number(f"{label}: {key}", value)
        return cls(**kwargs)

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeviceProfile:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(f"profile JSON does not parse: {exc}") from exc
        return cls.from_dict(data)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> DeviceProfile:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"profile TOML does not parse: {exc}") from exc
        return cls.from_dict(data)


# -- helpers -------------------------------------------------------------------------


def _field_names() -> set[str]:
    return {f.name for f in fields(DeviceProfile)}


def _known_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the keys (and source/estimate entries) no profile field has."""
    known = _field_names()
    out = {k: v for k, v in data.items() if k in known}
    if isinstance(out.get("sources"), Mapping):
        out["sources"] = {k: v for k, v in out["sources"].items() if k in known}
    estimated = out.get("estimated")
    if isinstance(estimated, list):
        out["estimated"] = [e for e in estimated if not isinstance(e, str) or e in known]
    return out


def _is_required(name: str) -> bool:
    return name not in {
        "availability",
        "measured_step_ms",
        "measured_batch_size",
        "sources",
        "estimated",
        "notes",
    }


def _finite(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{label} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ProfileError(f"{label} must be finite, got {value!r}")
    return float(value)


def _number(label: str, value: Any) -> float:
    return _finite(label, value)


def _integer(label: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # JSON makes no difference between 4 and 4.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{label} must be an integer, got {value!r}")
    return value


def _string(label: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ProfileError(f"{label} must be a string, got {value!r}")
    return value


def _clip(
    intervals: list[tuple[float, float]], start_s: float, end_s: float
) -> list[tuple[float, float]]:
    out = []
    for on, off in intervals:
        lo, hi = max(on, start_s), min(off, end_s)
        if hi > lo:
            out.append((lo, hi))
    return out


# -- a tiny TOML writer (tomllib reads; the standard library does not write) --------------


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Write plain data as TOML: scalars and arrays first, then one level of tables.

    Enough for profiles: strings, ints, floats, bools, arrays of those, and tables of
    those. Deeper nesting raises ``ProfileError`` rather than writing something wrong.
    """
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            if value:  # an empty table reads back as the field's default
                tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, table in tables:
        lines.append("")
        lines.append(f"[{_toml_key(key)}]")
        for sub_key, value in table.items():
            if isinstance(value, Mapping):
                raise ProfileError(f"TOML writer: nested table {key}.{sub_key} is not supported")
            lines.append(f"{_toml_key(sub_key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return _toml_string(key)


def _toml_string(value: str) -> str:
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
    )
    escaped = "".join(
        c if ord(c) >= 0x20 and ord(c) != 0x7F else f"\\u{ord(c):04x}" for c in escaped
    )
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProfileError(f"TOML writer: non-finite float {value!r}")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ProfileError(f"TOML writer: cannot write {type(value).__name__}")
