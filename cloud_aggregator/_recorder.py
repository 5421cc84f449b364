"""The round recorder: what a round (or a FedBuff release) produced, written down.

``RoundRecorder`` keeps the running figures of the open round (updates refused, bytes
moved, the devices' training loss and their own evaluation of the global model),
completes a ``RoundMetrics`` with them, evaluates the new model on the held-out set,
and writes the metrics line, the store's metrics rows and the Prometheus gauges, then
tells ``on_round``. A round's metrics are saved in the same transaction as its
checkpoint (``PENDING_METRICS``); if the process stops before the line is written,
``recover`` writes it at the next start.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from broker_bridge import UpdateMeta
from cloud_aggregator._contribution import SCREEN_CODES
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._evaluate import EvalResult, ServerEvaluator, federated_eval
from cloud_aggregator._ledger import MAX_REJECTED, Rejected
from cloud_aggregator._metrics import Counters, MetricsLog, RoundMetrics
from cloud_aggregator._store import Store, StoreError

log = logging.getLogger(__name__)

RECENT_LINES = 1000
"""How far back ``written`` looks: more than the releases between two FedBuff checkpoints."""
PENDING_METRICS = "pending_metrics"
"""State name: a closed round's metrics, saved with its checkpoint until its line is written."""


@dataclass(kw_only=True)
class _Running:
    rejected: int = 0
    refusals: list[Rejected] = field(default_factory=list)
    bytes_up0: int = 0
    bytes_down0: int = 0
    train_loss_sum: float = 0.0
    train_samples: float = 0.0
    screened: dict[str, None] = field(default_factory=dict)


class RoundRecorder:
    """Metrics of rounds: running figures, evaluation, the log, gauges (module doc)."""

    def __init__(self, *, fleet: str, store: Store, log_file: MetricsLog, counters: Counters,
                 evaluator: ServerEvaluator | None,
                 on_round: Callable[[RoundMetrics], None] | None) -> None:
        self._fleet = fleet
        self._store = store
        self.log_file = log_file
        self._counters = counters
        self.evaluator = evaluator
        self._on_round = on_round
        self.history: list[RoundMetrics] = []
        self._running = _Running()
        self._fed: list[tuple[float | None, float | None, int]] = []

    def begin(self) -> None:
        """A round (or buffer) starts: its running figures start from here."""
        snap = self._counters.snapshot()
        self._running = _Running(bytes_up0=snap["bytes_up"], bytes_down0=snap["bytes_down"])
        self._fed = []

    def rejected(self, device: str | None = None, code: str = "", *, round: int = 0,
                 attempt: int = 0) -> None:
        """An update was refused; a screen's refusal (``SCREEN_CODES``) also names the
        device in the round's ``screened`` (its reputation hears of it). The first
        ``MAX_REJECTED`` of the round are listed for its training-ledger entry (kept in
        memory: a restart forgets those of the open round)."""
        self._running.rejected += 1
        if device is not None and code in SCREEN_CODES:
            self._running.screened[device] = None
        if len(self._running.refusals) < MAX_REJECTED:
            self._running.refusals.append(Rejected(device=device or "", round=round,
                                                   attempt=attempt, reason=code))

    def refusals(self) -> tuple[list[Rejected], int]:
        """The refusals listed since ``begin``, and how many more were only counted."""
        run = self._running
        return list(run.refusals), run.rejected - len(run.refusals)

    def note_report(self, meta: UpdateMeta, *, weight: float) -> None:
        """What an accepted update's device reported: training loss, its own evaluation.

        Both count with at most ``weight``, the bounded weight its update counts with: a
        device's claimed sample counts do not dictate the round's figures either."""
        if math.isfinite(meta.train_loss):
            self._running.train_loss_sum += meta.train_loss * weight
            self._running.train_samples += weight
        if meta.eval_samples > 0:
            self._fed.append((meta.eval_loss, meta.eval_accuracy,
                              min(meta.eval_samples, max(1, round(weight)))))

    def complete(self, metrics: RoundMetrics, *, emulated_total_s: float) -> RoundMetrics:
        """``metrics`` with what the round's devices reported and the bytes it moved."""
        fed = federated_eval(self._fed)
        snap = self._counters.snapshot()
        run = self._running
        train_loss = run.train_loss_sum / run.train_samples if run.train_samples else None
        return replace(
            metrics, updates_rejected=run.rejected,
            fed_accuracy=fed.accuracy if fed else None, fed_loss=fed.loss if fed else None,
            train_loss=train_loss, screened=(*metrics.screened, *run.screened),
            bytes_up=snap["bytes_up"] - run.bytes_up0,
            bytes_down=snap["bytes_down"] - run.bytes_down0,
            emulated_total_s=emulated_total_s,
        )

    @staticmethod
    def pending_blob(metrics: RoundMetrics) -> bytes:
        """The state blob saved with the round's checkpoint (see ``recover``)."""
        return json.dumps(metrics.to_json()).encode()

    def record(self, metrics: RoundMetrics, *, params: np.ndarray | None,
               recovered: bool = False) -> RoundMetrics:
        """Evaluate ``params`` (when given), then write the metrics everywhere."""
        server: EvalResult | None = None
        if params is not None and self.evaluator is not None:
            try:
                server = self.evaluator.evaluate(params)
            except AggregatorError as exc:
                log.error("server-side evaluation failed: %s", exc)
        metrics = replace(metrics, accuracy=server.accuracy if server else None,
                          loss=server.loss if server else None)
        if not recovered:
            self.history.append(metrics)
        self.log_file.write(metrics)
        values = {k: float(v) for k, v in metrics.to_json().items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
                  and math.isfinite(v) and k not in ("round",)}
        try:
            self._store.record_metrics(fleet=self._fleet, round_index=metrics.round,
                                       values=values)
        except StoreError as exc:
            log.error("cannot record metrics: %s", exc)
        self.gauges(metrics)
        log.info("round %d %s (%s): version %d, accuracy %s, %d/%d reported, %d B up, %d B down",
                 metrics.round, metrics.outcome, metrics.reason, metrics.model_version,
                 "n/a" if metrics.accuracy is None else f"{metrics.accuracy:.3f}",
                 metrics.devices_reported, metrics.devices_selected, metrics.bytes_up,
                 metrics.bytes_down)
        if self._on_round is not None and not recovered:
            try:
                self._on_round(metrics)
            except Exception:
                log.exception("on_round callback failed")
        return metrics

    def gauges(self, metrics: RoundMetrics) -> None:
        c = self._counters
        c.set("round", metrics.round)
        c.set("accuracy", metrics.accuracy)
        c.set("loss", metrics.loss)
        c.set("federated_accuracy", metrics.fed_accuracy)
        c.set("round_devices_reported", metrics.devices_reported)
        c.set("round_alignment_mean", metrics.alignment_mean)
        c.set("devices_distrusted", metrics.devices_distrusted)

    def written(self, metrics: RoundMetrics) -> bool:
        """Whether the metrics line of that round and outcome is among the last ones."""
        return (metrics.round, metrics.outcome) in {
            (r.get("round"), r.get("outcome")) for r in self.log_file.read()[-RECENT_LINES:]}

    def recover(self, pending: Any, *, model_version: int, params: np.ndarray) -> None:
        """Write the metrics line of a round whose checkpoint was saved but whose line
        was not (the process stopped in between)."""
        try:
            metrics = RoundMetrics.from_json(pending)
        except StoreError as exc:
            raise StoreError(f"pending metrics in {self._store.path} are malformed: {exc}") from exc
        if not self.written(metrics):
            log.info("writing the metrics of round %d, interrupted by a stop", metrics.round)
            evaluate = metrics.model_version == model_version and metrics.outcome != "abandoned"
            self.record(metrics, params=params if evaluate else None, recovered=True)
