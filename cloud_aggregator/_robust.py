"""Robust aggregation: norm clipping, coordinate-wise median and trimmed mean, Krum.

Clipping works on a stream (clip, then add to a ``StreamingAccumulator``). The other
rules need all of a round's updates at once, so they run over a ``RobustBuffer``
whose size is fixed at construction:

    memory = max_updates x model size x 4 bytes  (the float32 updates)
           + 2 x max_updates^2 x 8 bytes          (Krum's distances + a partitioned copy)
           + a bounded working block              (median / trimmed mean / Gram product)

Krum's pairwise distances come from the Gram matrix (|a-b|^2 = |a|^2 + |b|^2 - 2 a.b),
accumulated over column blocks, never from n^2 difference vectors of model size.
Robust rules ignore sample weights: a Byzantine device would simply claim many samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from cloud_aggregator._aggregation import ACCEPTED, FloatArray, Reason, Verdict, l2_norm
from cloud_aggregator._errors import AggregatorError
from device_profiles._errors import ConfigError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# Column block for the blockwise kernels: bounds their temporaries to about
# n x BLOCK_VALUES x 8 bytes whatever the model size.
BLOCK_VALUES = 1 << 16


def clip_by_norm(update: FloatArray, max_norm: float) -> F32:
    """``update`` scaled down to L2 norm ``max_norm`` if above it (a float32 copy)."""
    if not max_norm > 0:
        raise ConfigError(f"max_norm must be positive, got {max_norm}")
    norm = l2_norm(update)
    out = np.asarray(update, dtype=np.float32).copy()
    if norm > max_norm:
        out *= np.float32(max_norm / norm)
    return out


def _check_matrix(updates: np.ndarray) -> None:
    if updates.ndim != 2 or updates.shape[0] == 0 or updates.shape[1] == 0:
        raise AggregatorError(f"expected a non-empty (n, d) matrix, got {updates.shape}")


def _column_blocks(n_cols: int, block: int) -> list[slice]:
    return [slice(j, min(j + block, n_cols)) for j in range(0, n_cols, block)]


def coordinate_median(updates: np.ndarray, *, block: int = BLOCK_VALUES) -> F32:
    """Per-coordinate median over the rows of an (n, d) matrix."""
    _check_matrix(updates)
    out = np.empty(updates.shape[1], dtype=np.float32)
    for cols in _column_blocks(updates.shape[1], block):
        out[cols] = np.median(updates[:, cols], axis=0)
    return out


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values are dropped at each end of a coordinate's sorted column."""
    return math.floor(trim_fraction * n)


def trimmed_mean(updates: np.ndarray, trim_fraction: float, *, block: int = BLOCK_VALUES) -> F32:
    """Per-coordinate mean after dropping the ``floor(trim_fraction * n)`` smallest and
    largest values (``np.partition``: O(n) per coordinate, no full sort)."""
    _check_matrix(updates)
    if not 0 <= trim_fraction < 0.5:
        raise ConfigError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = updates.shape[0]
    k = trim_count(n, trim_fraction)
    out = np.empty(updates.shape[1], dtype=np.float32)
    for cols in _column_blocks(updates.shape[1], block):
        part = updates[:, cols]
        if k:
            part = np.partition(part, (k, n - k - 1), axis=0)[k : n - k]
        out[cols] = part.mean(axis=0, dtype=np.float64)
    return out


def pairwise_sq_distances(updates: np.ndarray, *, block: int = BLOCK_VALUES) -> F64:
    """(n, n) squared L2 distances via the Gram matrix, accumulated over column blocks.

    Memory is n x n x 8 bytes (the Gram matrix, turned into distances in place) plus
    one n x block float64 slice.
    """
    _check_matrix(updates)
    n = updates.shape[0]
    gram = np.zeros((n, n), dtype=np.float64)
    for cols in _column_blocks(updates.shape[1], block):
        part = updates[:, cols].astype(np.float64)
        gram += part @ part.T
    sq = np.diag(gram).copy()
    gram *= -2.0
    gram += sq[:, None]
    gram += sq[None, :]
    np.maximum(gram, 0.0, out=gram)  # rounding can leave tiny negatives
    np.fill_diagonal(gram, 0.0)
    return gram


def krum_min_updates(f: int) -> int:
    """Krum's guarantee needs n > 2f + 2 updates for f Byzantine ones."""
    return 2 * f + 3


def krum_scores(dist: F64, f: int) -> F64:
    """Score of each update: sum of squared distances to its n - f - 2 nearest others."""
    n = dist.shape[0]
    if f < 0:
        raise ConfigError(f"f must be >= 0, got {f}")
    if n < krum_min_updates(f):
        raise AggregatorError(f"Krum with f={f} needs at least {krum_min_updates(f)} updates")
    k = n - f - 2
    others = dist.copy()  # the second n x n matrix; partitioned in place
    np.fill_diagonal(others, np.inf)
    others.partition(k - 1, axis=1)
    return others[:, :k].sum(axis=1)


def krum_select(updates: np.ndarray, *, f: int, m: int = 1) -> tuple[int, ...]:
    """Indices of the ``m`` updates with the lowest Krum scores, best first."""
    scores = krum_scores(pairwise_sq_distances(updates), f)
    if not 1 <= m <= updates.shape[0]:
        raise ConfigError(f"multi-Krum m must be in [1, {updates.shape[0]}], got {m}")
    order = np.argsort(scores, kind="stable")[:m]
    return tuple(int(i) for i in order)


def krum(updates: np.ndarray, *, f: int) -> F32:
    """Krum (Blanchard et al., 2017): the single update closest to its neighbours."""
    (best,) = krum_select(updates, f=f, m=1)
    return np.asarray(updates[best], dtype=np.float32).copy()


def multi_krum(updates: np.ndarray, *, f: int, m: int) -> F32:
    """Multi-Krum: the plain mean of the ``m`` best-scored updates."""
    chosen = list(krum_select(updates, f=f, m=m))
    return updates[chosen].mean(axis=0, dtype=np.float64).astype(np.float32)


# --------------------------------------------------------------------------- config


RobustMethod = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]


@dataclass(frozen=True, kw_only=True)
class RobustConfig:
    """Which robust rule a round uses, and its parameters.

    ``clip_norm`` clips each update as it enters the buffer. ``byzantine`` is Krum's f;
    ``multi_krum_m`` defaults to n - f. ``mean`` is the sample-weighted mean (FedAvg).
    """

    method: RobustMethod = "median"
    trim_fraction: float = 0.1
    byzantine: int = 0
    multi_krum_m: int | None = None
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.method not in ("mean", "median", "trimmed_mean", "krum", "multi_krum"):
            raise ConfigError(f"unknown robust method {self.method!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.byzantine < 0:
            raise ConfigError(f"byzantine must be >= 0, got {self.byzantine}")
        if self.multi_krum_m is not None and self.multi_krum_m < 1:
            raise ConfigError(f"multi_krum_m must be >= 1, got {self.multi_krum_m}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be positive, got {self.clip_norm}")

    @property
    def uses_krum(self) -> bool:
        return self.method in ("krum", "multi_krum")

    def min_updates(self) -> int:
        """Fewest updates the rule can aggregate (the strategy checks before closing)."""
        return krum_min_updates(self.byzantine) if self.uses_krum else 1


def robust_memory_bytes(*, size: int, max_updates: int, krum: bool) -> int:
    """Bytes a ``RobustBuffer`` needs for its updates (and Krum's distance matrix)."""
    return max_updates * size * 4 + (2 * max_updates * max_updates * 8 if krum else 0)


def robust_aggregate(
    updates: np.ndarray, config: RobustConfig, *, weights: FloatArray | None = None
) -> F32:
    """Aggregate an (n, d) matrix of (already clipped) updates with ``config``'s rule."""
    _check_matrix(updates)
    if config.method == "mean":
        w = np.ones(updates.shape[0]) if weights is None else np.asarray(weights, np.float64)
        total = np.zeros(updates.shape[1], dtype=np.float64)
        for row, wi in zip(updates, w, strict=True):
            total += wi * row.astype(np.float64)
        return (total / w.sum()).astype(np.float32)
    if config.method == "median":
        return coordinate_median(updates)
    if config.method == "trimmed_mean":
        return trimmed_mean(updates, config.trim_fraction)
    if config.method == "krum":
        return krum(updates, f=config.byzantine)
    m = config.multi_krum_m or updates.shape[0] - config.byzantine
    return multi_krum(updates, f=config.byzantine, m=min(m, updates.shape[0]))


class RobustBuffer:
    """A round's updates held in one preallocated float32 matrix, bounded by rule.

    Construction refuses (``AggregatorError``) a configuration whose worst case,
    ``robust_memory_bytes``, exceeds ``max_bytes``; ``add`` then returns a
    ``BUFFER_FULL`` verdict past ``max_updates`` instead of growing. The matrix is
    allocated with ``np.empty``, so untouched rows cost no resident memory on Linux.
    """

    def __init__(
        self, *, size: int, max_updates: int, max_bytes: int, config: RobustConfig
    ) -> None:
        if size <= 0 or max_updates <= 0:
            raise AggregatorError(f"size and max_updates must be positive ({size}, {max_updates})")
        need = robust_memory_bytes(size=size, max_updates=max_updates, krum=config.uses_krum)
        if need > max_bytes:
            raise AggregatorError(
                f"{max_updates} updates of {size} values need {need} bytes "
                f"(> max_bytes {max_bytes}); lower max_updates or raise max_bytes"
            )
        self._config = config
        self._rows = np.empty((max_updates, size), dtype=np.float32)
        self._weights = np.empty(max_updates, dtype=np.float64)
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return int(self._rows.shape[0])

    @property
    def config(self) -> RobustConfig:
        return self._config

    def add(self, update: FloatArray, *, weight: float = 1.0) -> Verdict:
        """Store one validated update (clipped if configured); refuse it when full."""
        if self._count >= self.capacity:
            return Verdict(reason=Reason.BUFFER_FULL, detail=f"buffer holds {self.capacity}")
        if update.shape != (self._rows.shape[1],):
            return Verdict(
                reason=Reason.WRONG_SIZE,
                detail=f"expected {self._rows.shape[1]} values, got {update.shape}",
            )
        if not (weight > 0 and math.isfinite(weight)):
            return Verdict(reason=Reason.BAD_WEIGHT, detail=f"weight {weight}")
        if self._config.clip_norm is not None:
            update = clip_by_norm(update, self._config.clip_norm)
        self._rows[self._count] = update
        self._weights[self._count] = weight
        self._count += 1
        return ACCEPTED

    def aggregate(self) -> F32:
        """The configured robust aggregate of the updates held so far."""
        if self._count < self._config.min_updates():
            raise AggregatorError(
                f"{self._config.method} needs {self._config.min_updates()} updates, "
                f"have {self._count}"
            )
        return robust_aggregate(
            self._rows[: self._count], self._config, weights=self._weights[: self._count]
        )

    def reset(self) -> None:
        self._count = 0
