"""What an agglomerative aggregator keeps of a round: its children's models one by one.

FedAvg sums a round's updates as they come and keeps no single one. Distillation can use
more: the *ensemble* of the children's models (the weighted mean of their logits on the
bridge inputs) is a better teacher than the model of their averaged parameters when the
children's data differ (the FedDF observation). ``ChildModels`` is a mixin for
``SyncRounds`` strategies that records each counted update of the open round (dense,
in memory, with the weight it counts with) beside the normal aggregate, and at the
round's close keeps the children's models (the round's base model plus each update) in
``children`` until the next round opens.

Only counted updates are recorded (a deferred one, kept aside by a bootstrapping round,
is not), so the ensemble weighs what the aggregate weighs. A restarted aggregator
rebuilds the open round from its journal through the same aggregate, so its records are
rebuilt too; the models of a round closed before a restart are gone (``children`` is
empty: callers fall back to the aggregate). Memory: one dense vector per update of the
open round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloud_aggregator import EdgeRounds
from cloud_aggregator._aggregate import Contribution
from cloud_aggregator._sync import F32, SyncRounds


class _Recording:
    """An aggregate that also writes down what it adds."""

    def __init__(self, inner: Any, sink: list[tuple[float, F32]], size: int) -> None:
        self._inner, self._sink, self._size = inner, sink, size

    def add(self, c: Contribution) -> None:
        self._inner.add(c)
        self._sink.append((float(c.weight) * float(c.scale), c.dense(self._size).copy()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ChildModels(SyncRounds):
    """Records the open round's updates; ``children`` after its close (module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._updates: list[tuple[float, F32]] = []
        self.children: list[tuple[float, F32]] = []
        """(weight, model) of each counted child of the last closed round."""

    def _begin(self, index: int, selected: list[str], *, quorum: int, deadline_s: float,
               started_at: float, q: float | None = None) -> None:
        super()._begin(index, selected, quorum=quorum, deadline_s=deadline_s,
                       started_at=started_at, q=q)
        assert self._open is not None
        self._updates = []
        self.children = []
        self._open.aggregate = _Recording(  # type: ignore[assignment]
            self._open.aggregate, self._updates, self.ctx.layout.size)

    def combine(self, params: F32, delta: F32) -> F32:
        base = np.asarray(params, np.float32)
        self.children = [(w, base + d) for w, d in self._updates if w > 0]
        self._updates = []
        return super().combine(params, delta)


class AggloEdgeRounds(ChildModels, EdgeRounds):
    """An agglomerative edge's strategy: ``EdgeRounds`` that keeps its children's models."""


def ensemble_logits(logits: Any, children: list[tuple[float, F32]], x: np.ndarray) -> Any:
    """The weighted mean of ``logits(model, x)`` over ``children`` (weight, model)."""
    total = sum(w for w, _ in children)
    out = sum(w * logits(m, x) for w, m in children) / total
    return np.asarray(out, np.float32)
