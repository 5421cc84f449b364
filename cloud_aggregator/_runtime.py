"""The aggregator runtime: the wire, the lock, durable state, and the parts it wires.

``Aggregator`` subscribes to its fleet's presence and ``up/#`` topics and hands each
message to the part that owns it:

- a ``Strategy`` (``SyncRounds`` or ``FedBuff``, or one of yours) decides when devices
  get tasks and when the aggregate becomes a new model;
- the ingest pipeline (``_ingest``) decodes, validates, screens and weighs each update,
  and the ``Journal`` makes accepted ones durable, a group per transaction;
- the ``WorkPlanner`` sizes and writes tasks, the ``ModelServer`` names and serves model
  versions and the artifact bundle, the ``RoundRecorder`` writes metrics, the
  ``FleetRegistry`` follows the devices, the ``EventBus`` tells subscribers.

Durability, in order: an update is journaled (its idempotency key and body, one
transaction per group), then added to the aggregate, then acknowledged: an
acknowledged update is never lost, and a redelivered one is counted once. A new model
is written with the server optimizer's state, what the strategy and the screens
learned, and the round's metrics, in one transaction (``_release``). On start the
latest checkpoint is loaded and the strategy rebuilds its open round or buffer from
the journal.

Threads: message handlers run on the transport's thread, ``tick``/``run`` on the
caller's; one re-entrant lock serialises them (an in-memory transport delivers
synchronously, so a handler may run inside ``tick``). While ``run`` is looping, the
journal commits in groups (``max_delay_s`` apart at most); otherwise each accepted
update commits before its handler returns. ``start`` registers the handlers before
connecting and holds no lock while subscribing; messages that arrive before the open
round is rebuilt wait in a bounded queue.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
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
    CodecSpec,
    ErrorReport,
    Hello,
    Kind,
    LogLimiter,
    Message,
    Presence,
    Request,
    WireError,
    printable,
    roll_call,
)
from cloud_aggregator._aggregation import UpdateRules
from cloud_aggregator._answers import ACCEPTED, Answer, AttemptLedger, after_round, refused
from cloud_aggregator._artifacts import MODEL_NAME
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._evaluate import ServerEvaluator, load_eval_data
from cloud_aggregator._events import (
    DeviceOffline,
    DeviceOnline,
    Event,
    EventBus,
    ModelReleased,
    RoundEnded,
    Status,
    Subscriber,
    UpdateAccepted,
    UpdateRefused,
)
from cloud_aggregator._fedbuff import FedBuff
from cloud_aggregator._ingest import (
    BoundWeight,
    Decode,
    IngestPipeline,
    IngestStage,
    Journal,
    Outcome,
    Screen,
    Unpack,
    UpdateItem,
    Validate,
)
from cloud_aggregator._metrics import Counters, MetricsLog, MetricsServer, RoundMetrics
from cloud_aggregator._planner import WorkPlanner
from cloud_aggregator._recorder import PENDING_METRICS, RoundRecorder
from cloud_aggregator._registry import FleetRegistry
from cloud_aggregator._rounds import Clock, SyncRound, WallClock
from cloud_aggregator._screen import NormScreen, WeightBound
from cloud_aggregator._selection import SelectionPolicy, make_policy
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
)
from cloud_aggregator._status import STATUS_INTERVAL_S
from cloud_aggregator._store import JournalEntry, Store, StoreError, UpdateKey
from cloud_aggregator._strategy import Admit, ModelState, Reply, Strategy, StrategyContext
from cloud_aggregator._sync import SyncRounds
from device_profiles import ConfigError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
STATE_BLOB = "aggregator"
OPT_BLOB = "server_opt"
POLL_S = 0.05
REGISTRY_EVERY_S = 1.0
"""While ``run`` loops, the registry's device history is written at most this often
(and with every new model): it is advisory, and hellos bring it back after a crash."""
MAX_EARLY_MESSAGES = 10_000
"""Messages held while the aggregator rebuilds its round at start-up."""
DEVICE_ERRORS_EXCLUDE = ("data", "artifact", "backend")
"""Error codes after which a device is not selected again until its next hello."""


class Aggregator:
    """Runs a fleet's training on ``channel`` as ``config`` says; see the module doc.

    In-process use (a simulator): build a ``Channel`` on any transport, then
    ``Aggregator(config=..., channel=...)``, ``start()``, and either ``run()`` in a
    thread or call ``tick()`` yourself. Parts may be given instead of configured:
    ``strategy`` (default: ``SyncRounds`` or ``FedBuff`` by ``config.mode``), ``policy``
    (a ``SelectionPolicy``; default from ``config.selection``), ``optimizer`` (a server
    optimizer with ``step``/``to_bytes``/``load_bytes``), ``evaluator`` (with
    ``evaluate(params)``). ``subscribe`` delivers the fleet's events.
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
        strategy: Strategy | None = None,
        policy: SelectionPolicy | None = None,
        optimizer: Any = None,
        evaluator: Any = None,
    ) -> None:
        if channel.fleet != config.fleet:
            raise ConfigError(f"channel is for fleet {channel.fleet!r}, config {config.fleet!r}")
        self.config = config
        self.channel = channel
        self.clock: Clock = clock or WallClock()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self.events = EventBus()
        self.ledger = AttemptLedger()
        if on_status is not None:
            self.events.subscribe(lambda e: on_status(e.text) if isinstance(e, Status) else None)
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
            self._init_parts(artifacts_dir, on_round, strategy, policy, optimizer, evaluator)
        except BaseException:
            self.store.close()
            if self._tmp is not None:
                self._tmp.cleanup()
            raise

    def _init_parts(self, artifacts_dir: str | Path | None,
                    on_round: Callable[[RoundMetrics], None] | None, strategy: Strategy | None,
                    policy: SelectionPolicy | None, optimizer: Any, evaluator: Any) -> None:
        config = self.config
        clean_stale_temp_files(self.store.checkpoint_dir)
        self.metrics_log = MetricsLog(self.state_dir / "metrics.jsonl")
        self._identity = model_identity(config)
        self._run: RunRecord | None = check_state_dir(
            self.store, config=config, identity=self._identity, metrics_path=self.metrics_log.path)
        self.registry = FleetRegistry(store=self.store, clock=self.clock.now)
        self.counters = Counters()
        self.model = prepare_artifacts(
            config, Path(artifacts_dir) if artifacts_dir else self.state_dir / "artifacts",
            identity=self._identity)
        self.layout = self.model.layout
        self.screen = NormScreen(multiple=config.norm_median_multiple)
        self.weights = WeightBound(multiple=config.max_weight_multiple)
        self._uplink = CodecSpec.parse(config.codec)
        self._downlink = CodecSpec.parse(config.downlink_codec)
        self.policy = policy or make_policy(config.selection, **_policy_options(config))
        self.num_classes = output_classes(self.model.directory / MODEL_NAME,
                                          loss=self.model.info.loss)
        if evaluator is None and config.eval_data is not None:
            x, y = load_eval_data(config.eval_data)
            evaluator = ServerEvaluator(
                model_path=self.model.directory / MODEL_NAME, layout=self.layout, x=x, y=y,
                input_name=self.model.info.input_name, loss=self.model.info.loss)
            check_eval_data(evaluator.evaluate, self.model.initial, y=y,
                            num_classes=self.num_classes, path=config.eval_data)
        self.recorder = RoundRecorder(fleet=config.fleet, store=self.store,
                                      log_file=self.metrics_log, counters=self.counters,
                                      evaluator=evaluator, on_round=on_round)
        self.state = ModelState(params=self.model.initial.copy(),
                                optimizer=optimizer or config.make_server_optimizer())
        self.strategy: Strategy = strategy or (FedBuff() if config.mode == "async"
                                               else SyncRounds())
        self.journal = Journal(self.store)
        self.pipeline = self._default_pipeline()
        self.planner: WorkPlanner | None = None  # needs the run record: set in start()
        self._server: ModelServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._log = LogLimiter()
        self._started = self._ready = self._closed = self._running = False
        self._early: collections.deque[tuple[Callable[[str, Message], None], str, Message]] = (
            collections.deque())
        self._failed: str | None = None
        self._last_status = time.monotonic()
        self.last_status: str | None = None

    def _default_pipeline(self) -> IngestPipeline:
        cfg = self.config
        stages: Sequence[IngestStage] = [
            Unpack(nonce_of=lambda r, d: self._planner().nonce(r, d)),
            Decode(layout=self.layout),
            Validate(rules=UpdateRules(size=self.layout.size, max_norm=cfg.max_update_norm)),
            Screen(screen=self.screen, defers=self.strategy.defers_bootstrap,
                   model_norm=lambda: _norm(self.state.params)),
            BoundWeight(weights=self.weights, epochs=cfg.local_epochs,
                        batch_size=cfg.batch_size, announced=self._announced),
        ]
        return IngestPipeline(stages)

    def _announced(self, device: str) -> int | None:
        info = self.registry.get(device)
        return info.num_samples if info is not None and info.hello_seen else None

    def _planner(self) -> WorkPlanner:
        if self.planner is None:
            raise AggregatorError("the aggregator is not started")
        return self.planner

    # ------------------------------------------------------------------ properties

    @property
    def fleet(self) -> str:
        return self.config.fleet

    @property
    def params(self) -> F32:
        return self.state.params

    @property
    def model_version(self) -> int:
        return self.state.version

    @property
    def emulated_total_s(self) -> float:
        return self.state.emulated_total_s

    @property
    def history(self) -> list[RoundMetrics]:
        return self.recorder.history

    @property
    def compression_ratio(self) -> float:
        return self.planner.compression_ratio if self.planner is not None else 1.0

    @property
    def current_round(self) -> SyncRound | None:
        """The open sync round, if any."""
        return getattr(self.strategy, "current", None)

    @property
    def round_index(self) -> int | None:
        with self._lock:
            rnd = self.current_round
            return rnd.spec.index if rnd is not None else None

    @property
    def done(self) -> bool:
        return self.state.version >= self.config.rounds or self._failed is not None

    @property
    def failure(self) -> str | None:
        return self._failed

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server is not None else None

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every fleet event (see ``_events``)."""
        return self.events.subscribe(callback)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Restore state, subscribe, connect, announce the model; resume the strategy.

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
            self.strategy.resume()
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

    def stop(self) -> None:
        """Ask ``run`` to return after the current step (thread-safe)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()

    def close(self, *, unsubscribe: bool = True) -> None:
        """Stop serving: commit what is pending, unsubscribe, stop the metrics endpoint,
        close the store. ``unsubscribe=False`` keeps the broker session's subscriptions
        (a persistent session then queues what devices send until the next start)."""
        self.stop()
        with self._lock:
            if not self._closed:
                self.journal.flush()
                self._flushed()
                self.registry.flush()
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
        """Tick until ``config.rounds`` model versions exist, ``stop()``, or the timeout.

        While it runs, accepted updates commit in groups (see ``Journal``)."""
        self.start()
        end = None if timeout_s is None else time.monotonic() + timeout_s
        self._running = True
        try:
            while not self._stop.is_set() and not self.done:
                if end is not None and time.monotonic() >= end:
                    log.warning("aggregator run timed out after %.0f s", timeout_s)
                    break
                with self._wake:
                    progressed = self.tick()
                    if not progressed and not self._stop.is_set():
                        due = self.journal.wait_s()
                        self._wake.wait(POLL_S if due is None else min(POLL_S, due))
        finally:
            with self._lock:
                self._running = False
                self.journal.flush()
                self._flushed()
        return list(self.history)

    def wake(self) -> None:
        """Make ``run`` look at the clock now (a virtual clock moved)."""
        with self._wake:
            self._wake.notify_all()

    def tick(self) -> bool:
        """One scheduling step; True when something happened (a round opened or closed)."""
        if not self._started:
            self.start()  # not under the lock: start() subscribes
        with self._lock:
            if self.done:
                return False
            if self._running:
                self._commit_due()  # the run loop groups commits
            else:
                self.journal.flush()
                self._flushed()
            progressed = self.strategy.tick(self.clock.now())
            self.registry.flush(every_s=0.0 if not self._running else REGISTRY_EVERY_S)
            self._maybe_status(progressed)
            return progressed

    def _commit_due(self) -> None:
        due = self.journal.wait_s()
        if due is not None and due <= 0:
            self.journal.flush()
            self._flushed()

    def _flushed(self) -> None:
        if self._started and not self._closed:
            self.strategy.flushed()
            self.registry.flush(every_s=REGISTRY_EVERY_S)

    # ------------------------------------------------------------------ state

    def _state_json(self) -> bytes:
        """Everything learned from the fleet that the next round depends on: the policy's
        duration corrections and statistics, the observed compression, the screens'
        histories, the strategy's own state. Saved with each checkpoint, so a restarted
        aggregator schedules and screens as the one that stopped would have."""
        planner = self._planner()
        return json.dumps({
            "mode": self.config.mode, "model": self.config.model,
            "content_hash": self.model.info.content_hash, "model_version": self.state.version,
            "emulated_total_s": self.state.emulated_total_s,
            "strategy": self.strategy.state(),
            "selection": self.policy.state(),
            "accepted_norms": self.screen.history,
            "accepted_weights": self.weights.history,
            "body_bytes": [planner.body_bytes_sum, planner.body_count],
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
        cfg = self.config
        if self._run is None:  # a fresh state dir, or one from before run records
            self._run = RunRecord.new(self._identity)
            self.store.put_state(RUN_BLOB, self._run.to_bytes())
        self.planner = WorkPlanner(config=cfg, registry=self.registry, policy=self.policy,
                                   model_size=self.layout.size, secret=self._run.secret,
                                   run_id=self._run.run_id,
                                   artifacts_hash=self.model.info.content_hash,
                                   num_classes=self.num_classes)
        self._server = ModelServer(
            fleet=self.fleet, run_id=self._run.run_id, layout=self.layout,
            codec=self._downlink, store=self.store, topics=self.channel.topics,
            send=self._send, counters=self.counters, artifacts_dir=self.model.directory,
            artifacts_hash=self.model.info.content_hash)
        self.strategy.bind(self._context())
        state = self._blob_json(STATE_BLOB)
        if state is not None:
            self._load_state(state)
        if self.store.checkpoint(self.fleet) is None:
            self.store.save_checkpoint(
                fleet=self.fleet, model_version=0, params=self.state.params,
                states={STATE_BLOB: self._state_json(),
                        OPT_BLOB: self.state.optimizer.to_bytes()})
        record, params = self.store.load_checkpoint(self.fleet)
        if params.size != self.layout.size:
            raise AggregatorError("checkpoint does not match the model's layout")
        self.state.params, self.state.version = params, record.model_version
        opt_state = self.store.get_state(OPT_BLOB)
        if opt_state is not None:
            self.state.optimizer.load_bytes(opt_state)
        pending = self._blob_json(PENDING_METRICS)
        if pending is not None:
            self.recorder.recover(pending, model_version=self.state.version,
                                  params=self.state.params)
            self.store.delete_state(PENDING_METRICS)
        self.recorder.begin()
        log.info("fleet %s: run %s, model version %d", self.fleet, self._run.run_id,
                 self.state.version)

    def _load_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise StoreError(f"state {STATE_BLOB!r} in {self.store.path} is not an object")
        if state.get("mode") != self.config.mode:
            raise ConfigError(
                f"{self.state_dir} holds a {state.get('mode')} run; use another state_dir")
        if state.get("content_hash") != self.model.info.content_hash:
            raise ConfigError(f"{self.state_dir} was trained with other model artifacts")
        self.state.emulated_total_s = float(state.get("emulated_total_s", 0.0))
        strategy_state = state.get("strategy")
        if strategy_state is None and "abandoned_streak" in state:  # before strategies
            strategy_state = {"abandoned_streak": state["abandoned_streak"]}
        self.strategy.load_state(strategy_state or {})
        if "selection" in state:
            self.policy.load_state(state["selection"])
        self.screen.load(state.get("accepted_norms", []))
        self.weights.load(state.get("accepted_weights", []))
        body_sum, body_count = state.get("body_bytes", [0, 0])
        planner = self._planner()
        planner.body_bytes_sum, planner.body_count = int(body_sum), int(body_count)

    def _context(self) -> StrategyContext:
        return StrategyContext(
            config=self.config, clock=self.clock, store=self.store, registry=self.registry,
            policy=self.policy, planner=self._planner(), recorder=self.recorder,
            counters=self.counters,
            layout=self.layout, model=self.state, screen=self.screen, weights=self.weights,
            send_task=self._send_task, cancel=self._cancel, release=self._release,
            emit=self.events.emit, note=self._note, fail=self._fail, ledger=self.ledger)

    def _fail(self, reason: str) -> None:
        self._failed = reason
        log.error("giving up: %s", reason)

    def _release(self, *, params: F32 | None, metrics: RoundMetrics,
                 close_round: int | None = None, missed: Sequence[str] = (),
                 drop_stream: int | None = None) -> None:
        """Apply ``params`` as the next model version (None: the round is abandoned) and
        make it durable with everything learned and the round's metrics, in one
        transaction; then broadcast it and record the metrics."""
        states = {PENDING_METRICS: RoundRecorder.pending_blob(metrics)}
        if params is not None:
            self.state.params = params
            self.state.version += 1
            states[STATE_BLOB] = self._state_json()
            states[OPT_BLOB] = self.state.optimizer.to_bytes()
            self.store.save_checkpoint(
                fleet=self.fleet, model_version=self.state.version, params=params,
                states=states, close_round=close_round, missed=missed, drop_stream=drop_stream)
        else:
            states[STATE_BLOB] = self._state_json()
            assert close_round is not None
            self.store.close_round(fleet=self.fleet, round_index=close_round, state="abandoned",
                                   missed=missed, states=states)
        self.registry.flush()
        if params is not None:
            self._broadcast_model()
            self.events.emit(ModelReleased(model_version=self.state.version))
        recorded = self.recorder.record(metrics, params=self.state.params
                                        if params is not None else None)
        self._publish_gauges()
        self.events.emit(RoundEnded(metrics=recorded))

    # ------------------------------------------------------------------ status

    def status_line(self) -> str:
        """What the aggregator is doing or waiting for, in one line."""
        with self._lock:
            return self.strategy.status()

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
        self.events.emit(Status(text=line))

    def _publish_gauges(self) -> None:
        c = self.counters
        c.set("model_version", self.state.version)
        c.set("devices_online", len(self.registry.online()))
        c.set("emulated_seconds_total", self.state.emulated_total_s)

    # ------------------------------------------------------------------ sending

    def _send(self, topic: str, message: Message) -> None:
        owner = self.channel.topics.device_of(topic)
        if owner is not None and message.device != owner:
            # Receivers drop a message on a device topic whose envelope names another
            # device; the aggregator's messages to a device carry that device's id.
            message = replace(message, device=owner)
        try:
            self.channel.send(topic, message)
        except Exception as exc:  # a dead link or a vanished broker is data here
            log.warning("send on %s failed: %s", topic, exc)
            return
        self.counters.add_bytes(down=len(message.body))

    def _send_task(self, device: str, task_round: int, model_version: int) -> bool:
        assert self._server is not None
        try:
            model_hash = self._server.hash_of(
                model_version, self.state.params if model_version == self.state.version else None)
        except StoreError as exc:
            log.error("device %s: no task for round %d: model version %d is gone (%s)",
                      device, task_round, model_version, exc)
            return False
        task = self._planner().task(device, task_round=task_round, model_version=model_version,
                                    model_hash=model_hash, codec=str(self._uplink))
        self._send(self.channel.topics.down(device, "task"),
                   task.to_message(fleet=self.fleet, round=task_round,
                                   model_version=model_version))
        return True

    def _cancel(self, device: str, round_index: int, reason: str) -> None:
        self._send(self.channel.topics.down(device, "cancel"),
                   Cancel(round=round_index, reason=reason)
                   .to_message(fleet=self.fleet, round=round_index))

    def _broadcast_model(self) -> None:
        assert self._server is not None
        self._server.broadcast(self.state.version, self.state.params)

    def _ack(self, device: str, message: Message, status: str, reason: str) -> None:
        ack = Ack(round=message.round, attempt=message.attempt, what="update", status=status,
                  reason=reason)
        self._send(self.channel.topics.down(device, "ack"),
                   ack.to_message(fleet=self.fleet, round=message.round,
                                  model_version=message.model_version, attempt=message.attempt))

    def _note(self, device: str, level: int, msg: str, *args: object) -> None:
        """Log a line about ``device``: a few a minute per device at most."""
        self._log.log(log, level, device, msg, *args)

    def _answer(self, device: str, message: Message, answer: Answer) -> None:
        """Acknowledge an update (docs/PROTOCOL.md section 5.1)."""
        if answer.status == "rejected":
            self._note(device, logging.WARNING,
                       "device %s: update for round %d (attempt %d) rejected (%s): %s", device,
                       message.round, message.attempt, answer.code, answer.detail)
            self.counters.update(f"rejected:{answer.code}")
            self.recorder.rejected()
            self.events.emit(UpdateRefused(device=device, task_round=message.round,
                                           reason=answer.code, detail=answer.detail))
        elif answer.status == "duplicate":
            self.counters.update("duplicate")
        self._ack(device, message, answer.status, answer.reason)

    def _refuse(self, device: str, message: Message, answer: Answer) -> None:
        """Refuse a judged attempt: remember the answer (the same attempt gets it again),
        let the strategy settle the device's part, and ack."""
        self.ledger.record(message.round, device, message.attempt, answer)
        self.strategy.refused(device, message.round, answer)
        self._answer(device, message, answer)

    # ------------------------------------------------------------------ handlers

    def _on_presence(self, topic: str, message: Message) -> None:
        device = self.channel.topics.device_of(topic)
        if device is None or message.kind != Kind.PRESENCE:
            return
        try:
            status = Presence.from_message(message).status
        except WireError as exc:
            self.counters.update("malformed:presence")
            self._note(device, logging.WARNING, "device %s: malformed presence: %s", device,
                       printable(exc))
            return
        with self._wake:
            self.registry.on_presence(device, online=status == "online", at=self.clock.now())
            if status == "offline":
                self.strategy.on_offline(device)
                self.events.emit(DeviceOffline(device=device))
            else:
                self.events.emit(DeviceOnline(device=device))
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
                    self._on_update(device, message)
                elif message.kind == Kind.HELLO:
                    self._on_hello(device, Hello.from_message(message))
                elif message.kind == Kind.ACK:
                    ack = Ack.from_message(message)
                    if ack.what == "task":
                        self.strategy.on_task_ack(device, ack)
                elif message.kind == Kind.CONTROL:
                    assert self._server is not None
                    self._server.serve(device, Request.from_message(message),
                                       current_version=self.state.version,
                                       params=self.state.params)
                elif message.kind == Kind.ERROR:
                    self._on_error(device, ErrorReport.from_message(message))
                else:
                    self._note(device, logging.WARNING, "device %s: unexpected %s message on %s",
                               device, message.kind.topic_name, printable(topic))
            except WireError as exc:
                self.counters.update(f"malformed:{message.kind.topic_name}")
                self._note(device, logging.WARNING, "device %s: malformed %s message: %s",
                           device, message.kind.topic_name, printable(exc, 300))
            if not self._running:  # driven by hand (tick): write what a hello changed now
                self.registry.flush()
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
        self.strategy.on_hello(device, hello, back=back)

    def _on_error(self, device: str, report: ErrorReport) -> None:
        code = printable(report.code, 32)
        self._note(device, logging.WARNING, "device %s reports error %s (round %s): %s", device,
                   code, report.round, printable(report.message, 300))
        self.counters.update(f"device_error:{code}")
        if report.code in DEVICE_ERRORS_EXCLUDE:
            # It would fail the same way next round: leave it out until its next hello.
            self.registry.exclude(
                device, f"reported {code} error: {printable(report.message, 120)}")
        self.strategy.on_error(device, report)

    # ------------------------------------------------------------------ updates

    def _on_update(self, device: str, message: Message) -> None:
        gate = self.strategy.admit(device, message)
        if isinstance(gate, Reply):
            if gate.judged:
                self._refuse(device, message, gate.answer)
            else:
                self._answer(device, message, gate.answer)
            return
        assert isinstance(gate, Admit)
        item = UpdateItem(device=device, message=message, task_round=gate.task_round,
                          max_steps=self._planner().sent_steps(gate.task_round, device))
        rejection = self.pipeline.run(item) or self.strategy.check(item)
        for counter, text in item.notes:
            self.counters.update(counter)
            self._note(device, logging.WARNING, "device %s: %s", device, text)
        if rejection is not None:
            answer = refused(rejection.reason, rejection.detail)
            if rejection.copy:  # answers no task of this device: not one of its attempts
                self._answer(device, message, answer)
            else:
                self._refuse(device, message, answer)
            return
        key = UpdateKey(fleet=self.fleet, round=message.round, device_id=device,
                        attempt=message.attempt)
        if self.journal.queued(key):  # a copy of an update that is being committed
            self._answer(device, message, Answer(
                status="duplicate", code=AckCode.ALREADY_COUNTED,
                detail=f"attempt {message.attempt} counts in round {message.round}"))
            return
        entry = JournalEntry(key=key, stream=self.strategy.stream(item), body=message.body,
                             meta=self.strategy.journal_meta(item))
        self.journal.submit(entry, lambda outcome: self._journaled(item, outcome))
        if not self._running:
            self.journal.flush()
            self._flushed()

    def _journaled(self, item: UpdateItem, outcome: Outcome) -> None:
        device, message = item.device, item.message
        if outcome == "failed":  # not acknowledged: the device will send it again
            return
        if outcome == "duplicate":
            self._answer(device, message, after_round(
                self.store, self.ledger, fleet=self.fleet, task_round=message.round,
                device=device, attempt=message.attempt))
            return
        assert item.meta is not None
        self.strategy.accepted(item)
        self._planner().observe_body(item.body_bytes)
        self.recorder.note_report(item.meta)
        self.counters.update("accepted")
        self._answer(device, message, ACCEPTED)
        self.events.emit(UpdateAccepted(device=device, task_round=item.task_round,
                                        model_version=message.model_version,
                                        num_samples=item.meta.num_samples, weight=item.weight,
                                        norm=item.norm))

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to subscribers (for strategies and stages of your own)."""
        self.events.emit(event)


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


def _norm(params: F32) -> float:
    return math.sqrt(float(np.einsum("i,i->", params, params, dtype=np.float64)))


def latest_metrics(path: Path) -> dict[str, Any] | None:
    """The last JSON line of a metrics log, for tools that poll a running aggregator."""
    rows = MetricsLog(path).read()
    return rows[-1] if rows else None
