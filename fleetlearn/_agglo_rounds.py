"""What an agglomerative aggregator keeps of a round: its children's models one by one.

FedAvg sums a round's updates as they come and keeps no single one. Distillation can use
more: the *ensemble* of the children's models (the weighted mean of their logits on the
bridge inputs) is a better teacher than the model of their averaged parameters when the
children's data differ (the FedDF observation). ``ChildModels`` is a mixin for
``SyncRounds`` strategies that records each counted update of the open round (dense,
in memory, with the weight it counts with; through ``SyncRounds.counted``), and at the
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
import numpy.typing as npt

from cloud_aggregator import Contribution, EdgeRounds, SyncRounds

F32 = npt.NDArray[np.float32]


class ChildModels(SyncRounds):
    """Records the open round's updates; ``children`` after its close (module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._updates: list[tuple[float, F32]] = []
        self.children: list[tuple[float, F32]] = []
        """(weight, model) of each counted child of the last closed round."""

    def opened(self, index: int) -> None:
        super().opened(index)
        self._updates = []
        self.children = []

    def counted(self, contribution: Contribution) -> None:
        super().counted(contribution)
        self._updates.append((float(contribution.weight) * float(contribution.scale),
                              contribution.dense(self.ctx.layout.size).copy()))

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
