"""Differential privacy for sync rounds: central DP-FedAvg with an RDP accountant, and
the accounting of distributed DP under secure aggregation (``_skellam_dp``).

Why this module is longer than 400 lines: the plan, the accountant's state and the
report are one object for both mechanisms (central Gaussian, distributed Skellam), so
that the budget check, the checkpointed state, the metrics and the report are the same
code whichever mechanism a run uses.

What is released each round is the Gaussian mechanism on a sum with bounded
device-level sensitivity (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", the fixed-denominator estimator):

    delta_t = ( sum_i clip(u_i, C)  +  N(0, (z_u C)^2 I) ) / m

- every counted update ``u_i`` is clipped to L2 norm ``C`` and counts with weight 1
  (sample-count weights would give one device unbounded influence);
- ``m`` is fixed before the round (the devices asked per round), never the number that
  reported, so one device more or less moves the sum by at most ``C``;
- a round counts every selected device that reports in time (no cut at the first
  ``devices_per_round`` arrivals, which would let one device push another out);
- decliners are not replaced (a second draw after the budget check).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): the server also releases the noisy share of updates within the bound,
``b = (sum_i 1[|u_i| <= C] + N(0, sigma_b^2)) / m``, and moves the bound geometrically
towards the ``gamma`` quantile of update norms: ``C <- C exp(-eta (b - gamma))``. Both
releases are one Gaussian mechanism with noise multiplier ``z``:
``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` (the paper's Theorem 1), so the accountant charges
``z``.

Accounting: Renyi DP (``dp_accounting.rdp``), add-or-remove-one device. A round whose
devices were drawn uniformly at random (``selection = random``) is charged as a
Poisson-subsampled Gaussian with ``q = asked / candidates`` of that round (the usual
approximation of fixed-size uniform sampling, as in DP-FedAvg); any other policy is
charged with ``q = 1`` (no amplification). A round that would take the spent epsilon
past the target is not opened: training stops and says so.

The noise comes from numpy's PCG64 seeded with 128 bits of ``os.urandom`` (the OS CSPRNG)
for every round; the selection of a private run draws from the same source, so the
sample stays secret even from whoever knows the configured seed.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from broker_bridge._skellam import noise_rng
from cloud_aggregator._aggregate import Contribution, RoundAggregate
from cloud_aggregator._aggregation import StreamingAccumulator
from cloud_aggregator._contribution import ContributionRecord
from cloud_aggregator._errors import AggregatorError, PrivacyBudgetExhausted
from cloud_aggregator._skellam_dp import SkellamPlan, plan_skellam, skellam_epsilon
from device_profiles import ConfigError

F32 = npt.NDArray[np.float32]
ClipMode = Literal["fixed", "adaptive"]

ORDERS: tuple[float, ...] = (*[float(a) for a in range(2, 64)], 80.0, 96.0, 128.0, 256.0,
                             512.0)
"""Renyi orders the accountant tracks: integers only, whose subsampled-Gaussian RDP has a
closed form (fractional orders below 2 need a series that takes seconds per round and
only matter for epsilon well below 1 at delta 1e-5)."""
AMPLIFIED_POLICIES = ("random",)
"""Selection policies that draw a uniform sample of the candidates (amplification)."""
DEFAULT_INITIAL_CLIP = 0.1
"""Adaptive clipping's initial bound when ``clip_norm`` is unset (Andrew et al.)."""

logging.getLogger("absl").setLevel(logging.ERROR)  # RDP's per-order convergence notes


def _accountant() -> Any:
    from dp_accounting import NeighboringRelation, rdp

    return rdp.RdpAccountant(orders=list(ORDERS),
                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)


def _round_event(q: float, z: float) -> Any:
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent

    gaussian = GaussianDpEvent(z)
    return gaussian if q >= 1.0 else PoissonSampledDpEvent(q, gaussian)


def epsilon_for(*, noise_multiplier: float, rounds: list[tuple[float, int]],
                delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` = [(q, count), ...] of the Gaussian
    mechanism with ``noise_multiplier`` (each Poisson-subsampled at rate q)."""
    if noise_multiplier <= 0:
        return math.inf
    accountant = _accountant()
    for q, count in rounds:
        if count > 0:
            accountant.compose(_round_event(q, noise_multiplier), count)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_for(*, epsilon: float, delta: float, rounds: int, q: float) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds at rate ``q`` spend at most
    ``epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``)."""
    from dp_accounting import LowerEndpointAndGuess, SelfComposedDpEvent, calibrate_dp_mechanism

    def event(z: float) -> Any:
        return SelfComposedDpEvent(_round_event(q, z), rounds)

    z = calibrate_dp_mechanism(_accountant, event, epsilon, delta,
                               LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    return float(z)


@dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
    """The privacy a configuration asks for, derived once at start-up."""

    epsilon: float | None
    """The budget (None: no target; epsilon is reported, never enforced)."""
    delta: float
    noise_multiplier: float
    """z: what the accountant charges per round."""
    update_noise_multiplier: float
    """z_u: the noise on the clipped sum is N(0, (z_u C)^2) per coordinate."""
    count_stddev: float | None
    """sigma_b: adaptive clipping's noise on the count of unclipped updates."""
    rounds: int
    sampling_rate: float
    """The planned q (asked per round / population), 1 without amplification."""
    denominator: float
    """m: the fixed denominator (devices asked per round)."""
    clipping: ClipMode
    clip_norm: float
    """The (initial, for adaptive) clipping bound C."""
    target_quantile: float
    clip_lr: float
    amplified: bool
    planned_epsilon: float
    skellam: SkellamPlan | None = None
    """Distributed DP under secure aggregation: the devices add Skellam noise
    (``_skellam_dp``); None: central DP (Gaussian noise added here)."""

    @property
    def mechanism(self) -> str:
        return "gaussian" if self.skellam is None else "skellam"

    def describe(self) -> str:
        sampling = (f"Poisson-subsampled at q = {self.sampling_rate:.4g}" if self.amplified
                    else "no amplification by sampling")
        budget = "no target" if self.epsilon is None else f"target epsilon {self.epsilon:g}"
        how = ("" if self.skellam is None else
               f"distributed Skellam noise from the devices, sized for {self.skellam.min_summed}"
               f" summed, ")
        return (f"device-level ({self.epsilon if self.epsilon is not None else '-'}, "
                f"{self.delta:g})-DP plan: {how}noise multiplier {self.noise_multiplier:.4g} "
                f"({self.clipping} clipping, C = {self.clip_norm:.4g}), {self.rounds} rounds "
                f"{sampling}: epsilon {self.planned_epsilon:.4g} at delta {self.delta:g} "
                f"({budget})")


@functools.lru_cache(maxsize=64)
def make_plan(*, epsilon: float | None, delta: float, noise_multiplier: float | None,
              rounds: int, asked: int, population: int | None, selection: str,
              clipping: ClipMode, clip_norm: float | None, target_quantile: float,
              clip_lr: float, count_stddev: float | None,
              distributed: tuple[int, int] | None = None) -> PrivacyPlan:
    """Check the privacy settings together and derive the plan (``ConfigError`` with the
    reason when they cannot be met). ``distributed`` = (fewest, most devices a round
    sums): distributed DP under secure aggregation (``_skellam_dp``)."""
    if distributed is not None:
        return _distributed_plan(epsilon=epsilon, delta=delta,
                                 noise_multiplier=noise_multiplier, rounds=rounds,
                                 clipping=clipping, clip_norm=clip_norm,
                                 min_summed=distributed[0], max_devices=distributed[1])
    amplified = population is not None and selection in AMPLIFIED_POLICIES
    q = min(1.0, asked / population) if amplified and population else 1.0
    if epsilon is not None and noise_multiplier is None:
        z = noise_for(epsilon=epsilon, delta=delta, rounds=rounds, q=q)
    elif noise_multiplier is not None:
        z = noise_multiplier
    else:
        raise ConfigError("differential privacy needs dp_epsilon or dp_noise_multiplier")
    planned = epsilon_for(noise_multiplier=z, rounds=[(q, rounds)], delta=delta)
    if epsilon is not None and noise_multiplier is not None and planned > epsilon * (1 + 1e-9):
        raise ConfigError(
            f"dp_noise_multiplier = {noise_multiplier:g} over {rounds} rounds at q = {q:.4g} "
            f"spends epsilon {planned:.4g} at delta {delta:g}, above dp_epsilon = {epsilon:g}: "
            f"the plan cannot fit (raise the noise multiplier to "
            f"{noise_for(epsilon=epsilon, delta=delta, rounds=rounds, q=q):.4g}, lower rounds "
            "or leave one of the two unset)")
    if clipping == "fixed":
        if clip_norm is None:
            raise ConfigError("dp_clipping = fixed needs clip_norm (the L2 bound every update "
                              "is clipped to, which the noise is calibrated to)")
        bound = clip_norm
        z_u, sigma_b = z, None
    else:
        bound = clip_norm if clip_norm is not None else DEFAULT_INITIAL_CLIP
        # The paper's default is m / 20; with few devices a round that would leave the
        # update less than its share, so at least z (the update then gets at most 15%
        # more noise than with fixed clipping).
        sigma_b = count_stddev if count_stddev is not None else max(asked / 20.0, z)
        if not 2.0 * sigma_b > z:
            raise ConfigError(
                f"adaptive clipping: the noise multiplier {z:.4g} needs dp_clip_count_stddev "
                f"above {z / 2:.4g} (it is {sigma_b:.4g}): the count's share of the budget "
                "would leave no noise budget for the update (raise dp_clip_count_stddev, or "
                "use dp_clipping = fixed)")
        z_u = (z ** -2 - (2.0 * sigma_b) ** -2) ** -0.5 if z > 0 else 0.0
    return PrivacyPlan(epsilon=epsilon, delta=delta, noise_multiplier=z,
                       update_noise_multiplier=z_u, count_stddev=sigma_b, rounds=rounds,
                       sampling_rate=q, denominator=float(asked), clipping=clipping,
                       clip_norm=float(bound), target_quantile=target_quantile,
                       clip_lr=clip_lr, amplified=amplified, planned_epsilon=planned)


def _distributed_plan(*, epsilon: float | None, delta: float, noise_multiplier: float | None,
                      rounds: int, clipping: ClipMode, clip_norm: float | None,
                      min_summed: int, max_devices: int) -> PrivacyPlan:
    if clipping != "fixed":
        raise ConfigError(
            "distributed DP (secure_aggregation with dp_epsilon or dp_noise_multiplier) "
            "clips on the devices to a fixed bound: adaptive clipping would need a noisy "
            "count of unclipped updates summed under the masks, which is not built (use "
            "dp_clipping = fixed, the default under secure aggregation)")
    if epsilon is None and noise_multiplier is None:
        raise ConfigError("differential privacy needs dp_epsilon or dp_noise_multiplier")
    clip = clip_norm if clip_norm is not None else DEFAULT_INITIAL_CLIP
    sk, planned = plan_skellam(epsilon=epsilon, delta=delta,
                               noise_multiplier=noise_multiplier, rounds=rounds, clip=clip,
                               min_summed=min_summed, max_devices=max_devices)
    if epsilon is not None and noise_multiplier is not None and planned > epsilon * (1 + 1e-9):
        raise ConfigError(
            f"dp_noise_multiplier = {noise_multiplier:g} over {rounds} rounds spends epsilon "
            f"{planned:.4g} at delta {delta:g} under distributed DP, above dp_epsilon = "
            f"{epsilon:g}: the plan cannot fit (raise the noise multiplier, lower rounds or "
            "leave one of the two unset)")
    z = math.sqrt(sk.variance) / sk.norm_bound
    return PrivacyPlan(epsilon=epsilon, delta=delta, noise_multiplier=z,
                       update_noise_multiplier=z, count_stddev=None, rounds=rounds,
                       sampling_rate=1.0, denominator=float(min_summed), clipping="fixed",
                       clip_norm=clip, target_quantile=0.5, clip_lr=0.0, amplified=False,
                       planned_epsilon=planned, skellam=sk)


@dataclass(frozen=True, kw_only=True)
class RoundRelease:
    """What a private round released, before it is charged (``CentralDP.charge``)."""

    delta: F32
    counted: int
    unclipped: int
    noisy_unclipped_share: float | None
    next_clip_norm: float


class PrivateAggregate(RoundAggregate):
    """A round's clipped, uniformly weighted sum; ``result`` adds the noise and divides
    by the fixed denominator (see the module doc). Weights and strategy scales are not
    used: that is what bounds each device's influence."""

    def __init__(self, *, size: int, dp: CentralDP) -> None:
        self.size = size
        self._dp = dp
        self.clip_norm = dp.clip_norm
        self._stream: StreamingAccumulator | None = StreamingAccumulator(size=size)
        self._buffer = None
        self.unclipped = 0
        self.release: RoundRelease | None = None
        self.added = []  # what the training ledger records (``RoundAggregate.add``)

    def _add(self, c: Contribution) -> None:
        assert self._stream is not None
        factor = 1.0
        if c.norm > self.clip_norm and c.norm > 0:
            factor = self.clip_norm / c.norm
        else:
            self.unclipped += 1
        if c.indices is None:
            self._stream.add(c.values, 1.0, scale=factor)
        else:
            self._stream.add_sparse(c.indices, c.values, 1.0, scale=factor)

    def records(self, round_index: int, *, marginals: dict[int, float] | None = None
                ) -> tuple[ContributionRecord, ...]:
        """None: a device's weight, alignment or marginal would be released without noise."""
        return ()

    def clipped_sum(self) -> npt.NDArray[np.float64]:
        """The sum of the clipped updates, before noise (for tests and audits)."""
        assert self._stream is not None
        return self._stream.snapshot().weighted_sum

    def result(self) -> F32:
        assert self._stream is not None
        if self._stream.count == 0:
            raise AggregatorError("no update accumulated")
        self.release = self._dp.noised(self.clipped_sum(), counted=self._stream.count,
                                       unclipped=self.unclipped, clip_norm=self.clip_norm)
        return self.release.delta


class CentralDP:
    """The privacy part of an aggregator: the plan, the accountant's state (rounds
    charged at each sampling rate, the adaptive bound), the noise. Its ``state`` is saved
    in every checkpoint's transaction, so a restarted aggregator charges the same."""

    def __init__(self, plan: PrivacyPlan, *, rng: np.random.Generator | None = None) -> None:
        self.plan = plan
        self.clip_norm = plan.clip_norm
        self._spent: dict[float, int] = {}
        self._summed: dict[int, int] = {}
        """Distributed DP: rounds charged by the number of devices they summed."""
        self._last_summed = plan.skellam.min_summed if plan.skellam is not None else 0
        self._rng = rng
        self._epsilon: float | None = 0.0

    # -- state

    def state(self) -> dict[str, Any]:
        return {"spent": [[q, n] for q, n in sorted(self._spent.items())],
                "summed": [[k, n] for k, n in sorted(self._summed.items())],
                "clip_norm": self.clip_norm, "noise_multiplier": self.plan.noise_multiplier,
                "delta": self.plan.delta}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        saved_z = float(state.get("noise_multiplier", self.plan.noise_multiplier))
        if not math.isclose(saved_z, self.plan.noise_multiplier, rel_tol=1e-9):
            raise ConfigError(
                f"this state dir was trained with noise multiplier {saved_z:.6g}; the "
                f"configuration now gives {self.plan.noise_multiplier:.6g}: the privacy spent "
                "so far would be charged wrongly (keep the privacy settings and rounds of "
                "the run, or use another state dir)")
        self._spent = {float(q): int(n) for q, n in state.get("spent", [])}
        self._summed = {int(k): int(n) for k, n in state.get("summed", [])}
        self.clip_norm = float(state.get("clip_norm", self.plan.clip_norm))
        self._epsilon = None

    # -- accounting

    @property
    def rounds_spent(self) -> int:
        return sum(self._spent.values()) + sum(self._summed.values())

    def _runs(self, extra: float | None = None) -> list[tuple[float, int]]:
        spent = dict(self._spent)
        if extra is not None:
            spent[extra] = spent.get(extra, 0) + 1
        return sorted(spent.items())

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the plan's delta."""
        if self._epsilon is None:
            if self.plan.skellam is not None:
                self._epsilon = self._skellam_epsilon(self._summed)
            else:
                self._epsilon = (0.0 if not self._spent else epsilon_for(
                    noise_multiplier=self.plan.noise_multiplier, rounds=self._runs(),
                    delta=self.plan.delta))
        return self._epsilon

    def _skellam_epsilon(self, summed: Mapping[int, int]) -> float:
        sk = self.plan.skellam
        assert sk is not None
        return skellam_epsilon([(sk.charged_variance(k), n) for k, n in sorted(summed.items())],
                               l1=sk.l1, l2=sk.norm_bound, delta=self.plan.delta)

    def sampling_rate(self, *, asked: int, candidates: int, selection: str) -> float:
        """The q a round is charged at: asked / candidates for a uniform draw, else 1."""
        if selection not in AMPLIFIED_POLICIES or not self.plan.amplified or candidates <= 0:
            return 1.0
        return round(min(1.0, asked / candidates), 6)

    def refusal(self, q: float) -> str | None:
        """Why a round at rate ``q`` must not be opened (None: it fits the budget)."""
        if self.plan.epsilon is None:
            return None
        sk = self.plan.skellam
        if sk is not None:  # the next round at worst sums its quorum
            worst = dict(self._summed)
            worst[sk.min_summed] = worst.get(sk.min_summed, 0) + 1
            after = self._skellam_epsilon(worst)
        else:
            after = epsilon_for(noise_multiplier=self.plan.noise_multiplier,
                                rounds=self._runs(q), delta=self.plan.delta)
        if after <= self.plan.epsilon * (1 + 1e-9):
            return None
        return (f"privacy budget reached: {self.rounds_spent} rounds spent epsilon "
                f"{self.epsilon:.4g} at delta {self.plan.delta:g}; the next round (q = {q:.4g}) "
                f"would spend {after:.4g}, above dp_epsilon = {self.plan.epsilon:g}")

    def check_budget(self, q: float) -> None:
        """``PrivacyBudgetExhausted`` when a round at ``q`` does not fit."""
        why = self.refusal(q)
        if why is not None:
            raise PrivacyBudgetExhausted(why)

    # -- the mechanism

    def new_aggregate(self, size: int) -> PrivateAggregate:
        return PrivateAggregate(size=size, dp=self)

    def noised(self, clipped_sum: npt.NDArray[np.float64], *, counted: int, unclipped: int,
               clip_norm: float) -> RoundRelease:
        """The Gaussian mechanism on the clipped sum (and, adaptive, on the count)."""
        plan = self.plan
        rng = self._rng if self._rng is not None else noise_rng()
        std = plan.update_noise_multiplier * clip_norm
        noisy = clipped_sum + rng.normal(0.0, 1.0, clipped_sum.shape) * std
        delta = (noisy / plan.denominator).astype(np.float32)
        share: float | None = None
        next_clip = clip_norm
        if plan.clipping == "adaptive":
            assert plan.count_stddev is not None
            # Centred bits (b - 1/2, sensitivity 1/2): what makes the count's noise
            # multiplier 2 sigma_b in the paper's composition.
            centred = unclipped - counted / 2.0 + float(rng.normal(0.0, plan.count_stddev))
            share = centred / plan.denominator + 0.5
            next_clip = clip_norm * math.exp(-plan.clip_lr * (share - plan.target_quantile))
        return RoundRelease(delta=delta, counted=counted, unclipped=unclipped,
                            noisy_unclipped_share=share, next_clip_norm=next_clip)

    def charge(self, release: RoundRelease, q: float) -> None:
        """The round was released: charge it and move the adaptive bound (distributed
        DP: charge the noise of the ``release.counted`` devices it summed)."""
        if self.plan.skellam is not None:
            k = release.counted
            if k < self.plan.skellam.min_summed:
                raise AggregatorError(f"a private secure round summed {k} devices, fewer "
                                      f"than the {self.plan.skellam.min_summed} its noise is "
                                      "sized for")
            self._summed[k] = self._summed.get(k, 0) + 1
            self._last_summed = k
            self._epsilon = None
            return
        self._spent[q] = self._spent.get(q, 0) + 1
        self._epsilon = None
        self.clip_norm = release.next_clip_norm

    def noise_std(self, clip_norm: float) -> float:
        """Per-coordinate standard deviation of the noise on the released mean (the last
        round's, under distributed DP)."""
        if self.plan.skellam is not None:
            return self.plan.skellam.noise_std(self._last_summed)
        return self.plan.update_noise_multiplier * clip_norm / self.plan.denominator

    def report(self) -> dict[str, Any]:
        """What was guaranteed and spent, for reports (JSON-able)."""
        plan = self.plan
        return {
            "guarantee": guarantee(plan),
            "epsilon_spent": self.epsilon, "delta": plan.delta,
            "epsilon_target": plan.epsilon, "planned_epsilon": plan.planned_epsilon,
            "rounds_charged": self.rounds_spent, "rounds_planned": plan.rounds,
            "noise_multiplier": plan.noise_multiplier,
            "update_noise_multiplier": plan.update_noise_multiplier,
            "clipping": plan.clipping, "initial_clip_norm": plan.clip_norm,
            "clip_norm": self.clip_norm, "target_quantile": plan.target_quantile,
            "count_stddev": plan.count_stddev, "denominator": plan.denominator,
            "planned_sampling_rate": plan.sampling_rate, "amplified": plan.amplified,
            "charged": [[q, n] for q, n in sorted(self._spent.items())],
            "accountant": "dp_accounting RDP, add-or-remove-one device",
            "noise_source": "numpy PCG64 seeded per round with 128 bits from os.urandom",
            "mechanism": plan.mechanism,
            **({} if plan.skellam is None else self._skellam_report(plan.skellam)),
        }

    def _skellam_report(self, sk: SkellamPlan) -> dict[str, Any]:
        return {
            "accountant": "Skellam RDP (Agarwal et al. 2021) summed over rounds, converted by "
                          "dp_accounting.rdp.compute_epsilon; zero-out of one device",
            "noise_source": "each device: numpy PCG64 seeded with 128 bits of os.urandom",
            "charged_by_summed": [[k, n] for k, n in sorted(self._summed.items())],
            "scale": sk.scale, "norm_bound": sk.norm_bound, "l1_bound": sk.l1,
            "variance": sk.variance, "device_variance": sk.device_variance,
            "min_summed": sk.min_summed, "max_devices": sk.max_devices,
        }


def guarantee(plan: PrivacyPlan) -> str:
    """The guarantee a plan gives, in one paragraph."""
    if plan.skellam is not None:
        return distributed_guarantee(plan.skellam)
    sampling = (
        "Rounds drawn by the random policy are charged as Poisson subsampling at the "
        "round's rate (devices asked / online eligible candidates), which assumes the draw "
        "is uniform and secret (it comes from the OS CSPRNG) and that a device's "
        "availability does not depend on its data."
        if plan.amplified else
        "No amplification by sampling is claimed (every round is charged at q = 1): the "
        "selection is not a uniform random sample of a known population.")
    return (
        "Central, device-level (epsilon, delta)-differential privacy under "
        "add-or-remove-one-device: the sequence of global models released (and anything "
        "computed from them) changes in distribution by at most (epsilon, delta) whether or "
        "not any one device takes part, with all its data, in any number of rounds. The "
        "aggregator is trusted: it sees each clipped update before the noise. Each update "
        "is clipped to the round's bound, weighs 1, and the sum is divided by a fixed "
        f"denominator ({plan.denominator:g}); Gaussian noise of standard deviation "
        f"{plan.update_noise_multiplier:.4g} x the bound is added to the sum. " + sampling +
        " Not covered: who takes part and when, and the metadata a device sends beside its "
        "update (training loss, sample count, timings), which are recorded without noise.")


def distributed_guarantee(sk: SkellamPlan) -> str:
    """Distributed DP's guarantee, in one paragraph."""
    return (
        "Distributed, device-level (epsilon, delta)-differential privacy under secure "
        "aggregation, for the zero-out of one device (its update replaced by zeros; under "
        "secure aggregation who uploads is seen anyway): the aggregator and everyone after "
        "it learn only each round's masked sum, and that sum already carries the noise. "
        f"Each device clips its update to L2 norm {sk.clip:g}, scales it by {sk.scale:g}, "
        f"rounds it at random within L2 norm {sk.norm_bound:.6g} levels (conditional "
        "rounding) and adds Skellam noise of variance "
        f"{sk.device_variance:.6g} per coordinate from its own OS CSPRNG, before masking. "
        f"The noise is sized for the fewest devices a closing round sums ({sk.min_summed}): "
        "each round is charged with the noise of the devices it summed less one (so no "
        "device's own noise is relied on), and a round with more devices is charged less. "
        "Devices gone after their upload are still summed with their noise; devices that "
        "never uploaded add none. The aggregator is not trusted with any single update, "
        "only to follow the protocol (choose the parameters, keep the budget) and not to "
        "collude with half of a device's neighbours (their shares would unmask it). No "
        "amplification by sampling is claimed (every round is charged at q = 1): the "
        "aggregator draws the sample and sees who uploads, so the sample is no secret from "
        "it. Not covered: who takes part and "
        "when, and the metadata a device sends beside its update (training loss, sample "
        "count, timings), which are recorded without noise.")
