"""The JSON Schema of a device profile as it travels in a hello (docs/schemas/).

Built from ``DeviceProfile``'s fields: a field without an entry in ``_FIELDS`` is an
error here, so a new profile field cannot be left out of the schema. The bounds are
those ``DeviceProfile.__post_init__`` and ``Availability`` check;
tests/broker_bridge/test_schemas.py checks the schema against
``DeviceProfile.from_dict(data, strict=False)`` (the wire reading: unknown keys ignored)
both ways.

One rule has no JSON Schema form and is stated in the description only: a diurnal or
charging window may not be empty (``start_hour`` and ``end_hour`` equal modulo 24).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from device_profiles._profile import (
    _AVAILABILITY_FIELDS,
    AvailabilityKind,
    DeviceProfile,
    PowerSource,
    _is_required,
)

_POSITIVE_INT = {"type": "integer", "minimum": 1}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_NOT_NEGATIVE = {"type": "number", "minimum": 0}

_FIELDS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]*$",
             "description": "profile name: lower-case letters, digits, '.', '_', '-'"},
    "display_name": {"type": "string"},
    "device_class": {"type": "string", "description": "e.g. sbc, phone, gateway, measured"},
    "cores": {**_POSITIVE_INT, "description": "CPU cores available for training"},
    "memory_mb": {**_POSITIVE_INT, "description": "RAM in MiB"},
    "storage_gb": {**_NOT_NEGATIVE, "description": "free storage in GB"},
    "gflops": {**_POSITIVE, "description": "sustained FP32 GFLOP/s for small-model training"},
    "step_overhead_ms": {**_NOT_NEGATIVE, "description": "fixed cost of one optimizer step"},
    "downlink_mbps": {**_POSITIVE},
    "uplink_mbps": {**_POSITIVE},
    "latency_ms": {**_NOT_NEGATIVE},
    "power": {"type": "string", "enum": [p.value for p in PowerSource]},
    "availability": {},  # built below
    "measured_step_ms": {
        "type": "object", "additionalProperties": {**_POSITIVE},
        "description": "measured milliseconds per step, by reference model name "
                       "(at measured_batch_size)"},
    "measured_batch_size": {**_POSITIVE_INT},
    "sources": {"type": "object",  # properties: one per profile field, added below
                "description": "where a field's figure comes from, by field name (entries "
                               "naming no profile field are ignored)"},
    "estimated": {"type": "array", "items": {"type": "string"},
                  "description": "fields whose figures are estimates (names of no profile "
                                 "field are ignored)"},
    "notes": {"type": "string"},
}

_AVAILABILITY_VALUES: dict[str, dict[str, Any]] = {
    "start_hour": {"type": "number", "minimum": 0, "maximum": 24},
    "end_hour": {"type": "number", "minimum": 0, "maximum": 24},
    "daily_probability": {"type": "number", "minimum": 0, "maximum": 1},
    "mean_up_s": {**_POSITIVE},
    "mean_down_s": {**_POSITIVE},
}


def _availability() -> dict[str, Any]:
    branches = []
    for kind in AvailabilityKind:
        used = _AVAILABILITY_FIELDS[kind]
        branches.append({
            "if": {"properties": {"kind": {"const": kind.value}}},
            "then": {
                "properties": {name: _AVAILABILITY_VALUES[name] for name in used},
                "required": [n for n in used if n != "daily_probability"],
            },
        })
    return {
        "type": "object",
        "description": "when the device is online. Keys its kind does not use are ignored. "
                       "A diurnal or charging window may not be empty (start_hour and "
                       "end_hour equal modulo 24).",
        "properties": {"kind": {"type": "string",
                                "enum": [k.value for k in AvailabilityKind]}},
        "required": ["kind"],
        "allOf": branches,
        "default": {"kind": AvailabilityKind.ALWAYS_ON.value},
    }


def profile_schema() -> dict[str, Any]:
    """The schema of ``DeviceProfile.to_dict()`` as a receiver reads it (no ``$id``)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in fields(DeviceProfile):
        if f.name not in _FIELDS:
            raise KeyError(f"profile field {f.name!r} has no schema entry")
        prop = _availability() if f.name == "availability" else dict(_FIELDS[f.name])
        if f.name == "sources":
            prop["properties"] = {g.name: {"type": "string"} for g in fields(DeviceProfile)}
        if _is_required(f.name):
            required.append(f.name)
        elif f.name != "availability":
            default = f.default if f.default_factory is MISSING else f.default_factory()
            prop["default"] = list(default) if isinstance(default, tuple) else default
            if f.name in ("measured_step_ms", "sources"):
                prop["default"] = dict(default)  # type: ignore[arg-type]
        properties[f.name] = prop
    return {
        "title": "DeviceProfile",
        "description": "What a device can compute, store and send, and when it is online "
                       "(in a hello's 'profile'; keys this version does not know are "
                       "ignored). Compute model: one step of a batch of b samples of a "
                       "model needing F training FLOPs per sample takes step_overhead_ms / "
                       "1000 + b * F / (gflops * 1e9) seconds.",
        "type": "object",
        "properties": properties,
        "required": required,
    }
