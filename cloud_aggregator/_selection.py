"""Device selection: which devices train in a round, and how much work each gets.

Policies choose devices; they never touch model updates. Everything they learn
arrives as data: ``feedback(device_id, duration_s=..., completed=..., loss=...)``
after each round, where a missed deadline or a dropout is ``completed=False``.

- :class:`RandomPolicy`: uniform without replacement (FedAvg's baseline).
- :class:`DeadlinePolicy`: FedCS-style, up to ``k`` of the devices predicted to finish
  before the deadline (fastest first, or sampled at random with a small exploration
  share for the others); the fastest when fewer than a quorum fit.
- :class:`TieredPolicy`: TiFL-style, devices grouped into speed tiers; one tier per
  round, picked with probabilities that favour tiers with higher loss, limited by
  per-tier credits.
- :class:`OortPolicy`: Oort-style, statistical utility ``|B_i| * sqrt(mean loss^2)``
  with a staleness bonus, times ``(T / t_i) ** alpha`` for devices slower than the
  preferred duration ``T``; epsilon-greedy exploration of unseen devices (decaying),
  and a participation cap for fairness.

Every policy keeps a :class:`device_profiles.CorrectionEstimator`, so a device that
keeps running late is predicted late (and deprioritised) in later rounds.
:func:`local_steps` sizes a slow device's local work to the deadline instead of
dropping it.

Why this module is longer than 400 lines: the four built-in policies are short
subclasses of ``BasePolicy`` and read best beside it and each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cloud_aggregator._history import DeviceHistory, FleetHistory
from device_profiles import ConfigError, CorrectionEstimator, CostBreakdown, DeviceProfile


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A device that could train this round, as the registry sees it.

    ``predicted_duration_s`` comes from the cost model (uncorrected: the policy
    applies its learned correction); ``num_samples`` is its local data size. How it
    behaved before is in the policy's ``history`` (``BasePolicy.history``).
    """

    device_id: str
    predicted_duration_s: float
    num_samples: int = 0
    profile: DeviceProfile | None = None

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ConfigError("candidate device_id must not be empty")
        if not math.isfinite(self.predicted_duration_s) or self.predicted_duration_s <= 0:
            raise ConfigError(f"{self.device_id}: predicted_duration_s must be positive")
        if self.num_samples < 0:
            raise ConfigError(f"{self.device_id}: num_samples must not be negative")


@runtime_checkable
class SelectionPolicy(Protocol):
    """What the round scheduler needs from a policy."""

    name: str

    def select(
        self,
        candidates: Sequence[Candidate],
        k: int,
        *,
        round_index: int,
        deadline_s: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[str]: ...

    def feedback(
        self,
        device_id: str,
        *,
        duration_s: float | None,
        completed: bool,
        loss: float | None = None,
        num_samples: int | None = None,
    ) -> None: ...

    def state(self) -> dict[str, Any]:
        """What the policy has learned, as JSON-able data (saved with each checkpoint)."""
        ...

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` after a restart."""
        ...


class BasePolicy:
    """The base of every policy, built in or your own: subclass it and write ``choose``.

    ``select`` checks its arguments and calls ``choose``; ``feedback`` teaches the
    duration corrections; ``state``/``load_state`` save and restore what the policy
    learned with every checkpoint. How each device behaved (tasks given, completed and
    missed, last loss and duration) is ``history``, a ``FleetHistory``: the aggregator
    hands its registry's (``use_history``), which the registry records; a policy used
    on its own records into its own from ``select`` and ``feedback``. A subclass may
    use ``expected_duration``/``can_make`` (the cost model's prediction times what the
    device has taught us), ``participations``, ``loss``, ``samples`` and
    ``last_round``, react in ``on_feedback``, and persist its own learning through
    ``extra_state``/``load_extra`` (JSON-able values).

    ``min_reputation`` (the aggregator sets it from ``reputation_floor``): candidates
    whose history's ``reputation`` is below it are left out of ``choose`` while at least
    ``k`` others remain; when fewer do, the best-reputed of them fill up to ``k``
    (an excluded device is asked again only when the fleet is short of trusted ones).
    """

    name = "base"
    min_reputation: float | None = None

    def __init__(self, *, corrections: CorrectionEstimator | None = None,
                 history: FleetHistory | None = None) -> None:
        self.corrections = corrections if corrections is not None else CorrectionEstimator()
        self.history = history if history is not None else FleetHistory()
        self._records_history = history is None
        self._pending: dict[str, tuple[float, float | None]] = {}  # predicted, deadline

    def use_history(self, history: FleetHistory) -> None:
        """Read the devices' histories from ``history``, which its owner records (the
        aggregator hands its registry's): the policy stops recording its own."""
        self.history = history
        self._records_history = False

    # -- the public protocol --------------------------------------------------------

    def select(
        self,
        candidates: Sequence[Candidate],
        k: int,
        *,
        round_index: int,
        deadline_s: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[str]:
        """Up to ``k`` device ids, chosen among ``candidates`` (order = priority)."""
        if k < 0:
            raise ConfigError(f"k must not be negative, got {k}")
        if deadline_s is not None and (not math.isfinite(deadline_s) or deadline_s <= 0):
            raise ConfigError("deadline_s must be positive")
        ids = [c.device_id for c in candidates]
        if len(set(ids)) != len(ids):
            raise ConfigError("candidates contain the same device twice")
        if k == 0 or not candidates:
            return []
        generator = rng if rng is not None else np.random.default_rng(round_index)
        chosen = self.choose(
            self.trusted(candidates, k), k, round_index=round_index, deadline_s=deadline_s,
            rng=generator)
        by_id = {c.device_id: c for c in candidates}
        for device_id in chosen:
            self._pending[device_id] = (by_id[device_id].predicted_duration_s, deadline_s)
        if self._records_history:
            self.history.selected(chosen, round_index)
        return chosen

    def feedback(
        self,
        device_id: str,
        *,
        duration_s: float | None,
        completed: bool,
        loss: float | None = None,
        num_samples: int | None = None,
    ) -> None:
        """What happened to a selected device: its duration, whether it made it, its loss.

        ``completed=False`` with no duration is a dropout or a silent miss: it counts
        as a missed deadline and, when the round had a deadline, pushes the device's
        duration correction up.
        """
        if duration_s is not None and (not math.isfinite(duration_s) or duration_s < 0):
            raise ConfigError("duration_s must be a non-negative number")
        if loss is not None and (not math.isfinite(loss) or loss < 0):
            raise ConfigError("loss must be a non-negative number")
        if self._records_history:
            self.history.finished(device_id, completed=completed, duration_s=duration_s,
                                  loss=loss, num_samples=num_samples)
        pending = self._pending.pop(device_id, None)
        if pending is not None:
            predicted, deadline = pending
            self.corrections.observe(device_id, predicted, duration_s, deadline_s=deadline)
        self.on_feedback(device_id, self.history.get(device_id), completed=completed)

    def state(self) -> dict[str, Any]:
        """Learned corrections, devices awaiting feedback, the subclass's own state (the
        devices' histories are their owner's to save: the registry's, or, for a policy
        used on its own, ``history``'s)."""
        return {
            "policy": self.name,
            "factors": self.corrections.to_dict(),
            "observations": self.corrections.counts(),
            "pending": {d: list(v) for d, v in self._pending.items()},
            **self.extra_state(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`. The duration corrections describe devices, not the
        policy, so they are restored whichever policy saved them; the rest only when
        it was this one."""
        try:
            self.corrections.load(state.get("factors", {}), state.get("observations", {}))
            if state.get("policy") != self.name:
                return
            self._pending = {str(d): (float(v[0]), None if v[1] is None else float(v[1]))
                             for d, v in state.get("pending", {}).items()}
            self.load_extra(state)
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise ConfigError(f"saved selection state is malformed: {exc}") from exc

    def trusted(self, candidates: Sequence[Candidate], k: int) -> list[Candidate]:
        """``candidates`` without those below ``min_reputation`` while ``k`` remain
        (see the class doc); order kept."""
        floor = self.min_reputation
        if floor is None:
            return list(candidates)
        score = {c.device_id: self.history.get(c.device_id).reputation for c in candidates}
        kept = [c for c in candidates if score[c.device_id] >= floor]
        if len(kept) >= k or len(kept) == len(candidates):
            return kept
        others = sorted((c for c in candidates if score[c.device_id] < floor),
                        key=lambda c: -score[c.device_id])
        back = {c.device_id for c in others[:k - len(kept)]}
        return [c for c in candidates if c.device_id in back or score[c.device_id] >= floor]

    # -- helpers for subclasses ----------------------------------------------------

    def can_make(self, candidate: Candidate, deadline_s: float | None) -> bool:
        """Is the device expected to finish within ``deadline_s`` (always, without one)?"""
        return deadline_s is None or self.expected_duration(candidate) <= deadline_s

    def expected_duration(self, candidate: Candidate) -> float:
        """The cost model's prediction times what this device has taught us."""
        return self.corrections.corrected(candidate.device_id, candidate.predicted_duration_s)

    def participations(self, candidate: Candidate) -> int:
        return self.history.get(candidate.device_id).selections

    def loss(self, candidate: Candidate) -> float | None:
        return self.history.get(candidate.device_id).last_loss

    def samples(self, candidate: Candidate) -> int:
        """The samples the device last trained on, else its reported data size.

        With adaptive local work a device asked for fewer steps contributes a smaller
        update, and Oort's utility should say so: ranking devices by data size instead
        made Oort both slower and less accurate in ``bench/scheduling.py`` (2.9x mean
        speedup and -1.7 points, against 3.9x and -1.0 points).
        """
        reported = self.history.get(candidate.device_id).reported_samples
        return reported if reported is not None else candidate.num_samples

    def last_round(self, candidate: Candidate) -> int | None:
        return self.history.get(candidate.device_id).last_round

    def choose(
        self,
        candidates: list[Candidate],
        k: int,
        *,
        round_index: int,
        deadline_s: float | None,
        rng: np.random.Generator,
    ) -> list[str]:
        """Up to ``k`` of ``candidates``' ids, best first (``candidates`` is non-empty,
        without duplicates, and ``k`` >= 1). ``rng`` is seeded per round: use it, not a
        global generator, so a seed gives the same run."""
        raise NotImplementedError(f"{type(self).__name__} must implement choose()")

    def on_feedback(self, device_id: str, history: DeviceHistory, *, completed: bool) -> None:
        """After each ``feedback`` (``history``: the device's record, updated)."""
        del device_id, history, completed

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra(self, state: Mapping[str, Any]) -> None:
        del state


class RandomPolicy(BasePolicy):
    """Uniform random selection without replacement: the baseline every policy beats."""

    name = "random"

    def choose(
        self,
        candidates: list[Candidate],
        k: int,
        *,
        round_index: int,
        deadline_s: float | None,
        rng: np.random.Generator,
    ) -> list[str]:
        picks = rng.choice(len(candidates), size=min(k, len(candidates)), replace=False)
        return [candidates[int(i)].device_id for i in picks]


class DeadlinePolicy(BasePolicy):
    """FedCS-style: devices predicted to finish within the deadline.

    A candidate fits when its expected duration (the cost model's prediction of the
    task it would be sent, adaptive local work included, times its learned
    correction) is within ``deadline * slack``; ``k`` caps the count.

    FedCS takes as many devices as will finish: with ``max_devices`` set, up to that
    many fitting devices are chosen even when ``k`` is smaller (a device that finishes
    within the deadline adds data to the round without making it longer); without
    it, ``k`` caps the count.

    ``sampling="fastest"`` takes the fitting devices fastest first, as FedCS's greedy
    rule does. ``sampling="random"`` (what the aggregator uses) samples uniformly
    among the fitting ones: always taking the fastest trains the same few devices and
    leaves every other device's data out of the model. Each slot goes to a device
    that does not fit with probability ``exploration`` (nearer misses more likely),
    but only to one observed fewer than ``explore_until`` times: exploring shows a
    device whose prediction is wrong, and once its correction has learned from it
    there is nothing left to show (each further try would only cost the round its
    whole deadline). When fewer than ``min_devices`` fit, the fastest devices fill up
    to that many (a round below its quorum could not close). Without a deadline: the
    ``k`` fastest.
    """

    name = "deadline"

    def __init__(
        self,
        *,
        slack: float = 1.0,
        sampling: str = "fastest",
        exploration: float = 0.0,
        explore_until: int = 2,
        min_devices: int = 1,
        max_devices: int | None = None,
        corrections: CorrectionEstimator | None = None,
    ) -> None:
        super().__init__(corrections=corrections)
        if not 0.0 < slack <= 1.0:
            raise ConfigError("deadline slack must be within (0, 1]")
        if sampling not in ("fastest", "random"):
            raise ConfigError("deadline sampling must be 'fastest' or 'random'")
        if not 0.0 <= exploration <= 1.0:
            raise ConfigError("exploration must be within [0, 1]")
        if explore_until < 0:
            raise ConfigError("explore_until must not be negative")
        if min_devices < 1:
            raise ConfigError("min_devices must be at least 1")
        if max_devices is not None and max_devices < 1:
            raise ConfigError("max_devices must be at least 1")
        self.slack = slack
        self.sampling = sampling
        self.exploration = exploration
        self.explore_until = explore_until
        self.min_devices = min_devices
        self.max_devices = max_devices

    def choose(
        self,
        candidates: list[Candidate],
        k: int,
        *,
        round_index: int,
        deadline_s: float | None,
        rng: np.random.Generator,
    ) -> list[str]:
        ranked = sorted(candidates, key=lambda c: (self.expected_duration(c), c.device_id))
        if deadline_s is None:
            return [c.device_id for c in ranked[:k]]
        budget = deadline_s * self.slack
        fits = [c for c in ranked if self.expected_duration(c) <= budget]
        misses = [c for c in ranked[len(fits):]
                  if self.corrections.observations(c.device_id) < self.explore_until]
        floor = min(self.min_devices, k)
        if len(fits) < floor:
            return [c.device_id for c in ranked[:floor]]
        n_explore = int(rng.binomial(k, self.exploration)) if misses and self.exploration else 0
        n_explore = min(n_explore, len(misses), k - floor)
        n_fit = min(max(k, self.max_devices or 0) - n_explore, len(fits))
        if self.sampling == "random":
            chosen = [fits[int(i)].device_id
                      for i in rng.choice(len(fits), size=n_fit, replace=False)]
        else:
            chosen = [c.device_id for c in fits[:n_fit]]
        if n_explore:
            nearness = np.array([budget / self.expected_duration(c) for c in misses])
            chosen += [misses[i].device_id for i in _weighted_sample(nearness, n_explore, rng)]
        return chosen


class TieredPolicy(BasePolicy):
    """TiFL-style: speed tiers, one tier per round, chosen adaptively.

    Devices are sorted by expected duration and split into ``num_tiers`` equal
    groups (tier 0 is the fastest). A tier's weight is the mean loss its devices
    last reported (tiers that lag in accuracy are trained more), mixed with a
    uniform share ``uniform_mix`` so no tier starves; a tier with ``credits`` used
    up is skipped until every tier has used its credits. With a deadline, tiers
    whose fastest device cannot make it are skipped.
    """

    name = "tiered"

    def __init__(
        self,
        *,
        num_tiers: int = 5,
        credits: int | None = None,
        uniform_mix: float = 0.2,
        corrections: CorrectionEstimator | None = None,
    ) -> None:
        super().__init__(corrections=corrections)
        if num_tiers < 1:
            raise ConfigError("num_tiers must be at least 1")
        if credits is not None and credits < 1:
            raise ConfigError("tier credits must be at least 1")
        if not 0.0 <= uniform_mix <= 1.0:
            raise ConfigError("uniform_mix must be within [0, 1]")
        self.num_tiers = num_tiers
        self.credits = credits
        self.uniform_mix = uniform_mix
        self._used = np.zeros(num_tiers, dtype=int)
        self.last_tier: int | None = None
        self.last_probabilities: np.ndarray | None = None

    def extra_state(self) -> dict[str, Any]:
        return {"tier_credits_used": [int(x) for x in self._used]}

    def load_extra(self, state: Mapping[str, Any]) -> None:
        used = state.get("tier_credits_used")
        if used is not None and len(used) == self.num_tiers:
            self._used = np.array([int(x) for x in used], dtype=int)

    def tiers(self, candidates: Sequence[Candidate]) -> list[list[Candidate]]:
        """Candidates split into speed tiers, fastest first (empty tiers dropped)."""
        ranked = sorted(candidates, key=lambda c: (self.expected_duration(c), c.device_id))
        groups = np.array_split(np.arange(len(ranked)), min(self.num_tiers, len(ranked)))
        return [[ranked[int(i)] for i in g] for g in groups if len(g)]

    def tier_probabilities(self, tiers: Sequence[Sequence[Candidate]]) -> np.ndarray:
        means = []
        for tier in tiers:
            losses = [v for v in (self.loss(c) for c in tier) if v is not None]
            means.append(float(np.mean(losses)) if losses else math.nan)
        arr = np.array(means, dtype=float)
        known = arr[~np.isnan(arr)]
        fill = float(known.mean()) if known.size and known.sum() > 0 else 1.0
        arr = np.where(np.isnan(arr), fill, arr)
        if arr.sum() <= 0:
            arr = np.ones_like(arr)
        loss_based = arr / arr.sum()
        uniform = np.full(len(tiers), 1.0 / len(tiers))
        p: np.ndarray = (1.0 - self.uniform_mix) * loss_based + self.uniform_mix * uniform
        return p

    def choose(
        self,
        candidates: list[Candidate],
        k: int,
        *,
        round_index: int,
        deadline_s: float | None,
        rng: np.random.Generator,
    ) -> list[str]:
        tiers = self.tiers(candidates)
        p = self.tier_probabilities(tiers)
        allowed = np.ones(len(tiers), dtype=bool)
        if self.credits is not None:
            used = self._used[: len(tiers)]
            if (used >= self.credits).all():
                self._used[:] = 0  # every tier spent its credits: start a new epoch
            allowed &= self._used[: len(tiers)] < self.credits
        if deadline_s is not None:
            fits = np.array([self.can_make(t[0], deadline_s) for t in tiers])
            if fits.any():
                allowed &= fits
            if not allowed.any():
                allowed = fits if fits.any() else np.ones(len(tiers), dtype=bool)
        if not allowed.any():
            allowed[:] = True
        p = np.where(allowed, p, 0.0)
        p = p / p.sum()
        tier_index = int(rng.choice(len(tiers), p=p))
        self._used[tier_index] += 1
        self.last_tier = tier_index
        self.last_probabilities = p
        tier = tiers[tier_index]
        if deadline_s is not None:
            tier = [c for c in tier if self.can_make(c, deadline_s)] or tier
        picks = rng.choice(len(tier), size=min(k, len(tier)), replace=False)
        return [tier[int(i)].device_id for i in picks]


class OortPolicy(BasePolicy):
    """Oort-style guided participant selection.

    Utility of an explored device ``i``: ``|B_i| * loss_i`` (``loss_i`` being the RMS
    per-sample loss it reported, so ``|B_i| * sqrt(mean loss^2)``), normalised by the
    largest such value, plus a staleness bonus ``sqrt(staleness * ln(round + 1) /
    (last_round + 1))``; if its expected duration ``t_i`` exceeds the preferred
    duration ``T`` it is multiplied by ``(T / t_i) ** alpha``. ``T`` is
    ``preferred_duration_s`` if given, else the ``preferred_quantile`` of the eligible
    devices' expected durations, capped by the round deadline (a generous deadline
    alone would leave every device below ``T``, its speed unweighed). Under a deadline
    a device expected to miss it has no utility at all, since its update would be
    discarded (``(T / t_i) ** alpha`` alone barely separates a device just past the
    deadline from one just within it).

    A fraction epsilon of the slots (decaying each round to ``min_exploration``) goes
    to unexplored devices (never selected, no loss known), faster ones more likely
    and those expected to miss the deadline only when no other is left; the rest are
    sampled by utility among devices within ``cutoff`` of the k-th best. A device
    that was selected but never reported a loss (it missed or dropped out) is
    explored: its statistical utility is zero, leaving the staleness bonus. Devices
    selected ``max_participation`` times are no longer eligible.
    """

    name = "oort"

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        exploration: float = 0.9,
        exploration_decay: float = 0.98,
        min_exploration: float = 0.3,
        cutoff: float = 0.95,
        staleness: float = 0.1,
        max_participation: int | None = None,
        preferred_duration_s: float | None = None,
        preferred_quantile: float = 0.5,
        corrections: CorrectionEstimator | None = None,
    ) -> None:
        super().__init__(corrections=corrections)
        if alpha < 0:
            raise ConfigError("alpha must not be negative")
        if not 0.0 <= min_exploration <= exploration <= 1.0:
            raise ConfigError("need 0 <= min_exploration <= exploration <= 1")
        if not 0.0 < exploration_decay <= 1.0:
            raise ConfigError("exploration_decay must be within (0, 1]")
        if not 0.0 < cutoff <= 1.0:
            raise ConfigError("cutoff must be within (0, 1]")
        if staleness < 0:
            raise ConfigError("staleness must not be negative")
        if max_participation is not None and max_participation < 1:
            raise ConfigError("max_participation must be at least 1")
        if preferred_duration_s is not None and preferred_duration_s <= 0:
            raise ConfigError("preferred_duration_s must be positive")
        if not 0.0 < preferred_quantile <= 1.0:
            raise ConfigError("preferred_quantile must be within (0, 1]")
        self.alpha = alpha
        self.epsilon = exploration
        self.exploration_decay = exploration_decay
        self.min_exploration = min_exploration
        self.cutoff = cutoff
        self.staleness = staleness
        self.max_participation = max_participation
        self.preferred_duration_s = preferred_duration_s
        self.preferred_quantile = preferred_quantile

    def extra_state(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def load_extra(self, state: Mapping[str, Any]) -> None:
        if "epsilon" in state:
            self.epsilon = min(1.0, max(self.min_exploration, float(state["epsilon"])))

    def explored(self, candidate: Candidate) -> bool:
        """Has this device been tried: a loss known, or selected before?"""
        return self.loss(candidate) is not None or self.participations(candidate) > 0

    def utilities(
        self,
        candidates: Sequence[Candidate],
        *,
        round_index: int,
        preferred_s: float,
        deadline_s: float | None = None,
    ) -> dict[str, float]:
        """Oort utility of every explored candidate (see :meth:`explored`)."""
        raw: dict[str, float] = {}
        for c in candidates:
            loss = self.loss(c)
            if loss is not None:
                raw[c.device_id] = max(self.samples(c), 1) * loss
            elif self.explored(c):  # tried, never reported: no statistical utility
                raw[c.device_id] = 0.0
        if not raw:
            return {}
        top = max(raw.values()) or 1.0
        out: dict[str, float] = {}
        for c in candidates:
            if c.device_id not in raw:
                continue
            if not self.can_make(c, deadline_s):
                out[c.device_id] = 0.0
                continue
            last = self.last_round(c)
            bonus = math.sqrt(
                self.staleness
                * math.log(round_index + 1.0)
                / ((last if last is not None else 0) + 1.0)
            )
            util = raw[c.device_id] / top + bonus
            t = self.expected_duration(c)
            if t > preferred_s:
                util *= (preferred_s / t) ** self.alpha
            out[c.device_id] = util
        return out

    def choose(
        self,
        candidates: list[Candidate],
        k: int,
        *,
        round_index: int,
        deadline_s: float | None,
        rng: np.random.Generator,
    ) -> list[str]:
        cap = self.max_participation
        eligible = [c for c in candidates if cap is None or self.participations(c) < cap]
        if not eligible:
            return []
        k = min(k, len(eligible))
        durations = {c.device_id: self.expected_duration(c) for c in eligible}
        preferred = self.preferred_duration_s
        if preferred is None:
            preferred = float(np.quantile(list(durations.values()), self.preferred_quantile))
            if deadline_s is not None:
                preferred = min(preferred, deadline_s)
        utils = self.utilities(eligible, round_index=round_index, preferred_s=preferred,
                               deadline_s=deadline_s)
        explored = [c for c in eligible if c.device_id in utils]
        unexplored = [c for c in eligible if c.device_id not in utils]

        n_explore = min(len(unexplored), round(self.epsilon * k))
        n_exploit = min(len(explored), k - n_explore)
        n_explore = min(len(unexplored), k - n_exploit)  # fill from the other pool

        chosen: list[str] = []
        if n_exploit:
            ranked = sorted(explored, key=lambda c: (-utils[c.device_id], c.device_id))
            threshold = utils[ranked[n_exploit - 1].device_id] * self.cutoff
            pool = [c for c in ranked if utils[c.device_id] >= threshold]
            weights = np.array([utils[c.device_id] for c in pool], dtype=float)
            picks = _weighted_sample(weights, n_exploit, rng)
            chosen += [pool[i].device_id for i in picks]
        if n_explore:
            speed = np.array([1.0 / durations[c.device_id] if self.can_make(c, deadline_s)
                              else 0.0 for c in unexplored])
            picks = _weighted_sample(speed, n_explore, rng)
            chosen += [unexplored[i].device_id for i in picks]
        self.epsilon = max(self.min_exploration, self.epsilon * self.exploration_decay)
        return chosen


def _weighted_sample(weights: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` distinct indices, probability proportional to weight (uniform if all zero)."""
    w = np.clip(np.asarray(weights, dtype=float), 0.0, None)
    positive = int((w > 0).sum())
    if positive < n:  # not enough weighted entries: give the rest a tiny share
        w = w + (w.max() if w.max() > 0 else 1.0) * 1e-6
    p = w / w.sum()
    return [int(i) for i in rng.choice(len(w), size=n, replace=False, p=p)]


# -- adapting local work --------------------------------------------------------------------


def local_steps(
    deadline_s: float,
    *,
    step_time_s: float,
    fixed_s: float = 0.0,
    max_steps: int,
    min_steps: int = 1,
) -> int:
    """How many local steps fit in the deadline after the fixed costs (0 = skip device).

    A slow device is given fewer steps rather than dropped; it reports the sample
    count it really trained on, and aggregation weights by that.
    """
    if step_time_s <= 0 or not math.isfinite(step_time_s):
        raise ConfigError("step_time_s must be positive")
    if max_steps < 0 or min_steps < 1:
        raise ConfigError("need max_steps >= 0 and min_steps >= 1")
    budget = deadline_s - fixed_s
    if budget <= 0:
        return 0
    steps = min(max_steps, math.floor(budget / step_time_s + 1e-9))
    return steps if steps >= min_steps else 0


def local_steps_for(
    cost: CostBreakdown, deadline_s: float, *, factor: float = 1.0, min_steps: int = 1
) -> int:
    """:func:`local_steps` from a cost-model prediction, scaled by a learned correction."""
    return local_steps(
        deadline_s,
        step_time_s=cost.step_s * factor,
        fixed_s=cost.fixed_s * factor,
        max_steps=cost.steps,
        min_steps=min_steps,
    )


# -- registry -------------------------------------------------------------------------------

POLICIES: Mapping[str, Callable[..., BasePolicy]] = {
    "random": RandomPolicy,
    "deadline": DeadlinePolicy,
    "tiered": TieredPolicy,
    "oort": OortPolicy,
}


def make_policy(name: str, **options: Any) -> SelectionPolicy:
    """A policy by name with its options; unknown names and options raise ConfigError."""
    try:
        factory = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ConfigError(f"unknown selection policy {name!r}; known: {known}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for selection policy {name!r}: {exc}") from exc
