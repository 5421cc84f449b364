"""What the default configuration checks before an update may move the model.

Two screens, both relative to what the fleet itself has been sending, so neither has
an absolute threshold that a broken model (or another model) could trip for everyone:

- ``NormScreen``: an update whose L2 norm exceeds ``multiple`` times the median norm of
  the last ``window`` accepted updates is refused (``norm_above_median``). The median
  is robust: devices holding less than half of that history cannot move it far.
- ``WeightBound``: an update's weight (the samples it claims) is cut to what its task
  allowed (epochs x the data size the device announced in its hello, or
  ``max_steps`` x batch size) and to ``multiple`` times the median weight of recent
  accepted updates. The weight used is the bounded one.

Two cases need more than a median of the past:

- *Bootstrap*: with fewer than ``min_history`` accepted norms there is no median to
  trust. A synchronous round then keeps the updates it receives aside (stored and
  acknowledged, not yet added) and judges them together when it closes, against the
  median of the round's own norms: an outlier is cut to the threshold there
  (``clip_factor``). An async aggregator has no round to wait for; it refuses, while
  bootstrapping, updates longer than the global model itself (``norm_above_model``).
- *Order*: a synchronous round judges every update against the history as it was when
  the round opened (``freeze``; accepted updates join it when the round ends), so the
  verdicts do not depend on the order in which a round's updates arrive.
- *A history that no longer describes the fleet* (the model changed, the learning
  rate changed, or the model broke): when, in one round (or one async buffer), the
  screen refused most of the devices that sent an update, and at least
  ``min_history`` of them, the history is replaced by that round's norms
  (``end_epoch``). A minority of devices can never trigger this, so an attacker cannot
  reset the screen, and a majority is never refused for ever.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from device_profiles import ConfigError

NORM_WINDOW = 100
"""Accepted update norms (and weights) kept as the screens' history."""
MIN_HISTORY = 3
"""Accepted updates needed before a median is trusted."""
MAX_EPOCH_DEVICES = 10_000


def _median(values: Iterable[float]) -> float:
    return float(np.median(np.asarray(list(values), dtype=np.float64)))


@dataclass(frozen=True, kw_only=True)
class NormJudgement:
    ok: bool
    bootstrap: bool = False
    """No trusted history yet: the caller decides (a sync round judges at close)."""
    threshold: float | None = None
    detail: str = ""


class _Recent:
    """The last ``window`` accepted values, frozen for a sync round (judged against the
    history as it was when the round opened), and the median of what is judged against
    (computed once per change, not per update judged)."""

    def __init__(self, *, multiple: float | None, window: int, min_history: int) -> None:
        if window < min_history or min_history < 1:
            raise ConfigError("the history must hold at least min_history values")
        self.multiple = multiple
        self.window = window
        self.min_history = min_history
        self._history: list[float] = []
        self._frozen: list[float] | None = None
        self._median: float | None = None

    @property
    def history(self) -> list[float]:
        return list(self._history)

    def _keep(self, value: float) -> bool:
        """May a loaded value join the history?"""
        return math.isfinite(value)

    def load(self, values: Iterable[float]) -> None:
        self._history = [float(x) for x in values if self._keep(float(x))][-self.window:]
        self._median = None

    def freeze(self) -> None:
        """Judge against the history as it is now until ``thaw`` (a sync round)."""
        self._frozen = list(self._history)
        self._median = None

    def thaw(self) -> None:
        self._frozen = None
        self._median = None

    def accepted(self, value: float) -> None:
        self._history.append(float(value))
        del self._history[:-self.window]
        if self._frozen is None:
            self._median = None

    def _reference(self) -> list[float]:
        return self._history if self._frozen is None else self._frozen

    def _limit(self) -> float | None:
        """``multiple`` x the median of the reference (None: no screen, or too few)."""
        reference = self._reference()
        if self.multiple is None or len(reference) < self.min_history:
            return None
        if self._median is None:
            self._median = _median(reference)
        return self.multiple * self._median


class NormScreen(_Recent):
    """Norm screen relative to recently accepted updates (see the module doc)."""

    def __init__(self, *, multiple: float | None, window: int = NORM_WINDOW,
                 min_history: int = MIN_HISTORY) -> None:
        if multiple is not None and not (multiple > 1 and math.isfinite(multiple)):
            raise ConfigError(f"norm_median_multiple must be > 1, got {multiple}")
        super().__init__(multiple=multiple, window=window, min_history=min_history)
        self._epoch: collections.OrderedDict[str, tuple[float, bool]] = (
            collections.OrderedDict())

    def threshold(self) -> float | None:
        return self._limit()

    def judge(self, norm: float) -> NormJudgement:
        if self.multiple is None:
            return NormJudgement(ok=True)
        limit = self.threshold()
        if limit is None:
            return NormJudgement(ok=True, bootstrap=True)
        if norm > limit:
            return NormJudgement(
                ok=False, threshold=limit,
                detail=f"norm {norm:.4g} > {self.multiple:g} x median {limit / self.multiple:.4g}"
                       " of recent accepted updates")
        return NormJudgement(ok=True, threshold=limit)

    def observe(self, device: str, norm: float, *, refused: bool) -> None:
        """Note a device's decodable update of the current epoch (round or async buffer)."""
        self._epoch.pop(device, None)
        self._epoch[device] = (float(norm), refused)
        while len(self._epoch) > MAX_EPOCH_DEVICES:
            self._epoch.popitem(last=False)

    def end_epoch(self, *, min_refused: int | None = None, clear: bool = True) -> str | None:
        """When the screen refused most of the epoch's senders (and at least
        ``min_refused``, default ``min_history``), adopt their norms as the history and
        say so (the returned text); None otherwise. The epoch starts afresh after a
        reset, or always with ``clear``."""
        need = max(self.min_history, min_refused or 0)
        refused = [n for n, r in self._epoch.values() if r]
        senders = len(self._epoch)
        norms = [n for n, _ in self._epoch.values()]
        if clear:
            self._epoch.clear()
        if self.multiple is None or len(refused) < need or 2 * len(refused) <= senders:
            return None
        self._epoch.clear()
        old = self.threshold()
        self._history = norms[-self.window:]
        if self._frozen is not None:
            self._frozen = list(self._history)
        self._median = None
        return (f"the norm screen refused {len(refused)} of the {senders} devices that sent "
                f"an update (limit {old:.4g}); recent history no longer describes the fleet, "
                f"so it now starts from their norms (median {_median(norms):.4g})")

    def bootstrap_limit(self, round_norms: Sequence[float], *,
                        model_norm: float) -> float | None:
        """The threshold a bootstrapping round applies at close: ``multiple`` x the
        median of the history and the round's norms; with too few of those, the global
        model's own norm (an update longer than the model is cut to it); None when
        neither exists."""
        if self.multiple is None:
            return None
        pool = [*self._reference(), *round_norms]
        if len(pool) >= self.min_history:
            return self.multiple * _median(pool)
        return model_norm if model_norm > 0 and math.isfinite(model_norm) else None


def clip_factor(norm: float, limit: float | None) -> float:
    """The scale that brings an update of ``norm`` within ``limit`` (1 when it is)."""
    if limit is None or not norm > limit or not norm > 0:
        return 1.0
    return limit / norm


def task_samples_cap(*, epochs: int, batch_size: int, max_steps: int | None,
                     announced: int | None) -> int | None:
    """The most samples a device can have trained on for its task: ``max_steps`` x
    batch size, and epochs x the data size it announced; None when neither is known."""
    caps = []
    if max_steps is not None:
        caps.append(max_steps * batch_size)
    if announced is not None and announced > 0:
        caps.append(epochs * announced)
    return min(caps) if caps else None


class WeightBound(_Recent):
    """Bounds the weight an update claims (see the module doc)."""

    def __init__(self, *, multiple: float | None, window: int = NORM_WINDOW,
                 min_history: int = MIN_HISTORY) -> None:
        if multiple is not None and not (multiple >= 1 and math.isfinite(multiple)):
            raise ConfigError(f"max_weight_multiple must be >= 1, got {multiple}")
        super().__init__(multiple=multiple, window=window, min_history=min_history)

    def _keep(self, value: float) -> bool:
        return value > 0

    def fleet_cap(self, round_weights: Sequence[float] = ()) -> float | None:
        if not round_weights:
            return self._limit()
        if self.multiple is None:
            return None
        pool = [*self._reference(), *round_weights]
        if len(pool) < self.min_history:
            return None
        return self.multiple * _median(pool)

    def bound(self, claimed: float, *, task_cap: int | None) -> tuple[float, str]:
        """(weight to use, why it was cut or "")."""
        weight, why = float(claimed), ""
        if task_cap is not None and weight > task_cap:
            weight, why = float(task_cap), f"claims {claimed} samples; its task allows {task_cap}"
        fleet = self.fleet_cap()
        if fleet is not None and weight > fleet:
            weight = fleet
            why = (f"claims {claimed} samples; at most {self.multiple:g} x the median weight "
                   f"of recent updates ({fleet:.4g}) counts")
        return weight, why
