"""The bundled catalogue of real device classes, and fleet mixes drawn from it.

Each ``catalogue/*.toml`` file is one :class:`DeviceProfile`; its ``[sources]`` table
names the public source of every figure and ``estimated`` lists the figures that are
estimates (derivations are explained in ``notes``).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

from device_profiles._errors import ConfigError, ProfileError
from device_profiles._profile import DeviceProfile

DEFAULT_MIX = (
    "pi4:0.2,pi5:0.1,pi-zero-2w:0.1,jetson-nano:0.05,jetson-orin-nano:0.05,"
    "x86-gateway:0.1,phone-low:0.15,phone-mid:0.15,phone-high:0.1"
)


def load_profile_file(path: str | Path) -> DeviceProfile:
    """Read one profile TOML file (the catalogue's or ``fleetlearn profile --out``'s)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile {p}: {exc}") from exc
    try:
        return DeviceProfile.from_toml(text)
    except ProfileError as exc:
        raise ProfileError(f"{p.name}: {exc}") from exc


@functools.cache
def load_catalogue() -> Mapping[str, DeviceProfile]:
    """Every bundled profile by name (read once; the mapping is read-only)."""
    root = importlib.resources.files("device_profiles") / "catalogue"
    profiles: dict[str, DeviceProfile] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        try:
            profile = DeviceProfile.from_toml(entry.read_text(encoding="utf-8"))
        except ProfileError as exc:
            raise ProfileError(f"catalogue/{entry.name}: {exc}") from exc
        if profile.name in profiles:
            raise ProfileError(f"catalogue/{entry.name}: duplicate profile {profile.name!r}")
        profiles[profile.name] = profile
    return MappingProxyType(profiles)


def get_profile(name: str) -> DeviceProfile:
    """A catalogue profile by name; an unknown name lists the known ones."""
    catalogue = load_catalogue()
    try:
        return catalogue[name]
    except KeyError:
        known = ", ".join(sorted(catalogue))
        raise ProfileError(f"unknown device profile {name!r}; known: {known}") from None


def parse_mix(spec: str | Mapping[str, float]) -> dict[str, float]:
    """``"pi4:0.3,phone-mid:0.7"`` (or a mapping) -> normalised weights by profile name."""
    if isinstance(spec, str):
        weights: dict[str, float] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, sep, weight = part.partition(":")
            name = name.strip()
            if not sep:
                raise ConfigError(f"fleet mix entry {part!r} is not NAME:WEIGHT")
            try:
                w = float(weight)
            except ValueError as exc:
                raise ConfigError(f"fleet mix weight {weight!r} is not a number") from exc
            if name in weights:
                raise ConfigError(f"fleet mix names {name!r} twice")
            weights[name] = w
    else:
        weights = {str(k): float(v) for k, v in spec.items()}
    if not weights:
        raise ConfigError("fleet mix is empty")
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"fleet mix weight for {name!r} must be a non-negative number")
        get_profile(name)  # unknown names fail here, listing the known ones
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError("fleet mix weights sum to zero")
    return {name: w / total for name, w in weights.items()}


def profile_mix(
    spec: str | Mapping[str, float] = DEFAULT_MIX, n: int = 100, *, seed: int = 0
) -> list[DeviceProfile]:
    """``n`` profiles for a simulated fleet, in a seeded random order.

    Counts follow the weights exactly up to rounding (largest remainder), so a
    ``pi4:0.3`` mix of 10 devices has exactly 3 Pi 4s; only the order is random.
    """
    if n < 0:
        raise ConfigError("fleet size must not be negative")
    weights = parse_mix(spec)
    names = list(weights)
    quotas = np.array([weights[name] * n for name in names])
    counts = np.floor(quotas).astype(int)
    remainder = quotas - counts
    # Ties broken by position in the spec, so the result does not depend on the seed.
    order = sorted(range(len(names)), key=lambda i: (-remainder[i], i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    fleet = [get_profile(name) for name, c in zip(names, counts, strict=True) for _ in range(c)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(fleet))
    return [fleet[i] for i in perm]
