"""What the fleet taught the aggregator, saved with every model version.

The policy's duration corrections and statistics, the observed compression, the
screens' histories and the strategy's own state are what the next round depends on.
They are written in the checkpoint's transaction (``STATE_BLOB``), so a restarted
aggregator schedules and screens as the one that stopped would have. A state dir
holds one run: another mode or other model artifacts are refused, not mixed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._planner import WorkPlanner
from cloud_aggregator._privacy import CentralDP
from cloud_aggregator._screen import NormScreen, WeightBound
from cloud_aggregator._selection import SelectionPolicy
from cloud_aggregator._store import Store, StoreError
from cloud_aggregator._strategy import ModelState, Strategy
from device_profiles import ConfigError

STATE_BLOB = "aggregator"


def read_json_blob(store: Store, name: str) -> Any:
    """The JSON state ``name`` (None when absent); ``StoreError`` when unreadable."""
    raw = store.get_state(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"state {name!r} in {store.path} is unreadable ({exc}); "
                         "restore the store from a backup or use another state dir") from exc


class LearnedState:
    """Writes and restores ``STATE_BLOB`` from and into the parts that learn."""

    def __init__(self, *, config: AggregatorConfig, store: Store, state_dir: Path,
                 content_hash: str, model: ModelState, strategy: Strategy,
                 policy: SelectionPolicy, screen: NormScreen, weights: WeightBound,
                 planner: Callable[[], WorkPlanner], privacy: CentralDP | None = None) -> None:
        self._config, self._store, self._state_dir = config, store, state_dir
        self._content_hash = content_hash
        self._model, self._strategy, self._policy = model, strategy, policy
        self._screen, self._weights, self._planner = screen, weights, planner
        self._privacy = privacy

    def to_bytes(self) -> bytes:
        planner = self._planner()
        return json.dumps({
            "mode": self._config.mode, "model": self._config.model,
            "content_hash": self._content_hash, "model_version": self._model.version,
            "emulated_total_s": self._model.emulated_total_s,
            "strategy": self._strategy.state(),
            "selection": self._policy.state(),
            "accepted_norms": self._screen.history,
            "accepted_weights": self._weights.history,
            "body_bytes": [planner.body_bytes_sum, planner.body_count],
            "privacy": self._privacy.state() if self._privacy is not None else None,
        }, sort_keys=True).encode()

    def restore(self) -> None:
        """Load the saved state into the parts (nothing saved yet: nothing to do)."""
        state = read_json_blob(self._store, STATE_BLOB)
        if state is None:
            return
        if not isinstance(state, dict):
            raise StoreError(f"state {STATE_BLOB!r} in {self._store.path} is not an object")
        if state.get("mode") != self._config.mode:
            raise ConfigError(
                f"{self._state_dir} holds a {state.get('mode')} run; use another state_dir")
        if state.get("content_hash") != self._content_hash:
            raise ConfigError(f"{self._state_dir} was trained with other model artifacts")
        self._model.emulated_total_s = float(state.get("emulated_total_s", 0.0))
        strategy_state = state.get("strategy")
        if strategy_state is None and "abandoned_streak" in state:  # before strategies
            strategy_state = {"abandoned_streak": state["abandoned_streak"]}
        self._strategy.load_state(strategy_state or {})
        if "selection" in state:
            self._policy.load_state(state["selection"])
        self._screen.load(state.get("accepted_norms", []))
        self._weights.load(state.get("accepted_weights", []))
        privacy = state.get("privacy")
        if self._privacy is not None:
            self._privacy.load_state(privacy or {})
        elif privacy:
            raise ConfigError(f"{self._state_dir} holds a differentially private run; keep "
                              "its dp_* settings or use another state_dir")
        body_sum, body_count = state.get("body_bytes", [0, 0])
        planner = self._planner()
        planner.body_bytes_sum, planner.body_count = int(body_sum), int(body_count)
