"""One aggregate for every strategy: what a sync round or a FedBuff buffer adds up.

A ``Contribution`` is an accepted update as the ingest pipeline leaves it: its nonzero
coordinates (``indices``; None for a dense update) and values, the weight it counts
with (the samples it trained on, bounded), the strategy's ``scale`` (FedBuff's
staleness discount) and its L2 norm. ``RoundAggregate`` applies the configured rules to
every contribution, whatever the strategy:

- clipping (``clip_norm``): an update longer than the bound is scaled down to it;
- the mean: a streaming float64 sum, to which a sparse update adds in O(nonzeros), so
  ingesting a top-k update of a 1M-parameter model touches ~10k numbers, not 1M;
- a robust rule (median, trimmed mean, Krum, multi-Krum): the updates are kept densely
  in a bounded ``RobustBuffer`` and combined at the end.

Beside the sum, a ``ContributionLog`` keeps each update's direction as a small sketch
(``_contribution``), from which ``records`` gives every device's weight share and its
alignment with the round's consensus when the aggregate is taken.

The aggregate holds no durable state: the journal of accepted updates does, and a
restarted aggregator replays it into a fresh aggregate (sync: the open round's
updates; FedBuff: the open buffer's).

Determinism: the float64 sum, the robust buffer's rows (trimmed mean's partition,
Krum's ties, multi-Krum's mean) and so the result depend on the order updates are
added. The aggregate therefore lists what it added, in order, with the weight, scale,
cut and norm each counted with (``added``); the training ledger records that list as
the entry's canonical accumulation order, and ``ledger verify`` adds the kept bodies in
that order to a fresh ``RoundAggregate`` of the recorded rule: the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cloud_aggregator._aggregation import StreamingAccumulator
from cloud_aggregator._contribution import ContributionLog, ContributionRecord
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._ledger import AddedUpdate, UpdateSource
from cloud_aggregator._robust import RobustBuffer, RobustConfig

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, kw_only=True, eq=False)
class Contribution:
    """An accepted update, ready to add."""

    indices: npt.NDArray[np.integer] | None = field(repr=False)
    values: F32 = field(repr=False)
    weight: float
    norm: float
    scale: float = 1.0
    device: str = ""
    """Who sent it (for its ``ContributionRecord``)."""
    source: UpdateSource | None = None
    """Which update this is (for the training ledger); None: not recorded."""
    cut: float = 1.0
    """The factor ``values`` were already multiplied by (float32) before this, e.g. a
    bootstrapping round's cut to the median norm; recorded, not applied again."""

    def dense(self, size: int) -> F32:
        """The update as a full vector."""
        if self.indices is None:
            return self.values
        out = np.zeros(size, dtype=np.float32)
        out[self.indices] = self.values
        return out


class RoundAggregate:
    """The running aggregate of one round or buffer (see the module doc)."""

    def __init__(self, *, size: int, robust: RobustConfig, capacity: int,
                 max_bytes: int, keep_exact: bool = False) -> None:
        self.size = size
        self.added: list[AddedUpdate] = []
        """What ``add`` took, in order (see the module doc)."""
        self._clip = robust.clip_norm
        self.log = ContributionLog(size=size, keep_exact=keep_exact and robust.method == "mean")
        if robust.method == "mean":
            self._stream: StreamingAccumulator | None = StreamingAccumulator(size=size)
            self._buffer: RobustBuffer | None = None
        else:
            self._stream = None
            self._buffer = RobustBuffer(size=size, max_updates=capacity, max_bytes=max_bytes,
                                        config=robust)

    @property
    def count(self) -> int:
        return self._stream.count if self._stream is not None else self._buffer.count  # type: ignore[union-attr]

    def has_room(self, waiting: int = 0) -> bool:
        """Room for one more update, with ``waiting`` more to be added later."""
        return self._buffer is None or self._buffer.count + waiting < self._buffer.capacity

    def add(self, c: Contribution) -> None:
        """Add one accepted update (clipped when configured)."""
        self._add(c)
        if c.source is not None:
            self.added.append(AddedUpdate(source=c.source, weight=c.weight, scale=c.scale,
                                          cut=c.cut, norm=c.norm))

    def _add(self, c: Contribution) -> None:
        factor = 1.0
        if self._clip is not None and c.norm > self._clip and c.norm > 0:
            factor = self._clip / c.norm
        self.log.note(device=c.device, indices=c.indices, values=c.values, norm=c.norm,
                      weight=c.weight, scale=c.scale, factor=factor)
        if self._stream is not None:
            if c.indices is None:
                update = c.values if factor == 1.0 else c.values * np.float32(factor)
                self._stream.add(update, c.weight, scale=c.scale)
            else:
                self._stream.add_sparse(c.indices, c.values, c.weight, scale=c.scale * factor)
            return
        assert self._buffer is not None
        dense = c.dense(self.size)  # the buffer clips with its own config (clip_norm)
        if c.scale != 1.0:
            dense = dense * np.float32(c.scale)
        verdict = self._buffer.add(dense, weight=c.weight)
        if not verdict.ok:
            raise AggregatorError(f"robust buffer refused an update: {verdict.detail}")

    def result(self) -> F32:
        """The aggregate update; raises ``AggregatorError`` when nothing was added."""
        if self._stream is not None:
            return self._stream.result()
        assert self._buffer is not None
        out = self._buffer.aggregate()
        if not math.isfinite(float(np.abs(out).max(initial=0.0))):
            raise AggregatorError("the robust aggregate is not finite")
        return out

    def records(self, round_index: int, *, marginals: dict[int, float] | None = None
                ) -> tuple[ContributionRecord, ...]:
        """Each device's part in this aggregate (``_contribution``)."""
        return self.log.records(round_index, marginals=marginals)
