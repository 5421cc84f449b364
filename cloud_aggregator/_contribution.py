"""What each device contributed to an aggregate, and the reputation built from it.

For every sync round and every FedBuff release, each counted update gets a
``ContributionRecord``:

- ``weight``: its share of the aggregate, ``w_i * s_i / sum_j w_j`` (its bounded weight
  times the strategy's scale, FedBuff's staleness discount, over the total weight):
  the coefficient of its update in the weighted mean. Robust rules other than the mean
  ignore weights; the record then says the share it would have had.
- ``cosine``: its alignment with the round's consensus, the cosine between the update
  and the sum of the *other* updates of the round, each taken at unit length
  (``sum_{j != i} u_j / |u_j|``). Unit length: one long update cannot set the direction
  the others are judged against; leaving itself out: an update does not vote for
  itself. With fewer than ``MIN_CONSENSUS`` (4) updates there is no consensus (None):
  one or two others are a comparison, not a consensus.
- ``marginal``: optional (``contribution_marginal``), its leave-one-out contribution
  to the validation accuracy of the server's evaluation set: accuracy of
  ``params + aggregate`` minus that of ``params + aggregate without it`` (a plain
  step, without the server optimizer's momentum: an approximation). It costs one
  evaluation per update; mean aggregation only.

Cosines are computed from a count sketch of each update (``SKETCH_DIM`` buckets,
float64; exact when the model has no more parameters than that): a top-k update is
sketched in O(nonzeros), a dense one in O(size), and a round keeps 32 KB per update
whatever the model size. The estimate of a cosine has a standard error of about
``sqrt((1 + cos^2) / SKETCH_DIM)``, 0.016 to 0.022.

Reputation (``reputation``): per device, two exponentially decayed means over its
observations, each starting from one pseudo-observation (the prior):

    A = (sum_k DECAY^k c_k + DECAY^n * PRIOR_ALIGNMENT) / (sum_k DECAY^k + DECAY^n)
        over the cosines c_k of its counted updates, newest first;
    R = (sum_k DECAY^k r_k) / (sum_k DECAY^k + DECAY^n)
        over its screened tasks, r_k = 1 when a screen refused its update, 0 when it
        counted;
    reputation = (1 - R) * clip((A - BAD_ALIGNMENT) / (GOOD_ALIGNMENT - BAD_ALIGNMENT), 0, 1)

``DECAY = 0.8``: the latest observation weighs a fifth of the mean once there is
history; a new device starts at 1. Honest devices' consensus cosines are well above
``GOOD_ALIGNMENT``; a device sending sign-flipped updates falls to 0 after one or two
counted updates, and one refused twice in a row is below a floor of 0.3 (``R = 0.74``;
once: ``R = 0.56``, reputation 0.44).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud_aggregator._errors import StoreError

SKETCH_DIM = 4096
"""Buckets of the count sketch an update's direction is kept in (float64: 32 KB)."""
DECAY = 0.8
"""Weight of the past in the reputation's decayed means, per observation."""
PRIOR_ALIGNMENT = 0.2
"""The alignment a device starts with (one pseudo-observation): a new device counts
fully, and one update whose consensus cosine is below about -0.2 takes it under a floor
of 0.3 (honest devices' cosines were above 0.015 in 95% of rounds on the reference task,
sign-flipped updates' between -0.16 and -0.9)."""
GOOD_ALIGNMENT = 0.05
"""A decayed alignment at or above this counts fully."""
BAD_ALIGNMENT = -0.05
"""A decayed alignment at or below this makes the reputation 0."""
SCREEN_CODES = frozenset({"norm_above_median", "norm_above_model", "norm_above_cap",
                          "non_finite"})
"""Refusals that say the update itself was anomalous (a missed deadline or a stale
model version says nothing of the device's honesty)."""


@dataclass(frozen=True)
class ContributionRecord:
    """One device's part in one aggregate (a sync round, or a FedBuff release, whose
    ``round`` is the model version it built). See the module doc for each field."""

    device: str
    round: int
    weight: float
    cosine: float | None
    marginal: float | None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (floats rounded to 6 decimals; None stays null)."""
        return {"device": self.device, "round": self.round, "weight": round(self.weight, 6),
                "cosine": None if self.cosine is None else round(self.cosine, 6),
                "marginal": None if self.marginal is None else round(self.marginal, 6)}

    @classmethod
    def from_json(cls, data: Any) -> ContributionRecord:
        """Parse ``to_json``'s output; anything else is a ``StoreError`` saying what."""
        if not isinstance(data, Mapping):
            raise StoreError(f"a contribution record is an object, not {type(data).__name__}")
        try:
            device, index = data["device"], data["round"]
            weight = data["weight"]
            cosine, marginal = data.get("cosine"), data.get("marginal")
        except KeyError as exc:
            raise StoreError(f"a contribution record lacks {exc.args[0]!r}") from exc
        if not isinstance(device, str) or not device:
            raise StoreError(f"contribution record: device must be a non-empty string, "
                             f"got {device!r}")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise StoreError(f"contribution record: round must be an integer >= 0, "
                             f"got {index!r}")
        if not _finite(weight) or weight < 0:
            raise StoreError(f"contribution record: weight must be finite and >= 0, "
                             f"got {weight!r}")
        for name, value in (("cosine", cosine), ("marginal", marginal)):
            if value is not None and not _finite(value):
                raise StoreError(f"contribution record: {name} must be a number or null, "
                                 f"got {value!r}")
        if cosine is not None and not -1.0 - 1e-6 <= cosine <= 1.0 + 1e-6:
            raise StoreError(f"contribution record: cosine {cosine} is outside [-1, 1]")
        return cls(device=device, round=index, weight=float(weight),
                   cosine=None if cosine is None else float(cosine),
                   marginal=None if marginal is None else float(marginal))


def _finite(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


# --------------------------------------------------------------------------- sketches


MIN_CONSENSUS = 4
"""Updates an aggregate needs before any is judged against the others (three others at
least): in a round of two, honest devices with different data point apart and each
would be the other's attacker; a consensus needs a few voices (an edge with two or three
children has none, and its devices' reputation does not move)."""


@functools.lru_cache(maxsize=4)
def _signed_buckets(size: int) -> npt.NDArray[np.int32] | None:
    """Each coordinate's bucket, plus ``SKETCH_DIM`` where its sign is negative (one
    int32 table: a single gather per update; None: exact, size <= dim)."""
    if size <= SKETCH_DIM:
        return None
    rng = np.random.default_rng(0x5EED)
    bucket = rng.integers(0, SKETCH_DIM, size=size)
    negative = rng.choice(np.array([-1.0, 1.0]), size=size) < 0
    return (bucket + SKETCH_DIM * negative).astype(np.int32)


def sketch(indices: npt.NDArray[np.integer] | None, values: npt.NDArray[np.floating],
           size: int) -> npt.NDArray[np.float64]:
    """A linear sketch of an update whose inner products estimate the update's (exact
    when ``size <= SKETCH_DIM``); ``indices`` None: ``values`` is dense."""
    signed_bucket = _signed_buckets(size)
    if signed_bucket is None:
        v = np.asarray(values, dtype=np.float64)
        if indices is None:
            return v.copy()
        out = np.zeros(size, dtype=np.float64)
        np.add.at(out, indices, v)
        return out
    where = signed_bucket if indices is None else signed_bucket[indices]
    counts = np.bincount(where, weights=values, minlength=2 * SKETCH_DIM)
    return np.asarray(counts[:SKETCH_DIM] - counts[SKETCH_DIM:], dtype=np.float64)


@dataclass(kw_only=True, eq=False)
class _Entry:
    device: str
    weight: float
    scale: float
    unit: npt.NDArray[np.float64] | None = field(repr=False)
    """The sketch scaled to the update's unit length (None: a zero update)."""
    exact: Any = field(default=None, repr=False)
    """The update as added (indices, values, factor), kept for the marginal."""


class ContributionLog:
    """What a ``RoundAggregate`` remembers of each update to write its records."""

    def __init__(self, *, size: int, keep_exact: bool = False) -> None:
        self.size = size
        self.keep_exact = keep_exact
        self._entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, *, device: str, indices: npt.NDArray[np.integer] | None,
             values: npt.NDArray[np.floating], norm: float, weight: float, scale: float,
             factor: float = 1.0) -> None:
        """One update added with ``weight`` and ``scale`` (``factor``: its clipping)."""
        unit = None
        if norm > 0 and math.isfinite(norm):
            unit = sketch(indices, values, self.size) / norm
        exact = (indices, values, factor) if self.keep_exact else None
        self._entries.append(_Entry(device=device, weight=weight, scale=scale, unit=unit,
                                    exact=exact))

    def records(self, round_index: int, *, marginals: Mapping[int, float] | None = None
                ) -> tuple[ContributionRecord, ...]:
        """One record per device (a device with two updates in one buffer: their shares
        added, their cosines averaged), in the order the devices first contributed."""
        entries = self._entries
        total = sum(e.weight for e in entries)
        units = [e.unit for e in entries if e.unit is not None]
        consensus = np.sum(units, axis=0) if len(units) >= MIN_CONSENSUS else None
        by_device: dict[str, list[tuple[float, float | None, float | None]]] = {}
        for i, e in enumerate(entries):
            cos = None
            if consensus is not None and e.unit is not None:
                cos = _cosine(e.unit, consensus - e.unit)
            share = e.weight * e.scale / total if total > 0 else 0.0
            marginal = None if marginals is None else marginals.get(i)
            by_device.setdefault(e.device, []).append((share, cos, marginal))
        out = []
        for device, parts in by_device.items():
            cosines = [c for _, c, _ in parts if c is not None]
            margins = [m for _, _, m in parts if m is not None]
            out.append(ContributionRecord(
                device=device, round=round_index, weight=sum(s for s, _, _ in parts),
                cosine=sum(cosines) / len(cosines) if cosines else None,
                marginal=sum(margins) if margins else None))
        return tuple(out)

    def marginals(self, *, aggregate: npt.NDArray[np.float32], params: npt.NDArray[np.float32],
                  accuracy: Callable[[npt.NDArray[np.float32]], float]) -> dict[int, float]:
        """Leave-one-out: accuracy with the whole aggregate minus without entry ``i``'s
        update (the weighted mean of the others; none left: the model unchanged)."""
        if not self.keep_exact or not self._entries:
            return {}
        total = sum(e.weight for e in self._entries)
        weighted_sum = aggregate.astype(np.float64) * total
        base = accuracy((params + aggregate).astype(np.float32))
        out: dict[int, float] = {}
        for i, e in enumerate(self._entries):
            indices, values, factor = e.exact
            rest = total - e.weight
            if rest <= 0:
                without = params
            else:
                mine = np.zeros(self.size, dtype=np.float64)
                coef = e.weight * e.scale * factor
                if indices is None:
                    mine += np.asarray(values, np.float64) * coef
                else:
                    np.add.at(mine, indices, np.asarray(values, np.float64) * coef)
                without = (params + (weighted_sum - mine) / rest).astype(np.float32)
            out[i] = base - accuracy(np.asarray(without, np.float32))
        return out


def _cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float | None:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return None
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


# --------------------------------------------------------------------------- reputation


@dataclass(frozen=True, kw_only=True)
class Standing:
    """A device's decayed sums (without the prior): what its reputation is made of."""

    alignment_sum: float = 0.0
    alignment_weight: float = 0.0
    refusal_sum: float = 0.0
    refusal_weight: float = 0.0

    def observed(self, *, cosine: float | None = None, refused: bool | None = None
                 ) -> Standing:
        """After one more observation: a counted update's ``cosine`` (None: no
        consensus to judge it by) and whether a screen refused it (``refused``)."""
        a_sum, a_w = self.alignment_sum, self.alignment_weight
        r_sum, r_w = self.refusal_sum, self.refusal_weight
        if cosine is not None:
            a_sum, a_w = DECAY * a_sum + cosine, DECAY * a_w + 1.0
        if refused is not None:
            r_sum, r_w = DECAY * r_sum + float(refused), DECAY * r_w + 1.0
        return Standing(alignment_sum=a_sum, alignment_weight=a_w, refusal_sum=r_sum,
                        refusal_weight=r_w)


def decayed_alignment(s: Standing) -> float:
    """A: the decayed mean of the cosines, the prior one pseudo-observation."""
    prior = DECAY ** _count(s.alignment_weight)
    return (s.alignment_sum + prior * PRIOR_ALIGNMENT) / (s.alignment_weight + prior)


def refusal_rate(s: Standing) -> float:
    """R: the decayed share of screened tasks refused, the prior one clean task."""
    prior = DECAY ** _count(s.refusal_weight)
    return s.refusal_sum / (s.refusal_weight + prior)


def reputation(s: Standing) -> float:
    """``(1 - R) * clip((A - BAD) / (GOOD - BAD), 0, 1)``, in [0, 1] (module doc)."""
    a = (decayed_alignment(s) - BAD_ALIGNMENT) / (GOOD_ALIGNMENT - BAD_ALIGNMENT)
    return (1.0 - refusal_rate(s)) * min(1.0, max(0.0, a))


def _count(weight: float) -> float:
    """How many observations a decayed weight stands for: w = (1 - d^n) / (1 - d)."""
    if weight <= 0:
        return 0.0
    left = 1.0 - weight * (1.0 - DECAY)
    return math.log(left) / math.log(DECAY) if left > 0 else math.inf


def weight_factor(score: float, floor: float | None) -> float:
    """What an update's weight is multiplied by: 1 at or above the floor, else the
    reputation (at least 0.001: a weight must stay positive)."""
    if floor is None or score >= floor:
        return 1.0
    return max(score, 1e-3)


def summary(records: Iterable[ContributionRecord]) -> dict[str, float | None]:
    """Mean and minimum cosine of a round's records (None without cosines)."""
    cosines = [r.cosine for r in records if r.cosine is not None]
    if not cosines:
        return {"mean": None, "min": None}
    return {"mean": sum(cosines) / len(cosines), "min": min(cosines)}


def parse_records(data: Sequence[Any]) -> tuple[ContributionRecord, ...]:
    """A list of ``to_json`` objects back into records."""
    return tuple(ContributionRecord.from_json(d) for d in data)
