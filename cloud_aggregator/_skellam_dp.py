"""Distributed DP's accounting and planning: the Skellam mechanism under secure rounds.

The devices of a private secure round noise their own clipped, rounded updates
(``broker_bridge._skellam``); the aggregator only chooses the parameters and charges
what the unmasked sum carries. ``dp_accounting`` has no Skellam (nor discrete Gaussian)
event, so the Renyi DP of a round is computed here from Agarwal, Kairouz and Liu 2021
(the multi-dimensional Skellam mechanism): for the sum of integer vectors with L1/L2
sensitivities D1, D2 and symmetric Skellam noise of total variance V per coordinate,

    eps(alpha) <= alpha D2^2 / (2 V) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 V^2),
                                           3 D1 / (2 V))

(the paper's Theorem with Sk(mu, mu), V = 2 mu), summed over rounds and converted to
(epsilon, delta) by ``dp_accounting.rdp.compute_epsilon``. D2 is the norm bound
conditional rounding enforces, D1 = min(D2^2, sqrt(d) D2).

Who is protected, and how dropouts count (docs/PROTOCOL.md section 11.4): a round is
charged with the noise of the devices it summed other than the one protected,
(k - 1) v for k summed devices each adding variance v, so the bound holds even if one
device's own noise were known; devices that left after their upload are in the sum
(their noise too), devices that never uploaded are not. The per-device variance is sized
for the fewest devices a closing round can sum (its quorum, at least 3), so every round
that closes carries at least the planned variance, and more when more devices report
(its epsilon is then lower, and the report shows it). No amplification by sampling is
claimed: every round is charged at q = 1, since the party distributed DP protects against,
the aggregator, draws the sample and sees who uploads (the sample is no secret from it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from broker_bridge._skellam import (
    MAX_DEVICE_VARIANCE,
    SkellamParams,
    l1_bound,
    norm_bound,
    wrap_margin,
)
from device_profiles import ConfigError

DIM_BOUND = 1 << 24
"""The most coordinates a private secure round sends; the bounds are computed for it
(a larger round is refused), so they hold for every model up to that size."""
SUM_LIMIT = (1 << 31) - 1
"""The signed 32-bit sum every level and noise must fit."""


def skellam_rdp(orders: npt.ArrayLike, *, variance: float, l1: float, l2: float
                ) -> npt.NDArray[np.float64]:
    """Renyi DP of one release at each order (the module doc's bound)."""
    a = np.asarray(orders, dtype=np.float64)
    v = float(variance)
    extra = np.minimum(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * v * v), 3 * l1 / (2 * v))
    out: npt.NDArray[np.float64] = a * l2 * l2 / (2 * v) + extra
    return out


def skellam_epsilon(rounds: list[tuple[float, int]], *, l1: float, l2: float,
                    delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` = [(total variance, count), ...]."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    from cloud_aggregator._privacy import ORDERS

    rdp = np.zeros(len(ORDERS))
    for variance, count in rounds:
        if count > 0:
            if variance <= 0:
                return math.inf
            rdp += count * skellam_rdp(ORDERS, variance=variance, l1=l1, l2=l2)
    if not rdp.any():
        return 0.0
    eps, _ = compute_epsilon(list(ORDERS), list(rdp), delta)
    return float(eps)


@dataclass(frozen=True, kw_only=True)
class SkellamPlan:
    """The parameters of every private secure round of a run."""

    scale: float
    """Fixed-point levels per unit (a power of two)."""
    clip: float
    """L2 bound of what a device sends (C)."""
    norm_bound: float
    """D2: the rounded vector's L2 bound (levels)."""
    l1: float
    """D1: its L1 bound (levels)."""
    variance: float
    """V: the noise variance per coordinate the charged devices' noise adds up to."""
    device_variance: float
    """v = V / (min_summed - 1): what each device adds."""
    min_summed: int
    """The fewest devices a closing round sums."""
    max_devices: int
    """The most devices a round can sum (its fixed point's bound)."""

    @property
    def params(self) -> SkellamParams:
        return SkellamParams(clip=self.clip, norm_bound=self.norm_bound,
                             device_variance=self.device_variance)

    def charged_variance(self, summed: int) -> float:
        """The variance a round that summed ``summed`` devices is charged with."""
        return max(summed - 1, 0) * self.device_variance

    def noise_std(self, summed: int) -> float:
        """Per-coordinate standard deviation of the noise on the released mean."""
        k = max(summed, 1)
        return math.sqrt(k * self.device_variance) / self.scale / k


def _fits(*, clip: float, scale: float, device_variance: float, max_devices: int) -> bool:
    levels = max_devices * math.ceil(clip * scale)
    return levels + wrap_margin(max_devices * device_variance, DIM_BOUND) <= SUM_LIMIT


def _variance_for(epsilon: float, delta: float, rounds: int, l1: float, l2: float) -> float:
    """The smallest total variance (to 1e-4 relative) whose ``rounds`` spend ``epsilon``."""
    def spent(v: float) -> float:
        return skellam_epsilon([(v, rounds)], l1=l1, l2=l2, delta=delta)

    lo, hi = 1e-6 * l2 * l2, l2 * l2
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 4
        if hi > 1e30 * l2 * l2:
            raise ConfigError(f"no Skellam noise spends at most epsilon {epsilon:g} over "
                              f"{rounds} rounds")
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return hi


@functools.lru_cache(maxsize=32)
def plan_skellam(*, epsilon: float | None, delta: float, noise_multiplier: float | None,
                 rounds: int, clip: float, min_summed: int, max_devices: int
                 ) -> tuple[SkellamPlan, float]:
    """The finest power-of-two scale whose levels plus noise fit a 32-bit sum (and whose
    per-device variance numpy's Poisson sampler draws faithfully), and the
    noise that spends ``epsilon`` over ``rounds`` (or has ``noise_multiplier`` x D2 as
    its standard deviation); with the epsilon the plan spends. ``ConfigError`` when no
    scale leaves room (too many devices per round)."""
    if min_summed < 2:
        raise ConfigError("distributed DP needs at least 2 devices summed per round")
    top = math.floor(math.log2(SUM_LIMIT / (clip * max_devices)))
    for exponent in range(top, top - 64, -1):
        scale = 2.0 ** exponent
        if clip * scale < 256:
            break
        l2 = norm_bound(clip=clip, scale=scale, dim=DIM_BOUND)
        l1 = l1_bound(l2, DIM_BOUND)
        if noise_multiplier is not None:
            variance = (noise_multiplier * l2) ** 2
        else:
            assert epsilon is not None
            variance = _variance_for(epsilon, delta, rounds, l1, l2)
        device_variance = variance / (min_summed - 1)
        if device_variance <= MAX_DEVICE_VARIANCE and _fits(
                clip=clip, scale=scale, device_variance=device_variance,
                max_devices=max_devices):
            plan = SkellamPlan(scale=scale, clip=clip, norm_bound=l2, l1=l1,
                               variance=variance, device_variance=device_variance,
                               min_summed=min_summed, max_devices=max_devices)
            spent = skellam_epsilon([(variance, rounds)], l1=l1, l2=l2, delta=delta)
            return plan, spent
    raise ConfigError(
        f"distributed DP: {max_devices} devices per round (twice those asked) with their "
        "noise cannot sum in a 32-bit word at 256 levels per clip or more; select fewer "
        "devices per round or raise the quorum (less noise per device)")
