"""The cloud's part in agglomerative training: ``AgglomerativeRounds``.

Synchronous rounds whose children (the edges) train the edge-tier model; at each
round's close the strategy

1. FedAvg's the edges' updates as ``SyncRounds`` does (the server optimizer's step);
2. distils the edges' models (the ensemble of their logits, ``_agglo_rounds``; or
   their FedAvg, ``ensemble=False``) into the cloud's own larger model on the bridge
   inputs (child -> parent; the cloud's model continues from its last state);
3. distils the cloud model's soft labels back into the aggregate (parent -> child,
   ``feedback_epochs``), which is the next model the edges receive.

The cloud model lives in the strategy's state (base64 float32), so it is checkpointed
with every round in the same transaction and a restarted cloud resumes it. Its test
accuracy per round (when ``eval_x``/``eval_y`` are given) is in ``tier_accuracy``.

What the ledger re-derives: the model the ledger records after a round is the
released one (step 3's result), which is no longer the server-optimizer step of the
round's aggregate alone: ``fleetlearn ledger verify`` does not re-derive agglomerative
rounds (a known gap).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from device_profiles import ConfigError
from fleetlearn._agglo import TierModel
from fleetlearn._agglo_rounds import F32, ChildModels, ensemble_logits

log = logging.getLogger(__name__)


class AgglomerativeRounds(ChildModels):
    """Sync rounds with a larger cloud model taught by its children (module doc)."""

    name = "sync"  # the same mode on the wire and in the store: only the combine differs

    def __init__(self, *, own: TierModel, child: TierModel, bridge: np.ndarray,
                 eval_x: np.ndarray | None = None, eval_y: np.ndarray | None = None) -> None:
        super().__init__()
        self.own, self.child, self.bridge = own, child, bridge
        self.eval_x, self.eval_y = eval_x, eval_y
        self.tier_params: np.ndarray = own.initial.copy()
        self.tier_accuracy: list[tuple[int, float]] = []
        """(model version, accuracy of the cloud model) after each round."""
        self.distil_kl: list[tuple[float, float]] = []

    def combine(self, params: F32, delta: F32) -> F32:
        aggregate = super().combine(params, delta)
        version = self.ctx.model.version + 1
        if self.own.settings.ensemble and self.children:
            teacher = ensemble_logits(self.child.logits, self.children, self.bridge)
        else:
            teacher = self.child.logits(aggregate, self.bridge)
        up = self.own.distil(self.tier_params, teacher, self.bridge, seed=version)
        self.tier_params = up.params
        self.distil_kl.append((up.kl_before, up.kl_after))
        released = aggregate
        epochs = self.own.settings.feedback_epochs
        if epochs > 0:
            down = self.child.distil(aggregate, self.own.logits(up.params, self.bridge),
                                     self.bridge, epochs=epochs, seed=version)
            released = down.params.astype(np.float32)
        if self.eval_x is not None and self.eval_y is not None:
            accuracy = self.own.accuracy(self.tier_params, self.eval_x, self.eval_y)
            self.tier_accuracy.append((version, accuracy))
            log.info("cloud model %s after version %d: accuracy %.3f (KL %.3f -> %.3f)",
                     self.own.name, version, accuracy, up.kl_before, up.kl_after)
        return released

    def state(self) -> dict[str, Any]:
        out = super().state()
        out["tier_model"] = {
            "name": self.own.name,
            "params": base64.b64encode(self.tier_params.astype("<f4").tobytes()).decode(),
            "accuracy": [list(a) for a in self.tier_accuracy],
        }
        return out

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        tier = state.get("tier_model")
        if tier is None:
            return
        params = np.frombuffer(base64.b64decode(tier["params"]), "<f4").astype(np.float32)
        if tier.get("name") != self.own.name or params.size != self.own.size:
            raise ConfigError(f"the saved cloud model is {tier.get('name')!r} of {params.size} "
                             f"parameters, not {self.own.name!r} of {self.own.size}")
        self.tier_params = params
        self.tier_accuracy = [(int(v), float(a)) for v, a in tier.get("accuracy", [])]
