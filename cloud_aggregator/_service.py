"""The aggregator service: rounds over a ``Channel``, streaming aggregation, resume.

``Aggregator`` subscribes to the fleet's presence and ``up/#`` topics and runs either
synchronous rounds (``SyncRound``: over-selection, deadline, quorum) or FedBuff-style
asynchronous aggregation (``AsyncScheduler`` + ``FedBuffBuffer``). The maths lives in
``_aggregation``, ``_robust`` and ``_server_opt``; this module only decides which rule
applies to which message and in which order things are made durable:

- an update is validated, then stored with its idempotency key in one transaction
  (``Store.add_round_update``), then accumulated, then acknowledged: an acknowledged
  update is never lost, and a redelivered one is counted once;
- a round closes by writing the new model and the server optimizer's state and
  marking the round closed in one transaction (``Store.save_checkpoint``);
- on start, the latest checkpoint is loaded and an open round is rebuilt by decoding
  its stored updates again, in the order they were accepted, so a restarted
  aggregator reaches the same model as one that never stopped.

Each task's ``max_steps`` is sized per device (``adaptive_local_work``): the cost
model, the device's profile from its hello and the policy's learned correction
predict its step time, and a device that would miss the deadline with the whole task
is asked for the steps that fit (at least one) rather than dropped. The upload in that
prediction is sized by the compression the fleet's accepted updates really achieve.

With the virtual clock (sync rounds) the deadline is judged here, in the emulated
seconds devices report; the ``deadline_s`` a task carries is the device's wall-clock
budget, so it is the round's safety timeout there, not the emulated deadline.

Threads: message handlers run on the transport's thread, ``tick``/``run`` on the
caller's; one re-entrant lock serialises them (an in-memory transport delivers
synchronously, so a handler may run inside ``tick``). Handlers only record; rounds
open and close in ``tick``. ``start`` registers the handlers before connecting and
holds no lock while subscribing; messages that arrive before the open round is rebuilt
wait in a bounded queue.

Why this module is long: it is the one place where the order of durable writes,
acknowledgements and state changes is decided, for sync rounds, async aggregation
and resume, all under one lock. The mechanisms it orders live elsewhere: the screens
(``_screen``), what an update is answered (``_answers``), serving models and
artifacts (``_serving``), start-up checks and the run record (``_startup``), status
lines (``_status``), rounds (``_rounds``), the store.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from broker_bridge import (
    PROTOCOL_VERSION,
    Ack,
    AckCode,
    Cancel,
    Channel,
    CodecError,
    CodecSpec,
    ErrorReport,
    Hello,
    Kind,
    LogLimiter,
    Message,
    Presence,
    Request,
    TaskSpec,
    UpdateMeta,
    WireError,
    decode_update,
    printable,
    roll_call,
    unpack_update_body,
)
from cloud_aggregator._aggregation import (
    FedBuffBuffer,
    Reason,
    StalenessPolicy,
    StreamingAccumulator,
    UpdateRules,
    check_staleness,
    l2_norm,
    staleness_discount,
    validate_update,
)
from cloud_aggregator._answers import (
    ACCEPTED,
    Answer,
    AttemptLedger,
    after_round,
    refused,
    refused_blob,
)
from cloud_aggregator._artifacts import MODEL_NAME
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._evaluate import EvalResult, ServerEvaluator, federated_eval, load_eval_data
from cloud_aggregator._metrics import Counters, MetricsLog, MetricsServer, RoundMetrics
from cloud_aggregator._registry import DeviceInfo, FleetRegistry
from cloud_aggregator._robust import RobustBuffer, clip_by_norm
from cloud_aggregator._rounds import (
    Admission,
    AsyncScheduler,
    Clock,
    Decision,
    DeviceState,
    Report,
    RoundOutcome,
    RoundSpec,
    SyncRound,
    WallClock,
    over_select,
)
from cloud_aggregator._screen import (
    NormScreen,
    WeightBound,
    clip_factor,
    task_samples_cap,
)
from cloud_aggregator._selection import local_steps_for, make_policy
from cloud_aggregator._serving import ModelServer
from cloud_aggregator._startup import (
    RUN_BLOB,
    RunRecord,
    check_eval_data,
    check_state_dir,
    clean_stale_temp_files,
    model_identity,
    output_classes,
    prepare_artifacts,
    task_nonce,
)
from cloud_aggregator._status import (
    STATUS_INTERVAL_S,
    async_line,
    fleet_view,
    round_line,
    waiting_line,
)
from cloud_aggregator._store import Store, StoreError, UpdateKey
from device_profiles import ConfigError, CorrectionEstimator, CostBreakdown, Task, predict

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
STATE_BLOB = "aggregator"
OPT_BLOB = "server_opt"
FEDBUFF_BLOB = "fedbuff"
ASYNC_BLOB = "async"
PENDING_METRICS_BLOB = "pending_metrics"
"""A closed round's metrics, saved with its checkpoint until its metrics line is written."""
POLL_S = 0.05
ADAPTIVE_HEADROOM = 0.9
"""Adaptive local work aims at this share of the deadline: a prediction is a typical
time, and work that ends just past the deadline is wasted."""
MAX_EARLY_MESSAGES = 10_000
"""Messages held while the aggregator rebuilds its round at start-up."""
TASK_MEMORY = 50_000
"""(round, device) -> max_steps of tasks sent, kept to bound each update's weight."""
DEVICE_ERRORS_EXCLUDE = ("data", "artifact", "backend")
"""Error codes after which a device is not selected again until its next hello."""


class _Accumulator:
    """The open round's aggregate: streaming mean (with optional clipping) or a
    bounded ``RobustBuffer`` for median / trimmed mean / Krum."""

    def __init__(self, config: AggregatorConfig, size: int, capacity: int) -> None:
        self._robust_cfg = config.robust_config()
        self._clip = config.clip_norm
        if self._robust_cfg.method == "mean":
            self._stream: StreamingAccumulator | None = StreamingAccumulator(size=size)
            self._buffer: RobustBuffer | None = None
        else:
            self._stream = None
            self._buffer = RobustBuffer(size=size, max_updates=capacity,
                                        max_bytes=config.robust_max_bytes, config=self._robust_cfg)

    @property
    def count(self) -> int:
        return self._stream.count if self._stream is not None else self._buffer.count  # type: ignore[union-attr]

    def has_room(self, waiting: int = 0) -> bool:
        """Room for one more update, with ``waiting`` more to be added later."""
        return self._buffer is None or self._buffer.count + waiting < self._buffer.capacity

    def add(self, update: F32, weight: float) -> None:
        if self._stream is not None:
            if self._clip is not None:
                update = clip_by_norm(update, self._clip)
            self._stream.add(update, weight)
        else:
            assert self._buffer is not None
            verdict = self._buffer.add(update, weight=weight)
            if not verdict.ok:
                raise AggregatorError(f"robust buffer refused an update: {verdict.detail}")

    def result(self) -> F32:
        if self._stream is not None:
            return self._stream.result()
        assert self._buffer is not None
        return self._buffer.aggregate()


@dataclass(kw_only=True)
class _RoundStats:
    rejected: int = 0
    bytes_up0: int = 0
    bytes_down0: int = 0
    train_loss_sum: float = 0.0
    train_samples: int = 0


@dataclass(frozen=True, kw_only=True, eq=False)
class _Parsed:
    """An update that passed every check: what to add, and with which weight."""

    meta: UpdateMeta
    update: F32
    norm: float
    weight: float
    body_bytes: int
    bootstrap: bool
    """No norm history yet (sync): kept aside and judged when the round closes."""


@dataclass(frozen=True, kw_only=True)
class _Deferred:
    """An accepted update of a bootstrapping round (no norm history yet): stored and
    acknowledged, added when the round closes, judged against the round's own median."""

    device: str
    norm: float
    weight: float


class Aggregator:
    """Runs a fleet's training on ``channel`` as ``config`` says; see the module doc.

    In-process use (a simulator): build a ``Channel`` on any transport, then
    ``Aggregator(config=..., channel=...)``, ``start()``, and either ``run()`` in a
    thread or call ``tick()`` yourself. ``config.clock = "virtual"`` judges deadlines
    in the emulated seconds devices report; ``clock`` injects the time source.
    """

    def __init__(
        self,
        *,
        config: AggregatorConfig,
        channel: Channel,
        clock: Clock | None = None,
        artifacts_dir: str | Path | None = None,
        on_round: Callable[[RoundMetrics], None] | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        if channel.fleet != config.fleet:
            raise ConfigError(f"channel is for fleet {channel.fleet!r}, config {config.fleet!r}")
        self.config = config
        self.channel = channel
        self.clock: Clock = clock or WallClock()
        self._on_round = on_round
        self._on_status = on_status
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fleetlearn-aggregator-")
            self.state_dir = Path(self._tmp.name)
            log.warning("no state_dir: state kept in %s and lost on exit", self.state_dir)
        else:
            self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "aggregator.sqlite",
                           synchronous=config.store_synchronous)
        try:
            self._init_state(config, artifacts_dir)
        except BaseException:
            self.store.close()
            if self._tmp is not None:
                self._tmp.cleanup()
            raise

    def _init_state(self, config: AggregatorConfig, artifacts_dir: str | Path | None) -> None:
        clean_stale_temp_files(self.store.checkpoint_dir)
        self.metrics_log = MetricsLog(self.state_dir / "metrics.jsonl")
        identity = model_identity(config)
        self._run: RunRecord | None = check_state_dir(
            self.store, config=config, identity=identity, metrics_path=self.metrics_log.path)
        self._identity = identity
        self.registry = FleetRegistry(store=self.store, clock=self.clock.now)
        self.counters = Counters()
        self.history: list[RoundMetrics] = []
        self.model = prepare_artifacts(
            config, Path(artifacts_dir) if artifacts_dir else self.state_dir / "artifacts",
            identity=identity)
        self.layout = self.model.layout
        self._rules = UpdateRules(size=self.layout.size, max_norm=config.max_update_norm)
        self._screen = NormScreen(multiple=config.norm_median_multiple)
        self._weights = WeightBound(multiple=config.max_weight_multiple)
        self._uplink = CodecSpec.parse(config.codec)
        self._downlink = CodecSpec.parse(config.downlink_codec)
        self._policy = make_policy(config.selection, **_policy_options(config))
        self._opt = config.make_server_optimizer()
        self.num_classes = output_classes(self.model.directory / MODEL_NAME,
                                          loss=self.model.info.loss)
        self._evaluator: ServerEvaluator | None = None
        if config.eval_data is not None:
            x, y = load_eval_data(config.eval_data)
            self._evaluator = ServerEvaluator(
                model_path=self.model.directory / MODEL_NAME, layout=self.layout, x=x, y=y,
                input_name=self.model.info.input_name, loss=self.model.info.loss)
            check_eval_data(self._evaluator.evaluate, self.model.initial, y=y,
                            num_classes=self.num_classes, path=config.eval_data)
        self._metrics_server: MetricsServer | None = None
        self._log = LogLimiter()
        self._server: ModelServer | None = None
        # Global state (restored in start()).
        self.params: F32 = self.model.initial.copy()
        self.model_version = 0
        self.emulated_total_s = 0.0
        self._abandoned_streak = 0
        self._next_round = 1
        self._round: SyncRound | None = None
        self._acc: _Accumulator | None = None
        self._deferred: list[_Deferred] = []
        self._stats = _RoundStats()
        self._fed: list[tuple[float | None, float | None, int]] = []
        self._async: AsyncScheduler | None = None
        self._fedbuff: FedBuffBuffer | None = None
        self._async_done: collections.OrderedDict[tuple[int, str], None] = (
            collections.OrderedDict())
        self._async_started = 0.0
        self._task_steps: collections.OrderedDict[tuple[int, str], int | None] = (
            collections.OrderedDict())
        self._ledger = AttemptLedger()
        self._started = False
        self._ready = False
        self._closed = False
        self._early: collections.deque[tuple[Callable[[str, Message], None], str, Message]] = (
            collections.deque())
        self._failed: str | None = None
        self._last_status = time.monotonic()
        self.last_status: str | None = None
        self._dense_bytes = 4 * self.layout.size
        self._body_bytes_sum = 0
        self._body_count = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def fleet(self) -> str:
        return self.config.fleet

    @property
    def round_index(self) -> int | None:
        """The open sync round, if any."""
        with self._lock:
            return self._round.spec.index if self._round is not None else None

    @property
    def current_round(self) -> SyncRound | None:
        return self._round

    @property
    def done(self) -> bool:
        return self.model_version >= self.config.rounds or self._failed is not None

    @property
    def failure(self) -> str | None:
        return self._failed

    def start(self) -> None:
        """Restore state, subscribe, connect, announce the model; resume an open round.

        Handlers are registered before the transport connects (a persistent session
        delivers what was queued for us right after connecting), and no lock is held
        while subscribing (the network thread runs handlers that take it). Messages that
        arrive before the open round is rebuilt wait in a bounded queue.
        """
        with self._lock:
            if self._started:
                return
            self._started = True
            self._restore()
            if self.config.metrics_port is not None:
                self._metrics_server = MetricsServer(self.counters, port=self.config.metrics_port,
                                                     host=self.config.metrics_bind)
        topics = self.channel.topics
        self.channel.subscribe(topics.all_presence, self._gated(self._on_presence))
        self.channel.subscribe(topics.all_up, self._gated(self._on_up))
        # Who is there: asked, not read from retained presence (see roll_call).
        self.channel.transport.on_connect(lambda: roll_call(self.channel))
        if not self.channel.transport.connected:
            self.channel.transport.connect()
        roll_call(self.channel)
        with self._wake:
            self._broadcast_model()
            self._resume_round()
            self._ready = True
            early, self._early = list(self._early), collections.deque()
            for handler, topic, message in early:
                handler(topic, message)
            self._publish_gauges()
            self._wake.notify_all()

    def _gated(self, handler: Callable[[str, Message], None]) -> Callable[[str, Message], None]:
        def gate(topic: str, message: Message) -> None:
            with self._wake:
                if self._closed:
                    return
                if not self._ready:
                    if len(self._early) < MAX_EARLY_MESSAGES:
                        self._early.append((handler, topic, message))
                    else:
                        self.counters.update("dropped:starting")
                    return
            handler(topic, message)

        return gate

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server is not None else None

    def stop(self) -> None:
        """Ask ``run`` to return after the current step (thread-safe)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()

    def close(self, *, unsubscribe: bool = True) -> None:
        """Stop serving: unsubscribe, stop the metrics endpoint, close the store.

        ``unsubscribe=False`` keeps the broker session's subscriptions (a persistent
        session then queues what devices send until the next start); messages that
        still reach this object are dropped.
        """
        self.stop()
        with self._lock:
            self._closed = True
            topics = self.channel.topics
            for topic_filter in (topics.all_presence, topics.all_up) if unsubscribe else ():
                try:
                    self.channel.transport.unsubscribe(topic_filter)
                except Exception:  # a dead connection has nothing to unsubscribe
                    log.debug("unsubscribe %s failed", topic_filter, exc_info=True)
            if self._metrics_server is not None:
                self._metrics_server.close()
                self._metrics_server = None
            self.store.close()
            if self._tmp is not None:
                self._tmp.cleanup()

    def run(self, *, timeout_s: float | None = None) -> list[RoundMetrics]:
        """Tick until ``config.rounds`` model versions exist, ``stop()``, or the timeout."""
        self.start()
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop.is_set() and not self.done:
            if end is not None and time.monotonic() >= end:
                log.warning("aggregator run timed out after %.0f s", timeout_s)
                break
            with self._wake:
                if not self.tick():
                    self._wake.wait(POLL_S)
        return list(self.history)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # ------------------------------------------------------------------ persistence

    def _state_json(self) -> bytes:
        """Everything learned from the fleet that the next round depends on: the policy's
        duration corrections and statistics, the observed compression, the screens'
        histories. Saved with each checkpoint, so a restarted aggregator schedules and
        screens as the one that stopped would have."""
        return json.dumps({
            "mode": self.config.mode, "model": self.config.model,
            "content_hash": self.model.info.content_hash, "model_version": self.model_version,
            "emulated_total_s": self.emulated_total_s,
            "abandoned_streak": self._abandoned_streak,
            "selection": self._policy.state(),
            "accepted_norms": self._screen.history,
            "accepted_weights": self._weights.history,
            "body_bytes": [self._body_bytes_sum, self._body_count],
        }, sort_keys=True).encode()

    def _blob_json(self, name: str) -> Any:
        raw = self.store.get_state(name)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise StoreError(f"state {name!r} in {self.store.path} is unreadable ({exc}); "
                             "restore the store from a backup or use another state dir") from exc

    def _restore(self) -> None:
        try:
            self._restore_state()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise StoreError(f"the state in {self.store.path} is malformed ({exc!r}); restore "
                             "it from a backup or use another state dir") from exc

    def _restore_state(self) -> None:
        state = self._blob_json(STATE_BLOB)
        if state is not None:
            if not isinstance(state, dict):
                raise StoreError(f"state {STATE_BLOB!r} in {self.store.path} is not an object")
            if state.get("mode") != self.config.mode:
                raise ConfigError(
                    f"{self.state_dir} holds a {state.get('mode')} run; use another state_dir")
            if self._run is None and state.get("model") != self.config.model:
                raise ConfigError(
                    f"{self.state_dir} holds a run of model {state.get('model')!r}; --model "
                    f"{self.config.model} needs another state dir")
            if state.get("content_hash") != self.model.info.content_hash:
                raise ConfigError(f"{self.state_dir} was trained with other model artifacts")
            self.emulated_total_s = float(state.get("emulated_total_s", 0.0))
            self._abandoned_streak = int(state.get("abandoned_streak", 0))
            if "selection" in state:
                self._policy.load_state(state["selection"])
            self._screen.load(state.get("accepted_norms", []))
            self._weights.load(state.get("accepted_weights", []))
            body_sum, body_count = state.get("body_bytes", [0, 0])
            self._body_bytes_sum, self._body_count = int(body_sum), int(body_count)
        if self._run is None:  # a fresh state dir, or one from before run records
            self._run = RunRecord.new(self._identity)
            self.store.put_state(RUN_BLOB, self._run.to_bytes())
        if self.store.checkpoint(self.fleet) is None:
            self.store.save_checkpoint(
                fleet=self.fleet, model_version=0, params=self.params,
                states={STATE_BLOB: self._state_json(), OPT_BLOB: self._opt.to_bytes()})
        record, params = self.store.load_checkpoint(self.fleet)
        if params.size != self.layout.size:
            raise AggregatorError("checkpoint does not match the model's layout")
        self.params, self.model_version = params, record.model_version
        opt_state = self.store.get_state(OPT_BLOB)
        if opt_state is not None:
            self._opt.load_bytes(opt_state)
        rounds = self.store.rounds(self.fleet)
        self._next_round = (rounds[-1].round + 1) if rounds else 1
        self._server = ModelServer(
            fleet=self.fleet, run_id=self._run.run_id, layout=self.layout,
            codec=self._downlink, store=self.store, topics=self.channel.topics,
            send=self._send, counters=self.counters, artifacts_dir=self.model.directory,
            artifacts_hash=self.model.info.content_hash)
        if self.config.mode == "async":
            self._async = AsyncScheduler(concurrency=self.config.concurrency,
                                         deadline_s=self.config.deadline_s)
            raw_async = self._blob_json(ASYNC_BLOB)
            if raw_async is not None:
                self._async.load_json(raw_async)
            self._fedbuff = FedBuffBuffer(
                size=self.layout.size, buffer_size=self.config.buffer_size,
                policy=StalenessPolicy(kind=self.config.staleness,
                                       max_staleness=self.config.max_staleness))
            raw_buf = self.store.get_state(FEDBUFF_BLOB)
            if raw_buf is not None:
                from cloud_aggregator._aggregation import AccumulatorSnapshot

                self._fedbuff.restore(AccumulatorSnapshot.from_bytes(raw_buf))
            self._async_started = self.clock.now()
        self._finish_pending_metrics()
        log.info("fleet %s: run %s, model version %d, next round %d", self.fleet,
                 self._run.run_id, self.model_version, self._next_round)

    def _finish_pending_metrics(self) -> None:
        """Write the metrics line of a round whose checkpoint was saved but whose line was
        not (the process stopped in between)."""
        pending = self._blob_json(PENDING_METRICS_BLOB)
        if pending is None:
            return
        try:
            metrics = RoundMetrics(**pending)
        except TypeError as exc:
            raise StoreError(f"pending metrics in {self.store.path} are malformed: {exc}") from exc
        written = {(r.get("round"), r.get("outcome")) for r in self.metrics_log.read()[-5:]}
        if (metrics.round, metrics.outcome) not in written:
            log.info("writing the metrics of round %d, interrupted by a stop", metrics.round)
            self._record(metrics, evaluate=metrics.model_version == self.model_version
                         and metrics.outcome != "abandoned", recovered=True)
        self.store.delete_state(PENDING_METRICS_BLOB)

    def _resume_round(self) -> None:
        """Rebuild the open sync round from the store, re-sending unanswered tasks."""
        if self.config.mode == "async":
            assert self._async is not None and self._fedbuff is not None
            if self._fedbuff.pending >= self._fedbuff.buffer_size:
                self._release_async()  # crashed between the K-th update and its checkpoint
            for task in list(self._async.inflight.values()):
                self._send_task(task.device_id, round_index=task.task_round,
                                model_version=task.model_version)
            return
        open_rounds = self.store.rounds(self.fleet, state="open")
        if not open_rounds:
            return
        rec = open_rounds[-1]
        for stale in open_rounds[:-1]:  # cannot happen with one aggregator; be safe
            self.store.close_round(fleet=self.fleet, round_index=stale.round, state="abandoned")
        if rec.model_version != self.model_version:
            log.warning("round %d trained from version %d, model is %d: abandoning it",
                        rec.round, rec.model_version, self.model_version)
            self.store.close_round(fleet=self.fleet, round_index=rec.round, state="abandoned")
            return
        extra = self._blob_json(f"round:{rec.round}:extra") or []
        selected = list(rec.selected) + [str(d) for d in extra if d not in rec.selected]
        self._begin_round(rec.round, selected, quorum=rec.quorum,
                          deadline_s=rec.deadline or self.config.deadline_s,
                          started_at=rec.started_at)
        assert self._round is not None and self._acc is not None
        restored = 0
        for stored in self.store.round_updates(self.fleet, rec.round):
            device = stored.key.device_id
            try:
                meta, body = unpack_update_body(stored.body)
                norm = float(stored.meta.get("norm", 0.0))
                weight = float(stored.meta.get("weight", meta.num_samples))
                deferred = bool(stored.meta.get("deferred", False))
                update = None if deferred else decode_update(body, self.layout)
            except (WireError, TypeError, ValueError) as exc:
                raise StoreError(f"stored update of {device} in round {rec.round} does not "
                                 f"decode: {exc}") from exc
            if self._round.state(device) is None:
                self._round.add_device(device)
            if update is None:
                self._deferred.append(_Deferred(device=device, norm=norm, weight=weight))
            else:
                self._acc.add(update, weight)
                self._screen.accepted(norm)
                self._weights.accepted(weight)
            self._observe_body(len(body))
            self._round.count(device, _report(meta))
            self._note_report(meta)
            restored += 1
        self._restore_refusals(rec.round)
        log.info("resumed round %d with %d stored updates", rec.round, restored)
        for device in self._round.pending():
            self._send_task(device, round_index=rec.round, model_version=self.model_version)

    def _restore_refusals(self, index: int) -> None:
        """A refusal survives a restart: a device refused for good is not asked again,
        and an attempt gets the answer it got before."""
        assert self._round is not None
        raw = self._blob_json(refused_blob(index))
        if raw is not None:
            self._ledger.restore(index, raw, self._round, where=str(self.store.path))

    # ------------------------------------------------------------------ ticking

    def tick(self) -> bool:
        """One scheduling step; True when something happened (a round opened or closed)."""
        if not self._started:
            self.start()  # not under the lock: start() subscribes
        with self._lock:
            if self.done:
                return False
            if self.config.mode == "async":
                progressed = self._tick_async()
            elif self._round is None:
                progressed = self._open_round()
            else:
                decision = self._round.decide(self.clock.now())
                progressed = decision is not None
                if decision is not None:
                    self._end_round(*decision)
            self._maybe_status(progressed)
            return progressed

    # ------------------------------------------------------------------ status

    def status_line(self) -> str:
        """What the aggregator is doing or waiting for, in one line."""
        with self._lock:
            ready = self.registry.ready()
            view = fleet_view(self.registry.all(), ready)
            if self._async is not None and self._fedbuff is not None:
                return async_line(inflight=len(self._async.inflight),
                                  concurrency=self.config.concurrency,
                                  buffered=self._fedbuff.pending,
                                  buffer_size=self._fedbuff.buffer_size, view=view,
                                  fleet=self.fleet)
            rnd = self._round
            if rnd is None:
                return waiting_line(self.config, view, next_round=self._next_round)
            left = None if rnd.spec.virtual else rnd.spec.deadline_at - self.clock.now()
            return round_line(index=rnd.spec.index, counted=rnd.counted,
                              selected=len(rnd.selected), pending=len(rnd.pending()),
                              quorum=rnd.spec.quorum, target=rnd.spec.target,
                              seconds_left=left)

    def _maybe_status(self, progressed: bool) -> None:
        """Say what we wait for once the wait has lasted ``STATUS_INTERVAL_S``."""
        now = time.monotonic()
        if progressed:
            self._last_status = now
            return
        if now - self._last_status < STATUS_INTERVAL_S:
            return
        self._last_status = now
        line = self.status_line()
        self.last_status = line
        log.info("%s", line)
        if self._on_status is not None:
            try:
                self._on_status(line)
            except Exception:
                log.exception("on_status callback failed")

    def _duration(self, info: DeviceInfo) -> float | None:
        """Predicted seconds of the task ``info`` would be sent; None when unknown.

        With adaptive local work that is the reduced task, so a slow device is not
        judged (or corrected) by work it will not be asked to do.
        """
        cost = self._cost(info)
        if cost is None:
            return None
        steps = self._adapted_steps(info.device_id, cost)
        if steps is None:
            return cost.total_s
        return cost.fixed_s + steps * cost.step_s

    def _max_steps(self, device: str) -> int | None:
        """``max_steps`` of ``device``'s next task: the configured cap, or fewer steps
        when its profile says the whole task would miss the deadline."""
        info = self.registry.get(device)
        cost = self._cost(info) if info is not None else None
        steps = self._adapted_steps(device, cost) if cost is not None else None
        return self.config.max_steps if steps is None else steps

    def _adapted_steps(self, device: str, cost: CostBreakdown) -> int | None:
        """Local steps that fit in the deadline (at least 1), or None when all of them do.

        Uses the policy's learned correction for ``device``, so one that keeps running
        late is given less work next time.
        """
        cfg = self.config
        if not cfg.adaptive_local_work or cost.steps == 0:
            return None
        corrections = getattr(self._policy, "corrections", None)
        factor = (corrections.factor(device) if isinstance(corrections, CorrectionEstimator)
                  else 1.0)
        try:
            fits = local_steps_for(cost, cfg.deadline_s * ADAPTIVE_HEADROOM, factor=factor)
        except ConfigError:  # a zero step time: nothing to adapt
            return None
        return None if fits >= cost.steps else max(fits, 1)

    @property
    def compression_ratio(self) -> float:
        """Dense float32 bytes over the mean body size of the updates accepted so far
        (1.0 before the first): what the uplink codec really saves, which a codec spec
        alone cannot say (top-k with zstd depends on the values)."""
        if self._body_count == 0 or self._body_bytes_sum <= 0:
            return 1.0
        return self._dense_bytes * self._body_count / self._body_bytes_sum

    def _observe_body(self, nbytes: int) -> None:
        self._body_bytes_sum += nbytes
        self._body_count += 1

    def _task_deadline_s(self) -> float:
        """The ``deadline_s`` a task carries: the device's wall-clock budget.

        A sync round on the virtual clock judges the emulated deadline itself and stops
        waiting after ``safety_timeout_s`` wall seconds: a device given the emulated
        deadline as its wall budget would withdraw, or give up on a slow artifact
        download, long before that.
        """
        cfg = self.config
        if cfg.clock == "virtual" and cfg.mode == "sync":
            return cfg.safety_timeout_s
        return cfg.deadline_s

    def _cost(self, info: DeviceInfo) -> CostBreakdown | None:
        """Cost-model prediction of the configured task for ``info``; None when unknown."""
        if info.profile is None:
            return None
        cfg = self.config
        ratio = self.compression_ratio
        try:
            if cfg.is_reference_model:
                task = Task.for_model(cfg.model, n_samples=info.num_samples,
                                      epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                      max_steps=cfg.max_steps, compression_ratio=ratio)
            else:
                n = self.layout.size
                task = Task(model_bytes=4 * n, update_bytes=math.ceil(4 * n / ratio),
                            dense_update_bytes=4 * n, n_samples=info.num_samples,
                            epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                            train_flops_per_sample=6.0 * n, max_steps=cfg.max_steps)
            return predict(info.profile, task)
        except (ConfigError, ValueError, ZeroDivisionError):
            return None

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, index])

    def _open_round(self) -> bool:
        cfg = self.config
        candidates = self.registry.candidates(duration=self._duration)
        if len(candidates) < cfg.effective_min_devices:
            return False
        index = self._next_round
        k = over_select(cfg.devices_per_round, cfg.over_selection, len(candidates))
        selected = self._policy.select(candidates, k, round_index=index,
                                       deadline_s=cfg.deadline_s, rng=self._rng(index))
        if len(selected) < cfg.effective_quorum:
            # A policy may be too strict for the devices at hand (a tier too small, too
            # few predicted to fit). Waiting would never change its answer: top up with
            # the fastest other candidates so the round can reach its quorum.
            chosen = set(selected)
            extra = sorted((c for c in candidates if c.device_id not in chosen),
                           key=lambda c: (c.predicted_duration_s, c.device_id))
            selected = [*selected, *(c.device_id for c in extra)][:max(k, cfg.effective_quorum)]
            log.info("policy %s chose fewer devices than the quorum of %d; topped up to %d",
                     self._policy.name, cfg.effective_quorum, len(selected))
        now = self.clock.now()
        self.store.open_round(fleet=self.fleet, round_index=index,
                              model_version=self.model_version, selected=selected,
                              quorum=cfg.effective_quorum, deadline=cfg.deadline_s,
                              started_at=now)
        self.registry.record_selected(selected, index)
        self._begin_round(index, selected, quorum=cfg.effective_quorum,
                          deadline_s=cfg.deadline_s, started_at=now)
        log.info("round %d: %d devices selected from %d (target %d, quorum %d)", index,
                 len(selected), len(candidates), cfg.devices_per_round, cfg.effective_quorum)
        for device in selected:
            self._send_task(device, round_index=index, model_version=self.model_version)
        return True

    def _begin_round(self, index: int, selected: list[str], *, quorum: int, deadline_s: float,
                     started_at: float) -> None:
        cfg = self.config
        spec = RoundSpec(index=index, model_version=self.model_version,
                         target=cfg.devices_per_round, quorum=quorum, deadline_s=deadline_s,
                         started_at=started_at, virtual=cfg.clock == "virtual",
                         safety_timeout_s=cfg.safety_timeout_s)
        self._round = SyncRound(spec=spec, selected=selected)
        capacity = max(len(selected), cfg.selected_per_round) * 2
        self._acc = _Accumulator(cfg, self.layout.size, capacity)
        self._deferred = []
        self._screen.freeze()  # the round's verdicts must not depend on arrival order
        self._weights.freeze()
        self._fed = []
        snap = self.counters.snapshot()
        self._stats = _RoundStats(bytes_up0=snap["bytes_up"], bytes_down0=snap["bytes_down"])
        self._next_round = index + 1

    def _end_round(self, decision: Decision, reason: str) -> None:
        assert self._round is not None and self._acc is not None
        rnd, acc = self._round, self._acc
        index = rnd.spec.index
        pending = rnd.pending()
        delta: F32 | None = None
        new_params = self.params
        if decision is Decision.CLOSE:
            try:
                self._judge_deferred(index, acc)
                delta = acc.result()
                new_params = self._opt.step(self.params, delta)
                if not np.isfinite(new_params).all():
                    raise AggregatorError("the new global model is not finite")
            except AggregatorError as exc:
                log.error("round %d cannot be applied (%s): abandoning it", index, exc)
                decision, reason = Decision.ABANDON, f"not applicable: {exc}"
        self._deferred = []
        self._screen.thaw()
        self._weights.thaw()
        reset = self._screen.end_epoch()
        if reset is not None:
            log.warning("round %d: %s", index, reset)
        outcome = rnd.finish(decision, reason, now=self.clock.now())
        self.emulated_total_s += outcome.emulated_s
        results = self._results(outcome)
        for r in results:  # before the checkpoint, which saves what the policy learned
            self._policy.feedback(r.device_id, duration_s=r.duration_s, completed=r.completed,
                                  loss=r.loss, num_samples=r.num_samples)
        if decision is Decision.CLOSE:
            self.params = new_params
            self.model_version += 1
            self._abandoned_streak = 0
        else:
            self._abandoned_streak += 1
        metrics = self._round_metrics(RoundMetrics(
            round=index, model_version=self.model_version,
            outcome="closed" if decision is Decision.CLOSE else "abandoned", reason=reason,
            devices_selected=len(rnd.selected), devices_reported=len(outcome.counted),
            devices_dropped=len(outcome.missed), devices_declined=len(outcome.declined),
            updates_rejected=self._stats.rejected, emulated_s=outcome.emulated_s,
            wall_s=outcome.wall_s,
            update_norm=float(np.linalg.norm(delta)) if delta is not None else None,
        ))
        # The round's metrics go in the same transaction as its end: a stop before the
        # metrics line is written is repaired at the next start (_finish_pending_metrics).
        states = {STATE_BLOB: self._state_json(),
                  PENDING_METRICS_BLOB: json.dumps(metrics.to_json()).encode()}
        if decision is Decision.CLOSE:
            self.store.save_checkpoint(
                fleet=self.fleet, model_version=self.model_version, params=self.params,
                states={**states, OPT_BLOB: self._opt.to_bytes()},
                close_round=index, missed=outcome.missed)
        else:
            self.store.close_round(fleet=self.fleet, round_index=index, state="abandoned",
                                   missed=outcome.missed, states=states)
            if self._abandoned_streak >= self.config.max_abandoned:
                self._failed = f"{self._abandoned_streak} rounds in a row missed their quorum"
                log.error("giving up: %s", self._failed)
        self.store.delete_state(refused_blob(index))
        for device in pending:
            self._send(self.channel.topics.down(device, "cancel"),
                       Cancel(round=index, reason=f"round {decision.value}d: {reason}")
                       .to_message(fleet=self.fleet, round=index))
        for r in results:
            self.registry.record_outcome(r.device_id, completed=r.completed,
                                         duration_s=r.duration_s, loss=r.loss)
        self._round, self._acc = None, None
        if decision is Decision.CLOSE:
            self._broadcast_model()
        self._record(metrics, evaluate=decision is Decision.CLOSE)

    def _judge_deferred(self, index: int, acc: _Accumulator) -> None:
        """Add the updates a bootstrapping round kept aside, each cut to ``multiple`` x
        the median norm of the round (and to the fleet's weight bound)."""
        if not self._deferred:
            return
        limit = self._screen.bootstrap_limit([d.norm for d in self._deferred],
                                             model_norm=l2_norm(self.params))
        weight_cap = self._weights.fleet_cap([d.weight for d in self._deferred])
        waiting = {d.device: d for d in self._deferred}
        for stored in self.store.round_updates(self.fleet, index):
            d = waiting.pop(stored.key.device_id, None)
            if d is None or not stored.meta.get("deferred"):
                continue
            try:
                _, body = unpack_update_body(stored.body)
                update = decode_update(body, self.layout)
            except WireError as exc:
                raise StoreError(f"stored update of {d.device} does not decode: {exc}") from exc
            scale = clip_factor(d.norm, limit)
            weight = d.weight if weight_cap is None else min(d.weight, weight_cap)
            if scale < 1.0:
                self.counters.update("clipped:norm")
                self._note(d.device, logging.WARNING, "device %s: update of round %d (norm "
                           "%.4g) cut to norm %.4g, the limit of the round's first updates",
                           d.device, index, d.norm, d.norm * scale)
                update = update * np.float32(scale)
            if weight < d.weight:
                self.counters.update("bounded:weight")
            acc.add(update, weight)
            self._screen.accepted(d.norm * scale)
            self._weights.accepted(weight)

    def _results(self, outcome: RoundOutcome) -> list[_DeviceResult]:
        """What each selected device did in the ending round, for the policy and registry."""
        assert self._round is not None
        rnd = self._round
        results = []
        for device in outcome.counted:
            r = rnd.reports[device]
            took = r.emulated_s if (rnd.spec.virtual and r.emulated_s is not None) else r.duration_s
            loss = r.loss if r.loss is not None and math.isfinite(r.loss) and r.loss >= 0 else None
            results.append(_DeviceResult(device_id=device, completed=True, duration_s=took,
                                         loss=loss, num_samples=r.num_samples))
        for device in outcome.missed:
            late = rnd.reports.get(device)
            late_s: float | None = None
            if late is not None and rnd.state(device) is DeviceState.LATE:
                late_s = late.emulated_s if late.emulated_s is not None else late.duration_s
            results.append(_DeviceResult(device_id=device, completed=False, duration_s=late_s))
        return results

    def _round_metrics(self, metrics: RoundMetrics) -> RoundMetrics:
        """``metrics`` with what the round's devices reported and the bytes it moved."""
        fed = federated_eval(self._fed)
        snap = self.counters.snapshot()
        train_loss = (self._stats.train_loss_sum / self._stats.train_samples
                      if self._stats.train_samples else None)
        return replace(
            metrics,
            fed_accuracy=fed.accuracy if fed else None, fed_loss=fed.loss if fed else None,
            train_loss=train_loss,
            bytes_up=snap["bytes_up"] - self._stats.bytes_up0,
            bytes_down=snap["bytes_down"] - self._stats.bytes_down0,
            emulated_total_s=self.emulated_total_s,
        )

    def _record(self, metrics: RoundMetrics, *, evaluate: bool, recovered: bool = False) -> None:
        """Evaluate (server side), then write the metrics line, the store's metrics and
        the gauges, and tell ``on_round``."""
        server: EvalResult | None = None
        if evaluate and self._evaluator is not None:
            try:
                server = self._evaluator.evaluate(self.params)
            except AggregatorError as exc:
                log.error("server-side evaluation failed: %s", exc)
        metrics = replace(metrics, accuracy=server.accuracy if server else None,
                          loss=server.loss if server else None)
        if not recovered:
            self.history.append(metrics)
        self.metrics_log.write(metrics)
        values = {k: float(v) for k, v in metrics.to_json().items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
                  and math.isfinite(v) and k not in ("round",)}
        try:
            self.store.record_metrics(fleet=self.fleet, round_index=metrics.round, values=values)
        except StoreError as exc:
            log.error("cannot record metrics: %s", exc)
        self._publish_gauges(metrics)
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

    def _publish_gauges(self, metrics: RoundMetrics | None = None) -> None:
        c = self.counters
        c.set("model_version", self.model_version)
        c.set("devices_online", len(self.registry.online()))
        c.set("emulated_seconds_total", self.emulated_total_s)
        if metrics is not None:
            c.set("round", metrics.round)
            c.set("accuracy", metrics.accuracy)
            c.set("loss", metrics.loss)
            c.set("federated_accuracy", metrics.fed_accuracy)
            c.set("round_devices_reported", metrics.devices_reported)

    # ------------------------------------------------------------------ async

    def _tick_async(self) -> bool:
        assert self._async is not None
        cfg, sched = self.config, self._async
        now = self.clock.now()
        changed = False
        for task in sched.expire(now):
            log.info("device %s: async task %d timed out", task.device_id, task.task_round)
            self._policy.feedback(task.device_id, duration_s=None, completed=False)
            self.registry.record_outcome(task.device_id, completed=False)
            changed = True
        free = sched.free_slots()
        if free == 0:
            if changed:
                self._save_async()
            return changed
        candidates = self.registry.candidates(exclude=sched.busy(), duration=self._duration)
        if not candidates:
            return changed
        seq = sched.next_task_round
        chosen = self._policy.select(candidates, min(free, len(candidates)), round_index=seq,
                                     deadline_s=cfg.deadline_s, rng=self._rng(seq))
        tasks = [sched.dispatch(d, model_version=self.model_version, now=now) for d in chosen]
        self.registry.record_selected(chosen, seq)
        self._save_async()
        for task in tasks:
            self._send_task(task.device_id, round_index=task.task_round,
                            model_version=task.model_version)
        return bool(tasks) or changed

    def _save_async(self) -> None:
        assert self._async is not None
        self.store.put_state(ASYNC_BLOB, json.dumps(self._async.to_json()).encode())

    def _async_update(self, device: str, message: Message) -> None:
        assert self._async is not None and self._fedbuff is not None
        sched, buf = self._async, self._fedbuff
        key = (message.round, device)
        task = sched.lookup(message.round, device)
        first = self._ledger.recall(message.round, device, message.attempt)
        if key in self._async_done or task is None or first is not None:
            # Counted, refused before, or not a task in flight: the store and the ledger
            # say which (after a restart too).
            self._answer(device, message, after_round(
                self.store, self._ledger, fleet=self.fleet, task_round=message.round,
                device=device, attempt=message.attempt, unknown=AckCode.UNKNOWN_TASK,
                why="no such task in flight"))
            return
        if self._ledger.exhausted(task.task_round, device):
            sched.complete(task.task_round)
            self._refuse(device, message, refused(
                AckCode.TOO_MANY_ATTEMPTS,
                f"{self._ledger.max_judged} attempts were refused for task {task.task_round}"))
            return
        if message.model_version != task.model_version:
            self._refuse(device, message, refused(
                AckCode.WRONG_MODEL_VERSION, f"task was version {task.model_version}"))
            return
        parsed = self._judge(device, message, task.task_round,
                             max_steps=self._sent_steps(task.task_round, device))
        if parsed is None:
            return
        if isinstance(parsed, Answer):
            if parsed.final:  # else the task stays in flight for a corrected attempt
                sched.complete(task.task_round)
            self._refuse(device, message, parsed)
            return
        meta, update = parsed.meta, parsed.update
        verdict = check_staleness(trained_from=task.model_version,
                                  current_version=self.model_version, policy=buf.policy)
        if not verdict.ok:
            sched.complete(task.task_round)
            self._refuse(device, message, refused(str(verdict.reason), verdict.detail))
            return
        staleness = self.model_version - task.model_version
        discount = staleness_discount(staleness, buf.policy)
        # The buffer as it will be once this update is in it: stored with the key.
        acc = StreamingAccumulator.from_snapshot(buf.snapshot())
        acc.add(update, parsed.weight, scale=discount)
        sched.complete(task.task_round, emulated_s=_took(meta))
        ukey = UpdateKey(fleet=self.fleet, round=message.round, device_id=device,
                         attempt=message.attempt)
        try:
            fresh = self.store.accept_update(ukey, states={
                FEDBUFF_BLOB: acc.snapshot().to_bytes(),
                ASYNC_BLOB: json.dumps(sched.to_json()).encode()})
        except StoreError as exc:
            log.error("device %s: cannot store update (%s); not acknowledged", device, exc)
            return
        if not fresh:
            self._answer(device, message, after_round(
                self.store, self._ledger, fleet=self.fleet, task_round=message.round,
                device=device, attempt=message.attempt))
            return
        buf.restore(acc.snapshot())
        self._observe_body(parsed.body_bytes)
        self._remember_done(key)
        self._screen.accepted(parsed.norm)
        self._weights.accepted(parsed.weight)
        self._note_report(meta)
        self.counters.update("accepted")
        self._answer(device, message, ACCEPTED)
        took = _took(meta)
        self._policy.feedback(device, duration_s=took, completed=True,
                              loss=_loss(meta.train_loss), num_samples=meta.num_samples)
        self.registry.record_outcome(device, completed=True, duration_s=took,
                                     loss=_loss(meta.train_loss))
        if buf.pending >= buf.buffer_size:
            self._release_async()

    def _release_async(self) -> None:
        assert self._async is not None and self._fedbuff is not None
        buf = self._fedbuff
        snap = buf.snapshot()
        delta = StreamingAccumulator.from_snapshot(snap).result()
        buf.restore(StreamingAccumulator(size=self.layout.size).snapshot())
        new_params = self._opt.step(self.params, delta)
        emulated = self._async.aggregated()
        now = self.clock.now()
        if not np.isfinite(new_params).all():
            log.error("async aggregate is not finite: dropped")
            return
        self.params = new_params
        self.model_version += 1
        self.emulated_total_s = (self._async.emulated_now if self.config.clock == "virtual"
                                 else self.emulated_total_s + (now - self._async_started))
        reset = self._screen.end_epoch(min_refused=buf.buffer_size // 2 + 1)
        if reset is not None:
            log.warning("%s", reset)
        metrics = self._round_metrics(RoundMetrics(
            round=self.model_version, model_version=self.model_version, outcome="aggregated",
            reason=f"{snap.count} updates buffered", devices_reported=snap.count,
            devices_selected=snap.count, updates_rejected=self._stats.rejected,
            emulated_s=emulated if self.config.clock == "virtual" else now - self._async_started,
            wall_s=now - self._async_started, update_norm=float(np.linalg.norm(delta)),
        ))
        self.store.save_checkpoint(
            fleet=self.fleet, model_version=self.model_version, params=self.params,
            states={STATE_BLOB: self._state_json(), OPT_BLOB: self._opt.to_bytes(),
                    FEDBUFF_BLOB: buf.snapshot().to_bytes(),
                    ASYNC_BLOB: json.dumps(self._async.to_json()).encode(),
                    PENDING_METRICS_BLOB: json.dumps(metrics.to_json()).encode()})
        self._broadcast_model()
        self._record(metrics, evaluate=True)
        self._async_started = now
        self._fed = []
        snap2 = self.counters.snapshot()
        self._stats = _RoundStats(bytes_up0=snap2["bytes_up"], bytes_down0=snap2["bytes_down"])
        self.wake()

    def _remember_done(self, key: tuple[int, str]) -> None:
        self._async_done[key] = None
        while len(self._async_done) > 10_000:
            self._async_done.popitem(last=False)

    # ------------------------------------------------------------------ messages

    def _send(self, topic: str, message: Message) -> None:
        owner = self.channel.topics.device_of(topic)
        if owner is not None and message.device != owner:
            # Receivers drop a message on a device topic whose envelope names another
            # device; the aggregator's messages to a device carry that device's id.
            message = replace(message, device=owner)
        try:
            self.channel.send(topic, message)
        except WireError as exc:  # TransportError included: a dead link is data
            log.warning("send on %s failed: %s", topic, exc)
            return
        except Exception as exc:  # the broker went away (BrokerUnavailable...)
            log.warning("send on %s failed: %s", topic, exc)
            return
        self.counters.add_bytes(down=len(message.body))

    def _send_task(self, device: str, *, round_index: int, model_version: int) -> None:
        cfg = self.config
        assert self._server is not None and self._run is not None
        seed = int(np.random.default_rng([cfg.seed, round_index, _hash(device)])
                   .integers(0, 2**31 - 1))
        key = (round_index, device)
        # A task sent again (a restarted device, a roll call) is the same task: the same
        # nonce and seed, and the work first asked for.
        max_steps = (self._task_steps[key] if key in self._task_steps
                     else self._max_steps(device))
        if max_steps != cfg.max_steps and key not in self._task_steps:
            log.info("device %s: %d local steps in round %d (the whole task would miss "
                     "the %.3g s deadline)", device, max_steps, round_index, cfg.deadline_s)
        try:
            model_hash = self._server.hash_of(
                model_version, self.params if model_version == self.model_version else None)
        except StoreError as exc:
            log.error("device %s: no task for round %d: model version %d is gone (%s)",
                      device, round_index, model_version, exc)
            return
        self._task_steps[key] = max_steps
        while len(self._task_steps) > TASK_MEMORY:
            self._task_steps.popitem(last=False)
        task = TaskSpec(round=round_index, model_version=model_version,
                        artifacts_hash=self.model.info.content_hash, model_hash=model_hash,
                        nonce=self._nonce(round_index, device), run=self._run.run_id,
                        codec=str(self._uplink), epochs=cfg.local_epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, max_steps=max_steps,
                        deadline_s=self._task_deadline_s(), seed=seed,
                        evaluate=cfg.federated_eval, num_classes=self.num_classes)
        self._send(self.channel.topics.down(device, "task"),
                   task.to_message(fleet=self.fleet, round=round_index,
                                   model_version=model_version))

    def _sent_steps(self, task_round: int, device: str) -> int | None:
        """``max_steps`` of the task sent to ``device`` (the configured cap if unknown)."""
        return self._task_steps.get((task_round, device), self.config.max_steps)

    def _broadcast_model(self) -> None:
        assert self._server is not None
        self._server.broadcast(self.model_version, self.params)

    def _ack(self, device: str, message: Message, status: str, reason: str) -> None:
        ack = Ack(round=message.round, attempt=message.attempt, what="update", status=status,
                  reason=reason)
        self._send(self.channel.topics.down(device, "ack"),
                   ack.to_message(fleet=self.fleet, round=message.round,
                                  model_version=message.model_version, attempt=message.attempt))

    def _note(self, device: str, level: int, msg: str, *args: object) -> None:
        """Log a line about ``device``: a few a minute per device at most."""
        self._log.log(log, level, device, msg, *args)

    def _reject(self, device: str, message: Message, reason: str, detail: str) -> None:
        self._answer(device, message, refused(reason, detail))

    def _answer(self, device: str, message: Message, answer: Answer) -> None:
        """Acknowledge an update (docs/PROTOCOL.md section 5.1)."""
        if answer.status == "rejected":
            self._note(device, logging.WARNING,
                       "device %s: update for round %d (attempt %d) rejected (%s): %s", device,
                       message.round, message.attempt, answer.code, answer.detail)
            self.counters.update(f"rejected:{answer.code}")
            self._stats.rejected += 1
        elif answer.status == "duplicate":
            self.counters.update("duplicate")
        self._ack(device, message, answer.status, answer.reason)

    def _refuse(self, device: str, message: Message, answer: Answer) -> None:
        """Refuse a judged attempt: remember the answer (the same attempt gets it again),
        settle the device's part in a sync round when the refusal is final, and ack."""
        self._ledger.record(message.round, device, message.attempt, answer)
        rnd = self._round
        if rnd is not None and rnd.spec.index == message.round and self.config.mode == "sync":
            if answer.final:
                rnd.rejected(device)
            else:
                rnd.refused(device)
            self.store.put_state(refused_blob(message.round),
                                 json.dumps(self._ledger.to_json(message.round)).encode())
        self._answer(device, message, answer)

    def _on_presence(self, topic: str, message: Message) -> None:
        device = self.channel.topics.device_of(topic)
        if device is None or message.kind != Kind.PRESENCE:
            return
        try:
            status = Presence.from_message(message).status
        except WireError as exc:
            self._note(device, logging.WARNING, "device %s: malformed presence: %s", device,
                       printable(exc))
            return
        with self._wake:
            self.registry.on_presence(device, online=status == "online", at=self.clock.now())
            if status == "offline":
                if self._round is not None and self._round.dropped(device):
                    self._note(device, logging.INFO, "device %s went offline during round %d",
                               device, self._round.spec.index)
                if self._async is not None:
                    for task in self._async.drop_device(device):
                        log.info("device %s went offline with async task %d", device,
                                 task.task_round)
                        self._policy.feedback(device, duration_s=None, completed=False)
            self.counters.set("devices_online", len(self.registry.online()))
            self._wake.notify_all()

    def _on_up(self, topic: str, message: Message) -> None:
        device = self.channel.topics.device_of(topic)
        if device is None:
            return
        with self._wake:
            try:
                if message.kind == Kind.UPDATE:
                    self.counters.add_bytes(up=len(message.body))
                    if self.config.mode == "async":
                        self._async_update(device, message)
                    else:
                        self._sync_update(device, message)
                elif message.kind == Kind.HELLO:
                    self._on_hello(device, Hello.from_message(message))
                elif message.kind == Kind.ACK:
                    self._on_task_ack(device, Ack.from_message(message))
                elif message.kind == Kind.CONTROL:
                    self._on_request(device, Request.from_message(message))
                elif message.kind == Kind.ERROR:
                    self._on_error(device, ErrorReport.from_message(message))
                else:
                    self._note(device, logging.WARNING, "device %s: unexpected %s message on %s",
                               device, message.kind.topic_name, printable(topic))
            except WireError as exc:
                self.counters.update(f"malformed:{message.kind.topic_name}")
                self._note(device, logging.WARNING, "device %s: malformed %s message: %s",
                           device, message.kind.topic_name, printable(exc, 300))
            self._wake.notify_all()

    def _on_hello(self, device: str, hello: Hello) -> None:
        before = self.registry.get(device)
        back = before is not None and not before.greeted  # its first hello since offline
        info = self.registry.on_hello(device, hello, at=self.clock.now())
        if info.profile_problem is not None:
            self.counters.update("malformed:profile")
        log.debug("device %s: hello (eligible=%s, samples=%d)", device, info.eligible,
                  info.num_samples)
        if hello.protocol != PROTOCOL_VERSION:
            why = f"speaks protocol {hello.protocol}; this aggregator speaks {PROTOCOL_VERSION}"
            self.registry.exclude(device, why)
            self._note(device, logging.WARNING, "device %s %s: not selected (update the agent)",
                       device, why)
            return
        rnd = self._round
        state = rnd.state(device) if rnd is not None else None
        if rnd is not None and (
            (hello.busy_round == rnd.spec.index
             and state in (DeviceState.TASKED, DeviceState.WORKING, DeviceState.DROPPED))
            or (hello.busy_round is None and state is DeviceState.DROPPED and back)
        ):
            # Busy with this round (restarted mid-task), or back from offline without
            # it (its session may have lost the task): the same task again. A device
            # that was not busy counts as working again once it accepts the task.
            if hello.busy_round is not None:
                rnd.revive(device)
            self._send_task(device, round_index=rnd.spec.index,
                            model_version=rnd.spec.model_version)
        if self._async is not None and hello.busy_round is not None:
            task = self._async.lookup(hello.busy_round, device)
            if task is not None:
                self._send_task(device, round_index=task.task_round,
                                model_version=task.model_version)

    def _on_task_ack(self, device: str, ack: Ack) -> None:
        if ack.what != "task":
            return
        if self._async is not None:
            if ack.status == "declined" and self._async.complete(ack.round) is not None:
                self._note(device, logging.INFO, "device %s declined async task %d: %s", device,
                           ack.round, printable(ack.reason))
            return
        rnd = self._round
        if rnd is None or ack.round != rnd.spec.index:
            return
        if ack.status == "accepted":
            rnd.task_accepted(device)
        elif ack.status == "declined" and rnd.declined(device):
            self._note(device, logging.INFO, "device %s declined round %d: %s", device,
                       ack.round, printable(ack.reason))
            self._replace(rnd)

    def _replace(self, rnd: SyncRound) -> None:
        """Select one replacement for a decliner while the round has time left."""
        if not self.config.replace_declined:
            return
        if not rnd.spec.virtual and self.clock.now() >= rnd.spec.deadline_at:
            return
        candidates = self.registry.candidates(exclude=set(rnd.selected),
                                              duration=self._duration)
        if not candidates:
            return
        index = rnd.spec.index
        chosen = self._policy.select(
            candidates, 1, round_index=index, deadline_s=self.config.deadline_s,
            rng=self._rng(index * 7919 + len(rnd.selected)))
        if not chosen:
            return
        device = chosen[0]
        rnd.add_device(device)
        extras = [d for d in rnd.selected if d not in self._initial_selected(index)]
        self.store.put_state(f"round:{index}:extra", json.dumps(extras).encode())
        self.registry.record_selected([device], index)
        log.info("round %d: %s replaces a decliner", index, device)
        self._send_task(device, round_index=index, model_version=rnd.spec.model_version)

    def _initial_selected(self, index: int) -> tuple[str, ...]:
        rec = self.store.round(self.fleet, index)
        return rec.selected if rec is not None else ()

    def _on_request(self, device: str, request: Request) -> None:
        assert self._server is not None
        self._server.serve(device, request, current_version=self.model_version,
                           params=self.params)

    def _on_error(self, device: str, report: ErrorReport) -> None:
        code = printable(report.code, 32)
        self._note(device, logging.WARNING, "device %s reports error %s (round %s): %s", device,
                   code, report.round, printable(report.message, 300))
        self.counters.update(f"device_error:{code}")
        if report.code in DEVICE_ERRORS_EXCLUDE:
            # It would fail the same way next round: leave it out until its next hello.
            self.registry.exclude(
                device, f"reported {code} error: {printable(report.message, 120)}")
        rnd = self._round
        if rnd is not None and report.round == rnd.spec.index:
            rnd.dropped(device)
        if self._async is not None and report.round is not None:
            self._async.complete(report.round)

    # ------------------------------------------------------------------ updates

    def _judge(self, device: str, message: Message, task_round: int, *,
                max_steps: int | None) -> _Parsed | Answer | None:
        """Unpack, check the nonce, decode, validate, screen the norm and bound the weight
        of an update answering ``device``'s task ``task_round``: the parsed update, or
        the refusal of this attempt, or None after refusing a copy that answers no task
        of ours (``wrong_nonce``: not a judged attempt; the device's own may still come)."""
        try:
            meta, body = unpack_update_body(message.body)
        except WireError as exc:
            return refused(AckCode.BAD_BODY, str(exc))
        if meta.nonce != self._nonce(task_round, device):
            self._reject(device, message, AckCode.WRONG_NONCE,
                         f"the update does not answer this device's task {task_round}")
            return None
        return self._parse_update(device, meta, body, max_steps=max_steps)

    def _parse_update(
        self, device: str, meta: UpdateMeta, body: bytes, *, max_steps: int | None
    ) -> _Parsed | Answer:
        """Decode, validate, screen the norm and bound the weight (or say why not)."""
        try:
            update = decode_update(body, self.layout)
        except CodecError as exc:
            return refused(AckCode.CODEC, str(exc))
        if not meta.num_samples > 0:
            return refused(AckCode.BAD_WEIGHT, f"num_samples {meta.num_samples}")
        verdict = validate_update(update, rules=self._rules)
        if not verdict.ok:
            return refused(str(verdict.reason), verdict.detail)
        norm = verdict.norm
        judgement = self._screen.judge(norm)
        bootstrap = judgement.bootstrap and self.config.mode == "sync"
        if judgement.bootstrap and not bootstrap:  # async: no round to judge at
            model_norm = l2_norm(self.params)
            if model_norm > 0 and norm > model_norm:
                judgement = replace(judgement, ok=False, detail=(
                    f"norm {norm:.4g} > the global model's own norm {model_norm:.4g} "
                    "(no update history yet)"))
        self._screen.observe(device, norm, refused=not judgement.ok)
        if not judgement.ok:
            reason = (Reason.NORM_ABOVE_MEDIAN if judgement.threshold is not None
                      else Reason.NORM_ABOVE_MODEL)
            if self._async is not None:
                reset = self._screen.end_epoch(
                    min_refused=self.config.buffer_size // 2 + 1, clear=False)
                if reset is not None:
                    log.warning("%s", reset)
            return refused(str(reason), judgement.detail)
        info = self.registry.get(device)
        announced = info.num_samples if info is not None and info.hello_seen else None
        cap = task_samples_cap(epochs=self.config.local_epochs,
                               batch_size=self.config.batch_size, max_steps=max_steps,
                               announced=announced)
        weight, why = self._weights.bound(meta.num_samples, task_cap=cap)
        if why:
            self.counters.update("bounded:weight")
            self._note(device, logging.WARNING, "device %s: weight bounded to %.4g (%s)",
                       device, weight, why)
        return _Parsed(meta=meta, update=update, norm=norm, weight=weight,
                       body_bytes=len(body), bootstrap=bootstrap)

    def _nonce(self, task_round: int, device: str) -> str:
        assert self._run is not None
        return task_nonce(self._run.secret, fleet=self.fleet, task_round=task_round,
                          device=device)

    def _sync_update(self, device: str, message: Message) -> None:
        rnd, acc = self._round, self._acc
        if rnd is None or acc is None or message.round != rnd.spec.index:
            why = "no open round" if rnd is None else f"round {rnd.spec.index} is open"
            self._answer(device, message, after_round(
                self.store, self._ledger, fleet=self.fleet, task_round=message.round,
                device=device, attempt=message.attempt, why=why))
            return
        index = rnd.spec.index
        first = self._ledger.recall(index, device, message.attempt)
        if first is not None:  # an attempt is judged once
            self._answer(device, message, first)
            return
        admission = rnd.admit(device, emulated_s=None, duration_s=0.0)
        if admission is Admission.NOT_SELECTED:
            self._reject(device, message, AckCode.NOT_SELECTED, f"not selected in round {index}")
            return
        if admission is Admission.ALREADY_COUNTED:
            self._answer(device, message, after_round(
                self.store, self._ledger, fleet=self.fleet, task_round=index, device=device,
                attempt=message.attempt))
            return
        if admission is Admission.RESOLVED:
            self._reject(device, message, AckCode.RESOLVED,
                         f"device is {rnd.state(device)} in this round")
            return
        if self._ledger.exhausted(index, device):
            self._refuse(device, message, refused(
                AckCode.TOO_MANY_ATTEMPTS,
                f"{self._ledger.max_judged} attempts were refused in round {index}"))
            return
        if message.model_version != rnd.spec.model_version:
            self._refuse(device, message, refused(
                AckCode.WRONG_MODEL_VERSION, f"round trains version {rnd.spec.model_version}"))
            return
        parsed = self._judge(device, message, index, max_steps=self._sent_steps(index, device))
        if parsed is None:
            return
        if isinstance(parsed, Answer):
            self._refuse(device, message, parsed)
            return
        meta = parsed.meta
        if rnd.admit(device, emulated_s=meta.emulated_s,
                     duration_s=meta.duration_s) is Admission.LATE:
            rnd.late(device, _report(meta))
            self._refuse(device, message, refused(
                AckCode.MISSED_DEADLINE,
                f"took {_took(meta):.3g} s > deadline {rnd.spec.deadline_s:.3g} s"))
            return
        if not acc.has_room(len(self._deferred)):
            self._refuse(device, message, refused(AckCode.BUFFER_FULL, "robust buffer is full"))
            return
        key = UpdateKey(fleet=self.fleet, round=rnd.spec.index, device_id=device,
                        attempt=message.attempt)
        stored_meta: dict[str, Any] = {
            "num_samples": meta.num_samples, "weight": parsed.weight, "norm": parsed.norm,
            "model_version": message.model_version, "emulated_s": meta.emulated_s}
        if parsed.bootstrap:
            stored_meta["deferred"] = True
        try:
            fresh = self.store.add_round_update(key, message.body, stored_meta,
                                                at=self.clock.now())
        except StoreError as exc:  # not acknowledged: the device will send it again
            log.error("device %s: cannot store update (%s); not acknowledged", device, exc)
            return
        if not fresh:
            self._answer(device, message, after_round(
                self.store, self._ledger, fleet=self.fleet, task_round=index, device=device,
                attempt=message.attempt))
            return
        if parsed.bootstrap:
            self._deferred.append(_Deferred(device=device, norm=parsed.norm,
                                            weight=parsed.weight))
        else:
            acc.add(parsed.update, parsed.weight)
            self._screen.accepted(parsed.norm)
            self._weights.accepted(parsed.weight)
        self._observe_body(parsed.body_bytes)
        rnd.count(device, _report(meta))
        self._note_report(meta)
        self.counters.update("accepted")
        self._answer(device, message, ACCEPTED)

    def _note_report(self, meta: UpdateMeta) -> None:
        if math.isfinite(meta.train_loss):
            self._stats.train_loss_sum += meta.train_loss * meta.num_samples
            self._stats.train_samples += meta.num_samples
        if meta.eval_samples > 0:
            self._fed.append((meta.eval_loss, meta.eval_accuracy, meta.eval_samples))


@dataclass(frozen=True, kw_only=True)
class _DeviceResult:
    device_id: str
    completed: bool
    duration_s: float | None
    loss: float | None = None
    num_samples: int | None = None


DEADLINE_EXPLORATION = 0.05
"""Share of the deadline policy's slots given to devices predicted to miss it."""


def _policy_options(config: AggregatorConfig) -> dict[str, Any]:
    """How the aggregator runs a policy: the deadline policy samples among the devices
    that fit (so every class that can make the deadline trains), explores the others a
    little, and falls back to the fastest only when fewer than a quorum fit."""
    if config.selection == "deadline":
        return {"sampling": "random", "exploration": DEADLINE_EXPLORATION,
                "min_devices": config.effective_quorum, "max_devices": config.max_selected}
    return {}


def _took(meta: UpdateMeta) -> float:
    return meta.emulated_s if meta.emulated_s is not None else meta.duration_s


def _loss(value: float) -> float | None:
    return value if math.isfinite(value) and value >= 0 else None


def _report(meta: UpdateMeta) -> Report:
    return Report(duration_s=meta.duration_s, emulated_s=meta.emulated_s,
                  loss=_loss(meta.train_loss), num_samples=meta.num_samples)


def _hash(device: str) -> int:
    return zlib.crc32(device.encode())


def latest_metrics(path: Path) -> dict[str, Any] | None:
    """The last JSON line of a metrics log, for tools that poll a running aggregator."""
    rows = MetricsLog(path).read()
    return rows[-1] if rows else None
