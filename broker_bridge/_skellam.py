"""Distributed differential privacy for secure rounds: the Skellam mechanism (Agarwal,
Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning"), the part both sides need (docs/PROTOCOL.md section 11.4).

A device of a private secure round, before masking:

1. clips its values (the round's coordinates, already scaled by 1/fraction) to L2 norm
   ``clip`` (``l2_clip``);
2. scales them by the round's fixed-point ``scale`` and rounds each coordinate to one of
   its two neighbouring integers at random, unbiased, repeating the draw until the
   rounded vector's L2 norm is within ``norm_bound`` (conditional randomized rounding,
   Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism"): that
   bound is the sensitivity the accountant charges, whatever the draw;
3. adds integer noise: per coordinate Poisson(v/2) - Poisson(v/2), a symmetric Skellam
   variable of variance ``device_variance`` v, from a numpy generator seeded with 128 bits
   of ``os.urandom`` (no seed the aggregator knows);
4. masks the sum as every secure round does.

Skellam variables are closed under summation: the sum of k devices' noise is Skellam of
variance k v, so the unmasked sum carries the noise of every summed device, and no value
the aggregator can compute carries less (it only ever learns the sum).

``SkellamParams`` travels in the round's ``setup`` (its 28-byte DP extension);
``norm_bound`` and ``wrap_margin`` are what the aggregator uses to choose them.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MECHANISM_SKELLAM = 1
"""The only mechanism the setup's DP extension names today."""
EXTENSION = struct.Struct("<Iddd")
"""The setup's DP extension: mechanism (u32), clip, norm_bound, device_variance (f64)."""
BETA = math.exp(-0.5)
"""Conditional rounding's failure probability per draw (Kairouz et al.'s choice)."""
MAX_DRAWS = 256
"""Rounding draws before a device rounds towards zero (always within the bound)."""
WRAP_FAILURE_BITS = 40
"""A round's sum may wrap mod 2^32 with probability at most 2^-40 (noise tails)."""
MAX_DEVICE_VARIANCE = float(2**40)
"""The largest per-device variance: numpy's Poisson sampler loses its variance above
~1e13 (at 1e15 it is 4% too wide, at 1e16 40%), so the plan keeps each Poisson's mean
below 2^39 and a device refuses a setup that asks for more."""

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, kw_only=True)
class SkellamParams:
    """What a device of a private secure round needs (the setup's DP extension)."""

    clip: float
    """L2 bound of the values a device sends (after the 1/fraction scaling)."""
    norm_bound: float
    """L2 bound of the rounded integer vector (conditional rounding enforces it)."""
    device_variance: float
    """Variance of each device's Skellam noise per coordinate, in squared levels."""

    def to_bytes(self) -> bytes:
        return EXTENSION.pack(MECHANISM_SKELLAM, self.clip, self.norm_bound,
                              self.device_variance)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SkellamParams | None:
        """The extension, or None when it breaks its layout or bounds."""
        if len(data) != EXTENSION.size:
            return None
        mechanism, clip, bound, variance = EXTENSION.unpack_from(data)
        values = (clip, bound, variance)
        if mechanism != MECHANISM_SKELLAM or not all(math.isfinite(v) and v > 0
                                                     for v in values):
            return None
        if variance > MAX_DEVICE_VARIANCE:
            return None
        return cls(clip=clip, norm_bound=bound, device_variance=variance)


def norm_bound(*, clip: float, scale: float, dim: int, beta: float = BETA) -> float:
    """The L2 bound conditional rounding enforces on ``dim`` values of norm at most
    ``clip`` scaled by ``scale`` (Kairouz et al. 2021, the rounding lemma):
    sqrt(min(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2), (c + sqrt(d))^2)), c the
    scaled clip. The second term holds for every draw; the first for a share 1 - beta of
    them, so a device redraws at most a few times."""
    c, d = clip * scale, float(dim)
    probable = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return math.sqrt(min(probable, (c + math.sqrt(d)) ** 2))


def l1_bound(bound: float, dim: int) -> float:
    """The L1 sensitivity of integer vectors of L2 norm at most ``bound``: each nonzero
    coordinate is at least 1 in size, so |x|_1 <= |x|_2^2, and |x|_1 <= sqrt(d) |x|_2."""
    return min(bound * bound, math.sqrt(dim) * bound)


def wrap_margin(variance: float, words: int, failure_bits: int = WRAP_FAILURE_BITS) -> float:
    """A t such that the sum's noise (symmetric Skellam of ``variance``, a limit of sums of
    independent terms bounded by 1) exceeds t in size at one of ``words`` coordinates
    with probability at most 2^-failure_bits (Bernstein: 2 exp(-t^2 / (2 (V + t/3))))."""
    log_term = math.log(2.0 * max(words, 1)) + failure_bits * math.log(2.0)
    # t^2 = 2 L (V + t/3)  ->  t = L/3 + sqrt(L^2/9 + 2 L V)
    return log_term / 3 + math.sqrt(log_term * log_term / 9 + 2 * log_term * variance)


def l2_clip(values: npt.NDArray[np.floating], clip: float) -> F64:
    x = np.asarray(values, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


def conditional_round(scaled: F64, bound: float, rng: np.random.Generator) -> I64:
    """Each value rounded up with probability its fractional part (unbiased), redrawn
    until the vector's L2 norm is within ``bound``; after ``MAX_DRAWS`` failed draws,
    rounded towards zero (never longer than the scaled vector)."""
    low = np.floor(scaled)
    frac = scaled - low
    limit = bound * bound
    for _ in range(MAX_DRAWS):
        levels = (low + (rng.random(scaled.shape) < frac)).astype(np.int64)
        if float(np.dot(levels, levels)) <= limit:
            return levels
    return np.trunc(scaled).astype(np.int64)


def skellam(variance: float, size: int, rng: np.random.Generator) -> I64:
    """``size`` symmetric Skellam variables of ``variance``: Poisson(v/2) - Poisson(v/2)."""
    half = variance / 2.0
    return rng.poisson(half, size).astype(np.int64) - rng.poisson(half, size).astype(np.int64)


def noise_rng() -> np.random.Generator:
    """A generator seeded with 128 bits of ``os.urandom`` (the OS CSPRNG)."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(16), "little")))


@dataclass(frozen=True)
class PrivateLevels:
    """A device's contribution: the rounded levels, its noise, their sum as u32 words."""

    rounded: I64
    noise: I64

    @property
    def words(self) -> npt.NDArray[np.uint32]:
        return ((self.rounded + self.noise) & 0xFFFFFFFF).astype(np.uint32)


def privatize(values: npt.NDArray[np.floating], params: SkellamParams, scale: float,
              rng: np.random.Generator | None = None) -> PrivateLevels:
    """Steps 1-3 of the module doc: clip, scale, round conditionally, add noise."""
    rng = rng if rng is not None else noise_rng()
    x = l2_clip(values, params.clip) * scale
    rounded = conditional_round(x, params.norm_bound, rng)
    return PrivateLevels(rounded=rounded, noise=skellam(params.device_variance, len(x), rng))
