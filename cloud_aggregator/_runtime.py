"""The aggregator runtime: the wire, the lock, durable state, and the parts it wires.

``Aggregator`` subscribes to its fleet's presence and ``up/#`` topics and hands each
message to the part that owns it:

- a ``Strategy`` (``SyncRounds`` or ``FedBuff``, or one of yours) decides when devices
  get tasks and when the aggregate becomes a new model;
- the ingest pipeline (``_ingest``) verifies each update's signature against its
  device's key (``_identity``: the ``KeyBook``), then decodes, validates, screens and
  weighs it,
  and the ``Journal`` makes accepted ones durable, a group per transaction;
- the ``WorkPlanner`` sizes and writes tasks, the ``ModelServer`` names and serves model
  versions and the artifact bundle, the ``RoundRecorder`` writes metrics, the
  ``FleetRegistry`` follows the devices, the ``EventBus`` tells subscribers.

Durability, in order: an update is journaled (its idempotency key and body, one
transaction per group), then added to the aggregate, then acknowledged: an
acknowledged update is never lost, and a redelivered one is counted once. A new model
is written with the server optimizer's state, what the strategy and the screens
learned, the round's metrics and its ledger entry, in one transaction (``_releases``).
On start the
latest checkpoint is loaded and the strategy rebuilds its open round or buffer from
the journal.

Threads: message handlers run on the transport's thread, ``tick``/``run`` on the
caller's; one re-entrant lock serialises them (an in-memory transport delivers
synchronously, so a handler may run inside ``tick``). While ``run`` is looping, the
journal commits in groups (``max_delay_s`` apart at most) on its own writer thread,
without the lock, and the run loop settles each batch once it is durable; otherwise
each accepted update commits before its handler returns. ``start`` registers the handlers before
connecting and holds no lock while subscribing; messages that arrive before the open
round is rebuilt wait in a bounded queue.

Why this module is longer than 400 lines: it is the one place that orders start-up,
durable writes and shutdown, and wires the parts (about a third of it is that wiring
and its documentation). What it orders lives in parts: devices' messages (``_desk``),
strategies, the ingest pipeline (``_ingest``) and journal (``_journal``), releases and
checkpoints (``_releases``), the learned state (``_learned``), the planner, the model
server, the recorder.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from broker_bridge import (
    AGGREGATOR_PRESENCE,
    Channel,
    CodecSpec,
    Enrolment,
    Message,
    MqttTransport,
    aggregator_presence,
    aggregator_will,
    roll_call,
)
from cloud_aggregator._aggregation import UpdateRules, l2_norm
from cloud_aggregator._answers import AttemptLedger
from cloud_aggregator._artifacts import MODEL_NAME
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._desk import DeviceDesk
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._evaluate import ServerEvaluator, load_eval_data
from cloud_aggregator._events import (
    Event,
    EventBus,
    ModelReleased,
    Status,
    Subscriber,
)
from cloud_aggregator._fedbuff import FedBuff
from cloud_aggregator._identity import KeyBook, VerifySignature
from cloud_aggregator._ingest import (
    BoundWeight,
    Decode,
    IngestPipeline,
    IngestStage,
    ReputationWeight,
    Screen,
    Unpack,
    Validate,
)
from cloud_aggregator._journal import Journal
from cloud_aggregator._learned import STATE_BLOB, LearnedState, read_json_blob
from cloud_aggregator._ledger import AggregatorKey, model_sha256
from cloud_aggregator._ledger_writer import LedgerWriter
from cloud_aggregator._metrics import Counters, MetricsLog, MetricsServer, RoundMetrics
from cloud_aggregator._ownership import lock_state_dir
from cloud_aggregator._planner import WorkPlanner
from cloud_aggregator._privacy import CentralDP
from cloud_aggregator._recorder import PENDING_METRICS, RoundRecorder
from cloud_aggregator._registry import FleetRegistry
from cloud_aggregator._releases import OPT_BLOB, REGISTRY_EVERY_S, Releases
from cloud_aggregator._rounds import Clock, SyncRound, WallClock
from cloud_aggregator._screen import NormScreen, WeightBound
from cloud_aggregator._secure_sync import CODEC as SECURE_CODEC
from cloud_aggregator._secure_sync import SecureSyncRounds, SecureUpload
from cloud_aggregator._selection import SelectionPolicy, make_policy
from cloud_aggregator._serving import MAX_PIN_WINDOW, ModelServer
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
from cloud_aggregator._store import Store, StoreError
from cloud_aggregator._strategy import ModelState, Strategy, StrategyContext
from cloud_aggregator._sync import SyncRounds
from device_profiles import ConfigError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
POLL_S = 0.05
MAX_EARLY_MESSAGES = 10_000
MAX_EARLY_BYTES = 256 * 2**20
"""Messages (and their bodies' bytes) held while the aggregator rebuilds its round at
start-up; past either, the rest are dropped (devices send again: an update until it is
acknowledged, a hello at the next roll call)."""


class Aggregator:
    """Runs a fleet's training on ``channel`` as ``config`` says; see the module doc.

    In-process use (a simulator): build a ``Channel`` on any transport, then
    ``Aggregator(config=..., channel=...)``, ``start()``, and either ``run()`` in a
    thread or call ``tick()`` yourself. Parts may be given instead of configured:
    ``strategy`` (default: ``SyncRounds`` or ``FedBuff`` by ``config.mode``), ``policy``
    (a ``SelectionPolicy``; default from ``config.selection``), ``optimizer`` (a server
    optimizer with ``step``/``to_bytes``/``load_bytes``), ``evaluator`` (with
    ``evaluate(params)``). ``subscribe`` delivers the fleet's events. ``enrolment`` (an
    ``Enrolment``, consulted live) gives the devices' public keys instead of
    ``config.enrolment``'s file: every update must be signed by its device's key
    (``_identity``).
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
        enrolment: Enrolment | None = None,
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
        with contextlib.ExitStack() as undo:  # what was taken goes back if a step fails
            if self._tmp is not None:
                undo.callback(self._tmp.cleanup)
            self._owner = lock_state_dir(self.state_dir)  # StateDirInUse: another has it
            undo.callback(self._owner.release)
            self.store = Store(self.state_dir / "aggregator.sqlite",
                               synchronous=config.store_synchronous)
            undo.callback(self.store.close)
            self.keys = KeyBook(store=self.store, fleet=config.fleet, enrolment=enrolment,
                                path=config.enrolment,
                                trust_on_first_use=config.trust_on_first_use)
            self._init_parts(artifacts_dir, on_round, strategy, policy, optimizer, evaluator)
            undo.pop_all()  # built: kept until close()

    @classmethod
    def connect(cls, config: AggregatorConfig, *, broker: str,
                password_file: str | None = None, tls_ca: str | None = None,
                tls_cert: str | None = None, tls_key: str | None = None,
                client_id: str = "aggregator", **parts: Any) -> Aggregator:
        """An aggregator on the MQTT broker at ``broker`` (``mqtt://`` or ``mqtts://``),
        as ``fleetlearn aggregator`` connects: a persistent session, the password from
        ``password_file`` or ``$FLEETLEARN_PASSWORD``. ``parts`` are the constructor's
        (``strategy``, ``policy``, ``optimizer``, ``evaluator``, ``on_round``, ...).
        Not started: ``start()``, then ``run()``; ``close()`` also closes the connection."""
        from cloud_aggregator._connect import broker_settings

        settings = broker_settings(broker=broker, client_id=client_id,
                                   password_file=password_file, tls_ca=tls_ca,
                                   tls_cert=tls_cert, tls_key=tls_key)
        transport = settings.transport()
        aggregator = cls(config=config, channel=Channel(transport=transport, fleet=config.fleet),
                         **parts)
        aggregator._owns_transport = True
        return aggregator

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
        self.screen = NormScreen(multiple=config.screen_multiple)
        self.weights = WeightBound(multiple=config.max_weight_multiple)
        self._uplink = CodecSpec.parse(config.codec)
        self._downlink = CodecSpec.parse(config.downlink_codec)
        self.policy = policy or make_policy(config.selection, **_policy_options(config))
        use_history = getattr(self.policy, "use_history", None)
        if use_history is not None:  # the registry's record of each device, not a copy
            use_history(self.registry.history)
        if getattr(self.policy, "min_reputation", None) is None and hasattr(
                self.policy, "min_reputation"):
            self.policy.min_reputation = config.reputation_floor
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
        self.strategy: Strategy = strategy or (
            FedBuff() if config.mode == "async"
            else SecureSyncRounds() if config.secure_aggregation else SyncRounds())
        plan = config.privacy_plan()
        self.privacy = CentralDP(plan) if plan is not None else None
        if self.privacy is not None:
            if not getattr(self.strategy, "supports_privacy", False):
                raise ConfigError(
                    f"strategy {self.strategy.name} does not charge its releases to the "
                    "privacy accountant: differential privacy needs one that does "
                    "(SyncRounds or a subclass)")
            log.info("%s", plan.describe() if plan is not None else "")
        self.journal = Journal(self.store)
        self.trail = LedgerWriter(config=config, store=self.store,
                                  key=AggregatorKey.load_or_create(self.state_dir),
                                  layout=self.layout, channel=self.channel,
                                  recorder=self.recorder)
        """The training ledger's writer (``trail.contributions``: the contributions hook)."""
        log.info("training ledger key (Ed25519, public): %s", self.trail.key.public_hex)
        self.pipeline = self._default_pipeline()
        self.planner: WorkPlanner | None = None  # needs the run record: set in start()
        self._server: ModelServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._started = self._ready = self._closed = self._running = False
        self._owns_transport = False
        self.desk = DeviceDesk(
            fleet=config.fleet, channel=self.channel, clock=self.clock, store=self.store,
            registry=self.registry, counters=self.counters, events=self.events,
            recorder=self.recorder, ledger=self.ledger, journal=self.journal,
            pipeline=self.pipeline, model=self.state, strategy=self.strategy,
            uplink=SECURE_CODEC if config.secure_aggregation else self._uplink,
            planner=self._planner, server=self._model_server,
            running=lambda: self._running, commit=self._commit,
            commit_full=self._commit_full, max_children=config.max_children,
            verifiable=lambda d: self.keys.trust_on_first_use or self.keys.key_of(d) is not None)
        self.learned = LearnedState(
            config=config, store=self.store, state_dir=self.state_dir,
            content_hash=self.model.info.content_hash, model=self.state, strategy=self.strategy,
            policy=self.policy, screen=self.screen, weights=self.weights, planner=self._planner,
            privacy=self.privacy)
        self.releases = Releases(
            config=config, store=self.store, registry=self.registry, state=self.state,
            strategy=self.strategy, learned=self.learned, recorder=self.recorder,
            trail=self.trail, events=self.events, broadcast=self._broadcast_model,
            gauges=self._publish_gauges, resuming=lambda: self._resuming,
            background=lambda: self._running)
        self._early_bytes = 0
        self._early: collections.deque[tuple[Callable[[str, Message], None], str, Message]] = (
            collections.deque())
        self._failed: str | None = None
        self._finished: str | None = None
        self._last_status = time.monotonic()
        self._resuming = False
        self.last_status: str | None = None

    def _default_pipeline(self) -> IngestPipeline:
        cfg = self.config
        if isinstance(self.strategy, SecureSyncRounds):
            # The aggregator never sees a secure round's updates: nothing to decode,
            # validate, screen or weigh (docs/PROTOCOL.md section 11).
            return IngestPipeline([VerifySignature(keys=self.keys),
                                   Unpack(nonce_of=lambda r, d: self._planner().nonce(r, d)),
                                   SecureUpload(strategy=self.strategy)])
        stages: Sequence[IngestStage] = [
            VerifySignature(keys=self.keys),
            Unpack(nonce_of=lambda r, d: self._planner().nonce(r, d)),
            Decode(layout=self.layout),
            Validate(rules=UpdateRules(size=self.layout.size, max_norm=cfg.max_update_norm)),
            Screen(screen=self.screen, defers=self.strategy.defers_bootstrap,
                   model_norm=lambda: l2_norm(self.state.params)),
            BoundWeight(weights=self.weights, epochs=cfg.local_epochs,
                        batch_size=cfg.batch_size, announced=self._announced),
            ReputationWeight(reputation=lambda d: self.registry.history.get(d).reputation,
                             floor=cfg.reputation_floor),
        ]
        return IngestPipeline(stages)

    def _announced(self, device: str) -> int | None:
        info = self.registry.get(device)
        return info.num_samples if info is not None and info.hello_seen else None

    def _planner(self) -> WorkPlanner:
        if self.planner is None:
            raise AggregatorError("the aggregator is not started")
        return self.planner

    def _model_server(self) -> ModelServer:
        if self._server is None:
            raise AggregatorError("the aggregator is not started")
        return self._server

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
        """The run has ended. Read under the lock: a release in progress on a handler
        thread (the version already moved) is finished, round recorded in ``history``,
        before another thread sees it."""
        with self._lock:
            return (self.state.version >= self.config.rounds or self._failed is not None
                    or self._finished is not None)

    @property
    def finished(self) -> str | None:
        """Why the run ended before ``config.rounds`` without failing (e.g. the privacy
        budget is spent); None otherwise."""
        return self._finished

    @property
    def privacy_epsilon(self) -> float | None:
        """Epsilon spent so far at ``config.dp_delta`` (None without DP)."""
        return self.privacy.epsilon if self.privacy is not None else None

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
            if self.keys.empty:
                log.warning(
                    "no device key is enrolled and trust_on_first_use is off: every update "
                    "will be refused (unknown_device). Enrol devices (fleetlearn devices "
                    "enroll) and give the file with --enrolment")
            if self.config.metrics_port is not None:
                self._metrics_server = MetricsServer(self.counters, port=self.config.metrics_port,
                                                     host=self.config.metrics_bind)
        topics = self.channel.topics
        transport = self.channel.transport
        if isinstance(transport, MqttTransport) and transport.max_queued:
            # Everything here publishes under the lock that the handlers on the network
            # thread take: waiting for room in a bounded queue would wait for that thread
            # (a round's tasks alone can outnumber the bound). One round's messages is
            # what the queue can hold.
            transport.set_max_queued(0)
        self.channel.subscribe(topics.all_presence, self._gated(self.desk.on_presence))
        self.channel.subscribe(topics.all_up, self._gated(self.desk.on_up))
        # Our own presence: offline by the last will if this process dies, so children
        # with other parents move even while the broker stays up (edge_runtime._failover).
        if not transport.connected and not transport.set_will(aggregator_will(fleet=self.fleet)):
            log.info("this transport takes no last will: a crash of this aggregator leaves "
                     "its presence online")
        # Who is there: asked, not read from retained presence (see roll_call).
        transport.on_connect(self._connected)
        if not transport.connected:
            transport.connect()
        self._connected()
        with self._wake:
            self._broadcast_model()
            self._resuming = True
            try:
                self.strategy.resume()
            finally:
                self._resuming = False
            self._ready = True
            early, self._early = list(self._early), collections.deque()
            self._early_bytes = 0
            for handler, topic, message in early:
                handler(topic, message)
            self._publish_gauges()
            self._wake.notify_all()

    def _connected(self) -> None:
        """After each (re)connection: say we are online (a dropped connection's will said
        offline) and ask who is there."""
        self._say_presence("online")
        roll_call(self.channel)

    def _say_presence(self, status: str) -> None:
        try:
            self.channel.send(self.channel.topics.broadcast(AGGREGATOR_PRESENCE),
                              aggregator_presence(fleet=self.fleet, status=status), retain=True)
        except Exception as exc:  # a dead link: the will (or the next connection) says it
            log.warning("cannot publish the aggregator's presence (%s): %s", status, exc)

    def _gated(self, handler: Callable[[str, Message], None]) -> Callable[[str, Message], None]:
        def gate(topic: str, message: Message) -> None:
            with self._wake:
                if self._closed:
                    return
                if not self._ready:
                    size = len(message.body)
                    if (len(self._early) < MAX_EARLY_MESSAGES
                            and self._early_bytes + size <= MAX_EARLY_BYTES):
                        self._early.append((handler, topic, message))
                        self._early_bytes += size
                    else:
                        self.counters.update("dropped:starting")
                    return
                handler(topic, message)
                if self._running:
                    self._commit_due()
                self._wake.notify_all()

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
                self._commit()
                self.releases.save_unsaved()
                self.registry.flush()
                if self._started and self.channel.transport.connected:
                    self._say_presence("offline")
                    self.channel.transport.flush(timeout=5.0)
            self._closed = True
            topics = self.channel.topics
            for topic_filter in (topics.all_presence, topics.all_up) if unsubscribe else ():
                try:
                    self.channel.transport.unsubscribe(topic_filter)
                except Exception:  # a dead connection has nothing to unsubscribe
                    log.debug("unsubscribe %s failed", topic_filter, exc_info=True)
            self._let_go()
        if self._owns_transport:
            self.channel.transport.close()

    def abort(self) -> None:
        """Stop as a crash would (a simulated site failure): the connection drops without
        a DISCONNECT, ``run`` returns, nothing more is committed or checkpointed; what the
        store holds is what the next start finds (``close`` is not needed after it)."""
        self._stop.set()
        try:
            self.channel.transport.abort()
        except Exception:  # already gone
            log.debug("aborting the transport failed", exc_info=True)
        with self._wake:
            if not self._closed:
                self._closed = True
                self._let_go()
            self._wake.notify_all()

    def _let_go(self) -> None:
        """Stop the metrics endpoint, close the store, remove a temporary state dir."""
        self.releases.join_background()  # a checkpoint being written finishes first
        self.journal.close()  # a batch being written finishes first (after abort: unacked)
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        self.store.close()
        self._owner.release()
        if self._tmp is not None:
            self._tmp.cleanup()

    @property
    def condition(self) -> threading.Condition:
        """The aggregator's lock, as a condition: hold it to read or act on the strategy
        and the model between two steps (handlers and ticks wait); ``wait`` on it wakes
        at each step of ``run``. Hold it briefly: every message waits for it."""
        return self._wake

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
                if not self._closed:  # abort() writes nothing more
                    self._commit()
                    self.releases.save_unsaved()
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
            if self.done or self._closed:
                return False
            if self._running:
                self._commit_due()  # the run loop groups commits
            else:
                self._commit()
            progressed = self.strategy.tick(self.clock.now())
            self.releases.poll()
            if self.releases.checkpoint_due:
                self.releases.save_unsaved(background=self._running)
            self.registry.flush(every_s=0.0 if not self._running else REGISTRY_EVERY_S)
            self._maybe_status(progressed)
            return progressed

    def _commit_due(self) -> None:
        """The run loop's commits: settle the batch the journal's writer has made durable,
        and hand it the next one when due. The lock is not held across the write."""
        if self.journal.finish(wait=False):
            self._flushed()
        due = self.journal.wait_s()
        if due is not None and due <= 0:
            self.journal.begin(self._written)

    def _written(self) -> None:
        """On the journal's writer thread: a batch is durable; wake the run loop."""
        with self._wake:
            self._wake.notify_all()

    def _commit_full(self) -> None:
        """A handler filled the journal's batch while the run loop runs: hand it to the
        writer now, after the one it is writing (bounded memory: a handler waits for
        the write before)."""
        if self.journal.finish(wait=True):
            self._flushed()
        self.journal.begin(self._written)

    def _commit(self) -> None:
        """Commit the updates waiting in the journal (and any batch being written),
        acknowledge them, and let the strategy act on them (a FedBuff release)."""
        if self.journal.flush():
            self._flushed()

    def _flushed(self) -> None:
        if self._started and not self._closed:
            self.strategy.flushed()
            self.registry.flush(every_s=REGISTRY_EVERY_S)

    # ------------------------------------------------------------------ state

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
            send=self.desk.send, counters=self.counters, artifacts_dir=self.model.directory,
            artifacts_hash=self.model.info.content_hash, broadcasts=cfg.broadcasts_model,
            pin_window=_pin_window(cfg))
        self.strategy.bind(self._context())
        self.learned.restore()
        if self.store.checkpoint(self.fleet) is None:
            self.store.save_checkpoint(
                fleet=self.fleet, model_version=0, params=self.state.params,
                states={STATE_BLOB: self.learned.to_bytes(),
                        OPT_BLOB: self.state.optimizer.to_bytes()})
        swept, nbytes = self.store.sweep_checkpoints(self.fleet)
        if swept:
            log.warning("deleted %d checkpoint file%s (%.1f MB) that no record names: a "
                        "crash left them between a checkpoint's file and its record", swept,
                        "" if swept == 1 else "s", nbytes / 1e6)
        record, params = self.store.load_checkpoint(self.fleet)
        if params.size != self.layout.size:
            raise AggregatorError("checkpoint does not match the model's layout")
        self.state.params, self.state.version = params, record.model_version
        self.releases.model_sha = record.sha256
        opt_state = self.store.get_state(OPT_BLOB)
        if opt_state is not None:
            self.state.optimizer.load_bytes(opt_state)
        pending = read_json_blob(self.store, PENDING_METRICS)
        if pending is not None:
            self.recorder.recover(pending, model_version=self.state.version,
                                  params=self.state.params)
            self.store.delete_state(PENDING_METRICS)
        self.recorder.begin()
        log.info("fleet %s: run %s, model version %d", self.fleet, self._run.run_id,
                 self.state.version)

    def _context(self) -> StrategyContext:
        return StrategyContext(
            config=self.config, clock=self.clock, store=self.store, registry=self.registry,
            policy=self.policy, planner=self._planner(), recorder=self.recorder,
            counters=self.counters,
            layout=self.layout, model=self.state, screen=self.screen, weights=self.weights,
            send_task=self.desk.send_task, cancel=self.desk.cancel, release=self.releases.release,
            emit=self.events.emit, note=self.desk.note, fail=self._fail, ledger=self.ledger,
            queued=lambda: self.journal.pending, commit=self._commit,
            send_secagg=self.desk.send_secagg, finish=self._finish, privacy=self.privacy)

    def _finish(self, reason: str) -> None:
        self._finished = reason
        log.warning("stopping: %s", reason)

    def _fail(self, reason: str) -> None:
        self._failed = reason
        log.error("giving up: %s", reason)

    def adopt(self, params: F32, *, before_save: Callable[[], None] | None = None) -> int:
        """Make ``params`` (a model from outside: an edge tier's parent) the next model
        version, checkpointed and broadcast like any release; returns the new version.
        ``before_save`` runs under the lock just before the checkpoint, so what it
        changes in the strategy is saved in the same transaction. Refused while a round
        is open or updates wait for their commit (they train the current version)."""
        values = np.asarray(params, dtype=np.float32).reshape(-1)
        if values.size != self.layout.size or not np.isfinite(values).all():
            raise AggregatorError(f"adopted parameters must be {self.layout.size} finite "
                                  f"values, got {values.size}")
        with self._wake:
            if not self._started:
                raise AggregatorError("the aggregator is not started")
            if self.current_round is not None or self.journal.pending:
                raise AggregatorError("a model cannot be adopted while a round is open")
            self.releases.save_unsaved()
            self.state.params = values.copy()
            self.state.version += 1
            # The ledger's next entry names this model as its predecessor (a round
            # abandoned right after would otherwise cite the replaced one: LedgerError).
            self.releases.model_sha = model_sha256(self.state.params)
            if before_save is not None:
                before_save()
            self.releases.save_model()
            self._broadcast_model()
            self.events.emit(ModelReleased(model_version=self.state.version))
            self._publish_gauges()
            self._wake.notify_all()
            return self.state.version

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
        c.set("devices_online", self.registry.online_count)
        c.set("emulated_seconds_total", self.state.emulated_total_s)

    def _broadcast_model(self) -> None:
        """Publish the current model on ``broadcast/model`` (unless devices fetch the
        version their task names, ``model_push``: then a release sends nothing)."""
        assert self._server is not None
        self._server.broadcast(self.state.version, self.state.params)

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to subscribers (for strategies and stages of your own)."""
        self.events.emit(event)


DEADLINE_EXPLORATION = 0.05
"""Share of the deadline policy's slots given to devices predicted to miss it."""


def _pin_window(config: AggregatorConfig) -> int:
    """How far behind the newest a model version a task named is kept for its device to
    fetch: sync tasks name the newest; a FedBuff task older than ``max_staleness``
    versions is refused on arrival."""
    if config.mode == "sync":
        return 0
    if config.max_staleness is None:
        return MAX_PIN_WINDOW
    return min(MAX_PIN_WINDOW, config.max_staleness)


def _policy_options(config: AggregatorConfig) -> dict[str, Any]:
    """How the aggregator runs a policy: the deadline policy samples among the devices
    that fit (so every class that can make the deadline trains), explores the others a
    little, and falls back to the fastest only when fewer than a quorum fit."""
    if config.selection == "deadline":
        return {"sampling": "random", "exploration": DEADLINE_EXPLORATION,
                "min_devices": config.effective_quorum, "max_devices": config.max_selected}
    return {}




