"""The faults a simulated fleet injects, decided from the seed, applied through public parts.

Nothing here reaches into an agent: slow devices are an ``Emulation`` subclass, crashes
and Byzantine devices are ``AgentHooks`` (``transform_update``, ``transform_hello``) and
``Agent.abort()``; a production agent carries none of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from broker_bridge import Hello, TaskSpec
from device_profiles import ConfigError
from edge_runtime._emulation import Emulation
from edge_runtime._hooks import AgentHooks, UpdateDraft


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """Failure injection, all decided from the seed."""

    crash_fraction: float = 0.0
    """Probability that a device crashes on a task (after training, before uploading)."""
    restart_after_rounds: int = 2
    """A crashed device reboots this many rounds later."""
    slow_fraction: float = 0.0
    """Share of devices that run ``slow_factor`` times slower than their profile."""
    slow_factor: float = 4.0
    byzantine_fraction: float = 0.0
    """Share of devices that attack (``byzantine_kind`` says how)."""
    byzantine_scale: float = 10.0
    byzantine_kind: str = "flip"
    """``flip``: send -``byzantine_scale`` x the true update; ``norm``: the true update
    stretched to L2 norm ``byzantine_scale``; ``samples``: the true update, claiming
    ``byzantine_samples`` samples."""
    byzantine_samples: int = 10**12

    def __post_init__(self) -> None:
        if self.byzantine_kind not in ("flip", "norm", "samples"):
            raise ConfigError("byzantine_kind must be flip, norm or samples, got "
                              f"{self.byzantine_kind!r}")
        for name in ("crash_fraction", "slow_fraction", "byzantine_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1], got {v}")
        if self.restart_after_rounds < 1 or not self.slow_factor >= 1.0:
            raise ConfigError("restart_after_rounds must be >= 1 and slow_factor >= 1")

    def is_byzantine(self, seed: int, device_id: str) -> bool:
        """Is ``device_id`` one of the ``byzantine_fraction`` that attack (drawn from the
        seed: a flat fleet and a tree of the same seed pick the same devices)?"""
        return draw(seed, "byzantine", device_id) < self.byzantine_fraction

    def is_slow(self, seed: int, device_id: str) -> bool:
        return draw(seed, "slow", device_id) < self.slow_fraction


def draw(seed: int, *parts: object) -> float:
    """A deterministic uniform draw in [0, 1) for (seed, parts): BLAKE2b of the key, so
    draws for keys that differ in one character (dev-01, dev-02, same round) are
    independent (a CRC is linear: it made whole rounds of a small fleet crash at once)."""
    key = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


@dataclass(frozen=True, kw_only=True)
class SlowEmulation(Emulation):
    """The profile's time, ``slow_factor`` times over (a device slower than its class)."""

    slow_factor: float = 1.0

    def emulated_s(self, *, task: TaskSpec, num_parameters: int, samples: int, steps: int,
                   update_bytes: int) -> float:
        base = super().emulated_s(task=task, num_parameters=num_parameters, samples=samples,
                                  steps=steps, update_bytes=update_bytes)
        return base * self.slow_factor


@dataclass(frozen=True)
class Byzantine:
    """A Byzantine device's hooks: its true update sign-flipped and scaled (``flip``),
    stretched to a huge norm (``norm``), or its sample count inflated (``samples``, in
    the update and in the hello)."""

    faults: FaultSpec

    def attack(self, draft: UpdateDraft) -> UpdateDraft:
        f = self.faults
        if f.byzantine_kind == "flip":
            return replace(draft, delta=-f.byzantine_scale * draft.delta)
        if f.byzantine_kind == "norm":
            norm = float(np.linalg.norm(draft.delta))
            if norm > 0:
                return replace(draft, delta=draft.delta * (f.byzantine_scale / norm))
            return draft
        return replace(draft, meta=replace(draft.meta, num_samples=f.byzantine_samples))

    def announce(self, hello: Hello) -> Hello:
        if self.faults.byzantine_kind != "samples":
            return hello
        return replace(hello, num_samples=self.faults.byzantine_samples)

    def hooks(self, crash: Callable[[UpdateDraft], UpdateDraft] | None = None) -> AgentHooks:
        """The agent hooks that make a device this attacker (after ``crash``, if any)."""
        return AgentHooks(transform_update=chain(crash, self.attack),
                          transform_hello=self.announce)


def chain(*steps: Callable[[UpdateDraft], UpdateDraft] | None
          ) -> Callable[[UpdateDraft], UpdateDraft] | None:
    """One ``transform_update`` hook running ``steps`` in order (None when there are none)."""
    present = [s for s in steps if s is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def run(draft: UpdateDraft) -> UpdateDraft:
        for step in present:
            draft = step(draft)
        return draft

    return run
