"""Streaming aggregation: update validation, FedAvg, and FedBuff-style async buffering.

An update is a flat float32 vector (locally trained weights minus the global weights
the device started from), weighted by the device's sample count. Everything here is
pure numpy maths or a small accumulator; choosing devices and deciding what to do with
a rejected update belong to the strategy, which receives a ``Verdict`` as data.

Memory: the ``StreamingAccumulator`` holds one float64 sum and one float64 scratch
vector of the model's size, however many devices report (O(model size)).

Why this module is longer than 400 lines: the update rules, the accumulator and the
staleness rules are the pure maths every strategy shares, tested together.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np
import numpy.typing as npt

from broker_bridge import AckCode
from cloud_aggregator._errors import AggregatorError, UpdateRejected
from device_profiles._errors import ConfigError

FloatArray = npt.NDArray[np.floating]


class Reason(StrEnum):
    """Machine-readable tag of a verdict (also ``UpdateRejected.reason``): the ack codes
    of the protocol (``broker_bridge.AckCode``), so a device reads what it is told."""

    OK = "ok"
    WRONG_SHAPE = AckCode.WRONG_SHAPE
    WRONG_SIZE = AckCode.WRONG_SIZE
    WRONG_DTYPE = AckCode.WRONG_DTYPE
    NON_FINITE = AckCode.NON_FINITE
    NORM_ABOVE_CAP = AckCode.NORM_ABOVE_CAP
    NORM_ABOVE_MEDIAN = AckCode.NORM_ABOVE_MEDIAN
    NORM_ABOVE_MODEL = AckCode.NORM_ABOVE_MODEL
    BAD_WEIGHT = AckCode.BAD_WEIGHT
    TOO_STALE = AckCode.TOO_STALE
    FROM_FUTURE = AckCode.FROM_FUTURE
    BUFFER_FULL = AckCode.BUFFER_FULL


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The outcome of checking one update against the round's rules.

    Returned rather than raised: a rejected update is ordinary data for the strategy
    (count it, log it, tell the device), not a failure of the aggregator.
    """

    reason: Reason
    norm: float = math.nan
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is Reason.OK

    def to_error(self, *, device_id: str = "") -> UpdateRejected:
        """The same verdict as an exception, for callers that must raise."""
        return UpdateRejected(
            self.detail or str(self.reason), reason=str(self.reason), device_id=device_id
        )


ACCEPTED = Verdict(reason=Reason.OK)


@dataclass(frozen=True, kw_only=True)
class UpdateRules:
    """What an acceptable update looks like in a round.

    ``max_norm`` is an absolute L2 cap; ``median_multiple`` rejects an update whose norm
    exceeds that multiple of the median norm of the updates accepted so far in the
    round, once at least ``min_history`` norms are known (a median of one or two
    updates would let the first arrival set the bar).
    """

    size: int
    max_norm: float | None = None
    median_multiple: float | None = None
    min_history: int = 3

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"update size must be positive, got {self.size}")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ConfigError(f"max_norm must be positive, got {self.max_norm}")
        if self.median_multiple is not None and not self.median_multiple > 0:
            raise ConfigError(f"median_multiple must be positive, got {self.median_multiple}")
        if self.min_history < 1:
            raise ConfigError(f"min_history must be at least 1, got {self.min_history}")


def l2_norm(update: FloatArray) -> float:
    """L2 norm accumulated in float64 (a float32 dot product overflows early)."""
    return math.sqrt(float(np.einsum("i,i->", update, update, dtype=np.float64)))


def validate_update(
    update: np.ndarray, *, rules: UpdateRules, accepted_norms: Sequence[float] = ()
) -> Verdict:
    """Check one decoded update: shape, size, dtype, finiteness, norm cap, norm vs median.

    ``accepted_norms`` are the norms of the updates already accepted this round (the
    ``norm`` of their verdicts); rejected ones must not be included, or an attacker
    could raise the median with its own refused updates.
    """
    if update.ndim != 1:
        return Verdict(reason=Reason.WRONG_SHAPE, detail=f"expected 1-D, got {update.shape}")
    if update.size != rules.size:
        return Verdict(
            reason=Reason.WRONG_SIZE, detail=f"expected {rules.size} values, got {update.size}"
        )
    if not np.issubdtype(update.dtype, np.floating):
        return Verdict(reason=Reason.WRONG_DTYPE, detail=f"expected floats, got {update.dtype}")
    if not bool(np.isfinite(update).all()):
        return Verdict(reason=Reason.NON_FINITE, detail="update holds NaN or Inf")
    norm = l2_norm(update)
    if rules.max_norm is not None and norm > rules.max_norm:
        return Verdict(
            reason=Reason.NORM_ABOVE_CAP, norm=norm, detail=f"norm {norm:.4g} > {rules.max_norm}"
        )
    if rules.median_multiple is not None and len(accepted_norms) >= rules.min_history:
        median = float(np.median(np.asarray(accepted_norms, dtype=np.float64)))
        if norm > rules.median_multiple * median:
            return Verdict(
                reason=Reason.NORM_ABOVE_MEDIAN,
                norm=norm,
                detail=f"norm {norm:.4g} > {rules.median_multiple} x median {median:.4g}",
            )
    return Verdict(reason=Reason.OK, norm=norm)


# --------------------------------------------------------------------------- streaming


_SNAPSHOT_MAGIC = b"FLACC"
_SNAPSHOT_VERSION = 1
_SNAPSHOT_HEADER = struct.Struct("<5sBQQd")  # magic, version, size, count, total_weight
_CRC = struct.Struct("<I")


@dataclass(frozen=True, kw_only=True, eq=False)
class AccumulatorSnapshot:
    """The exact state of a ``StreamingAccumulator`` (float64 sum, weight, count).

    ``to_bytes`` keeps every bit of the float64 sum, so a round resumed from a snapshot
    continues to the same result as one that never stopped.
    """

    size: int
    count: int
    total_weight: float
    weighted_sum: npt.NDArray[np.float64] = field(repr=False)

    def to_bytes(self) -> bytes:
        head = _SNAPSHOT_HEADER.pack(
            _SNAPSHOT_MAGIC, _SNAPSHOT_VERSION, self.size, self.count, self.total_weight
        )
        body = head + np.ascontiguousarray(self.weighted_sum, dtype="<f8").tobytes()
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> AccumulatorSnapshot:
        """Parse a snapshot; lengths are checked before anything is allocated."""
        n_head = _SNAPSHOT_HEADER.size
        if len(data) < n_head + _CRC.size:
            raise AggregatorError(f"accumulator snapshot too short ({len(data)} bytes)")
        magic, version, size, count, total = _SNAPSHOT_HEADER.unpack_from(data)
        if magic != _SNAPSHOT_MAGIC or version != _SNAPSHOT_VERSION:
            raise AggregatorError("not an accumulator snapshot (magic or version)")
        if len(data) != n_head + 8 * size + _CRC.size:
            raise AggregatorError(f"accumulator snapshot length does not match size {size}")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[: -_CRC.size]) != crc:
            raise AggregatorError("accumulator snapshot checksum mismatch")
        total_sum = np.frombuffer(data, dtype="<f8", count=size, offset=n_head).astype(np.float64)
        return cls(size=size, count=count, total_weight=total, weighted_sum=total_sum)


class StreamingAccumulator:
    """Running weighted sum of updates: add each as it arrives, never keep the updates.

    ``add(update, weight, scale=s)`` adds ``weight * s * update`` to the sum and
    ``weight`` to the total; ``result()`` is ``sum / total``. With ``scale = 1`` that is
    FedAvg; FedBuff passes the staleness discount as ``scale`` so stale updates both
    count less and shrink the step. Sums are float64 so the order of arrival barely
    matters and a snapshot resumes exactly.
    """

    def __init__(self, *, size: int) -> None:
        if size <= 0:
            raise AggregatorError(f"accumulator size must be positive, got {size}")
        self._size = size
        self._sum = np.zeros(size, dtype=np.float64)
        self._scratch = np.empty(size, dtype=np.float64)
        self._total_weight = 0.0
        self._count = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, update: FloatArray, weight: float, *, scale: float = 1.0) -> None:
        """Accumulate one validated update (a wrong size here is a caller bug: raises)."""
        if update.shape != (self._size,):
            raise AggregatorError(f"update shape {update.shape} != ({self._size},)")
        if not (weight > 0 and math.isfinite(weight)):
            raise AggregatorError(f"weight must be positive and finite, got {weight}")
        if not (scale >= 0 and math.isfinite(scale)):
            raise AggregatorError(f"scale must be non-negative and finite, got {scale}")
        np.multiply(update, weight * scale, out=self._scratch, dtype=np.float64)
        self._sum += self._scratch
        self._total_weight += weight
        self._count += 1

    def add_sparse(
        self, indices: npt.NDArray[np.integer], values: FloatArray, weight: float, *,
        scale: float = 1.0,
    ) -> None:
        """Accumulate an update given by its nonzero coordinates, in O(len(indices)).

        The same sum as ``add`` of the dense vector; repeated indices add up.
        """
        if indices.shape != values.shape or indices.ndim != 1:
            raise AggregatorError("sparse update: indices and values differ in shape")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self._size):
            raise AggregatorError("sparse update: an index is outside the model")
        if not (weight > 0 and math.isfinite(weight)):
            raise AggregatorError(f"weight must be positive and finite, got {weight}")
        if not (scale >= 0 and math.isfinite(scale)):
            raise AggregatorError(f"scale must be non-negative and finite, got {scale}")
        contribution = values.astype(np.float64) * (weight * scale)
        if indices.size < 2 or bool(np.all(indices[1:] > indices[:-1])):
            self._sum[indices] += contribution  # distinct indices: one fancy-indexed add
        else:
            np.add.at(self._sum, indices, contribution)
        self._total_weight += weight
        self._count += 1

    def merge(self, other: StreamingAccumulator) -> None:
        """Fold another accumulator of the same size in (sharded aggregation)."""
        if other.size != self._size:
            raise AggregatorError(f"cannot merge size {other.size} into {self._size}")
        self._sum += other._sum
        self._total_weight += other._total_weight
        self._count += other._count

    def result(self) -> npt.NDArray[np.float32]:
        """The weighted mean update; raises if nothing was added (check ``count``)."""
        if self._count == 0:
            raise AggregatorError("no update accumulated")
        np.divide(self._sum, self._total_weight, out=self._scratch)  # no fresh 8n bytes
        return self._scratch.astype(np.float32)

    def reset(self) -> None:
        self._sum.fill(0.0)
        self._total_weight = 0.0
        self._count = 0

    def snapshot(self) -> AccumulatorSnapshot:
        return AccumulatorSnapshot(
            size=self._size,
            count=self._count,
            total_weight=self._total_weight,
            weighted_sum=self._sum.copy(),
        )

    @classmethod
    def from_snapshot(cls, snapshot: AccumulatorSnapshot) -> StreamingAccumulator:
        acc = cls(size=snapshot.size)
        acc._sum[:] = snapshot.weighted_sum
        acc._total_weight = snapshot.total_weight
        acc._count = snapshot.count
        return acc

    def to_bytes(self) -> bytes:
        return self.snapshot().to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamingAccumulator:
        return cls.from_snapshot(AccumulatorSnapshot.from_bytes(data))


def fedavg(updates: Sequence[FloatArray], weights: Sequence[float]) -> npt.NDArray[np.float32]:
    """FedAvg: the mean of updates weighted by sample counts (float64 sum, float32 out)."""
    if len(updates) != len(weights):
        raise AggregatorError(f"{len(updates)} updates but {len(weights)} weights")
    if not updates:
        raise AggregatorError("no update to average")
    acc = StreamingAccumulator(size=int(updates[0].size))
    for update, weight in zip(updates, weights, strict=True):
        acc.add(update, float(weight))
    return acc.result()


# --------------------------------------------------------------------------- FedBuff

StalenessKind = Literal["constant", "sqrt", "polynomial"]


@dataclass(frozen=True, kw_only=True)
class StalenessPolicy:
    """How an async update's weight decays with staleness, and when it is refused.

    staleness = current model version - version the device trained from. ``sqrt`` is
    s(t) = 1/sqrt(1+t) (FedBuff's choice), ``polynomial`` is (1+t)^-exponent,
    ``constant`` is 1. Updates staler than ``max_staleness`` are rejected by rule.
    """

    kind: StalenessKind = "sqrt"
    exponent: float = 0.5
    max_staleness: int | None = 16

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "sqrt", "polynomial"):
            raise ConfigError(f"unknown staleness kind {self.kind!r}")
        if not self.exponent >= 0:
            raise ConfigError(f"staleness exponent must be >= 0, got {self.exponent}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be >= 0, got {self.max_staleness}")


def staleness_discount(staleness: int, policy: StalenessPolicy) -> float:
    """s(staleness) under ``policy`` (1 for a fresh update)."""
    if staleness < 0:
        raise AggregatorError(f"staleness must be >= 0, got {staleness}")
    if policy.kind == "constant":
        return 1.0
    if policy.kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    return float((1.0 + staleness) ** -policy.exponent)


def check_staleness(*, trained_from: int, current_version: int, policy: StalenessPolicy) -> Verdict:
    """Reject updates from a model version the server has not published, or too old."""
    staleness = current_version - trained_from
    if staleness < 0:
        return Verdict(
            reason=Reason.FROM_FUTURE,
            detail=f"trained from version {trained_from} > current {current_version}",
        )
    if policy.max_staleness is not None and staleness > policy.max_staleness:
        return Verdict(
            reason=Reason.TOO_STALE,
            detail=f"staleness {staleness} > max {policy.max_staleness}",
        )
    return ACCEPTED


def fedbuff_aggregate(
    updates: Sequence[FloatArray],
    samples: Sequence[float],
    staleness: Sequence[int],
    policy: StalenessPolicy,
) -> npt.NDArray[np.float32]:
    """sum(n_i * s(t_i) * u_i) / sum(n_i): FedBuff's (1/K) sum s(t_i) u_i when all n_i equal."""
    if not len(updates) == len(samples) == len(staleness):
        raise AggregatorError("updates, samples and staleness differ in length")
    if not updates:
        raise AggregatorError("no update to aggregate")
    acc = StreamingAccumulator(size=int(updates[0].size))
    for update, n, tau in zip(updates, samples, staleness, strict=True):
        acc.add(update, float(n), scale=staleness_discount(int(tau), policy))
    return acc.result()


@dataclass(frozen=True, kw_only=True, eq=False)
class AsyncOutcome:
    """What happened to one update offered to a ``FedBuffBuffer``.

    ``aggregate`` is set when this update filled the buffer: the strategy applies it
    with the server optimizer and publishes a new model version.
    """

    verdict: Verdict
    staleness: int
    discount: float = 0.0
    aggregate: npt.NDArray[np.float32] | None = field(default=None, repr=False)


class FedBuffBuffer:
    """FedBuff-style async aggregation: accumulate, release a mean every ``buffer_size``.

    Only the running sum is kept (O(model size)); the buffer does not track model
    versions itself, the caller passes the current one with every update.
    """

    def __init__(
        self, *, size: int, buffer_size: int, policy: StalenessPolicy | None = None
    ) -> None:
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be at least 1, got {buffer_size}")
        self._buffer_size = buffer_size
        self._policy = policy or StalenessPolicy()
        self._acc = StreamingAccumulator(size=size)

    @property
    def pending(self) -> int:
        return self._acc.count

    @property
    def buffer_size(self) -> int:
        return self._buffer_size

    @property
    def policy(self) -> StalenessPolicy:
        return self._policy

    def add(
        self, update: FloatArray, *, samples: float, trained_from: int, current_version: int
    ) -> AsyncOutcome:
        """Apply the staleness rule, accumulate, and release the mean when the buffer fills."""
        staleness = current_version - trained_from
        verdict = check_staleness(
            trained_from=trained_from, current_version=current_version, policy=self._policy
        )
        if not verdict.ok:
            return AsyncOutcome(verdict=verdict, staleness=staleness)
        if not (samples > 0 and math.isfinite(samples)):
            bad = Verdict(reason=Reason.BAD_WEIGHT, detail=f"sample count {samples}")
            return AsyncOutcome(verdict=bad, staleness=staleness)
        discount = staleness_discount(staleness, self._policy)
        self._acc.add(update, float(samples), scale=discount)
        aggregate = None
        if self._acc.count >= self._buffer_size:
            aggregate = self._acc.result()
            self._acc.reset()
        return AsyncOutcome(
            verdict=ACCEPTED, staleness=staleness, discount=discount, aggregate=aggregate
        )

    def snapshot(self) -> AccumulatorSnapshot:
        return self._acc.snapshot()

    def restore(self, snapshot: AccumulatorSnapshot) -> None:
        """Resume a partially filled buffer (after a restart)."""
        if snapshot.size != self._acc.size:
            raise AggregatorError(f"snapshot size {snapshot.size} != {self._acc.size}")
        self._acc = StreamingAccumulator.from_snapshot(snapshot)
