"""The device agent: speaks docs/PROTOCOL.md over a ``Channel`` and trains with ONNX Runtime.

Threads: handlers run on the transport's network thread and only parse, decide and
queue; artifacts, model decoding, training and encoding run on the *executor*
(default: one worker thread); re-sending unacknowledged updates and noticing an
eligibility change happen in :meth:`Agent.poll`, driven by the agent's own timer
thread or, in a simulator with thousands of agents, by the simulator.

Everything heavy is injectable so that many agents can share one process: the
channel (transport), the executor, the trainer provider (a few ONNX Runtime sessions
for a whole simulated fleet), the artifact cache folder and the global-model cache.
Crash safety lives in ``_state.py``; its module docstring gives the commit order.

Why this module is long: the protocol side of a device (tasks, acks, cancels,
requests, re-sends, status) shares one lock and one job record, and splitting it would
spread that state over modules; data, state, caches, training and eligibility each
live in their own module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from broker_bridge import (
    Ack,
    BundleError,
    Cancel,
    Channel,
    CodecError,
    CodecSpec,
    Eligibility,
    ErrorFeedback,
    ErrorReport,
    Hello,
    Kind,
    Layout,
    Message,
    ModelVersion,
    MqttTransport,
    Request,
    TaskSpec,
    TlsConfig,
    UpdateMeta,
    WireError,
    ack_code,
    encode_update,
    may_retry,
    pack_update_body,
    presence_message,
    presence_will,
    read_model_message,
    unpack_bundle,
)
from device_profiles import ConfigError, DeviceProfile, FleetlearnError, predict
from device_profiles import Task as CostTask
from edge_runtime._artifact_cache import ArtifactCache, ModelCache
from edge_runtime._data import validate_for_model
from edge_runtime._eligibility import (
    DeviceStatus,
    EligibilityRules,
    StatusProbe,
    SystemProbe,
    check_eligibility,
)
from edge_runtime._errors import AgentError, ArtifactError, DataError, TrainingBackendMissing
from edge_runtime._state import (
    AgentState,
    DiskFull,
    StateError,
    Submission,
    TaskStatus,
    state_error,
)
from edge_runtime._training import Trainer, open_trainer

log = logging.getLogger(__name__)

AGENT_NAME = "fleetlearn/0.1.0"
CRASH_ENV = "FLEETLEARN_TEST_CRASH_AT"
"""Test hook: the agent SIGKILLs itself at this named point (see ``CRASH_POINTS``)."""
CRASH_POINTS = (
    "after_receive",  # the task is recorded, nothing trained
    "during_training",  # at the second mini-batch
    "before_commit",  # submission.bin written, task.json not yet 'encoded'
    "after_commit",  # committed, residual.ef not yet rolled forward
    "after_persist",  # everything persisted, nothing sent
    "after_send",  # sent, not acknowledged
)


class ModelVersionError(AgentError):
    """The task's global model version is unknown, or does not fit the artifacts."""


class _Cancelled(Exception):
    """The round was cancelled (or the agent stops): drop the work, send nothing."""


# -- local data -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class LocalData:
    """A device's own samples; ``x_eval``/``y_eval`` are held out for federated evaluation."""

    x: np.ndarray
    y: np.ndarray
    x_eval: np.ndarray | None = None
    y_eval: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @classmethod
    def split(
        cls, x: np.ndarray, y: np.ndarray, *, holdout_fraction: float = 0.0, seed: int = 0
    ) -> LocalData:
        """Hold out ``holdout_fraction`` of the samples (seeded) for evaluation."""
        if not 0.0 <= holdout_fraction < 1.0:
            raise ConfigError("holdout_fraction must be within [0, 1)")
        n_eval = int(len(y) * holdout_fraction)
        if n_eval == 0:
            return cls(x=x, y=y)
        order = np.random.default_rng(seed).permutation(len(y))
        ev, tr = np.sort(order[:n_eval]), np.sort(order[n_eval:])
        return cls(x=x[tr], y=y[tr], x_eval=x[ev], y_eval=y[ev])


# -- trainer provider -------------------------------------------------------------------


class TrainerProvider(Protocol):
    """Hands out a ``Trainer`` for some artifacts, exclusively, for one task."""

    def lease(
        self, artifacts_dir: Path, artifacts_hash: str
    ) -> contextlib.AbstractContextManager[Trainer]: ...


class TrainerPool:
    """A few ONNX Runtime sessions per artifacts hash, shared by every agent that uses it.

    One device agent needs one session; a simulator with a thousand agents on one
    machine needs as many as it trains at once (its executor's workers), not one per
    agent. A lease sets nothing: the agent loads the global weights and the learning
    rate itself. (The portable backend resets optimizer state when the global weights
    are loaded; with the onnxruntime-training backend AdamW's moments would carry from
    one lease to the next.)
    """

    def __init__(
        self, *, sessions_per_model: int = 1, intra_op_threads: int = 1, max_models: int = 2
    ) -> None:
        if sessions_per_model < 1 or max_models < 1 or intra_op_threads < 0:
            raise ConfigError("sessions_per_model and max_models must be >= 1")
        self.sessions_per_model = sessions_per_model
        self.intra_op_threads = intra_op_threads
        self.max_models = max_models
        self._cond = threading.Condition()
        self._idle: dict[str, list[Trainer]] = {}
        self._created: dict[str, int] = {}
        self._used: dict[str, float] = {}

    @contextlib.contextmanager
    def lease(self, artifacts_dir: Path, artifacts_hash: str) -> Iterator[Trainer]:
        trainer = self._take(artifacts_dir, artifacts_hash)
        try:
            yield trainer
        finally:
            with self._cond:
                self._idle.setdefault(artifacts_hash, []).append(trainer)
                self._cond.notify_all()

    def _take(self, artifacts_dir: Path, artifacts_hash: str) -> Trainer:
        with self._cond:
            while True:
                self._used[artifacts_hash] = time.monotonic()
                idle = self._idle.setdefault(artifacts_hash, [])
                if idle:
                    return idle.pop()
                if self._created.get(artifacts_hash, 0) < self.sessions_per_model:
                    self._created[artifacts_hash] = self._created.get(artifacts_hash, 0) + 1
                    break
                self._cond.wait()
            self._evict(keep=artifacts_hash)
        try:
            return open_trainer(
                artifacts_dir,
                intra_op_threads=self.intra_op_threads,
                inter_op_threads=1,
                expected_hash=artifacts_hash,
            )
        except BaseException:
            with self._cond:
                self._created[artifacts_hash] -= 1
                self._cond.notify_all()
            raise

    def _evict(self, *, keep: str) -> None:
        """Drop idle sessions of the least recently used models beyond ``max_models``."""
        models = sorted(self._created, key=lambda h: self._used.get(h, 0.0), reverse=True)
        for old in models[self.max_models :]:
            if old == keep:
                continue
            dropped = self._idle.pop(old, [])
            self._created[old] -= len(dropped)
            if self._created[old] <= 0:
                del self._created[old]


# -- emulation --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Emulation:
    """Make a fast machine report (and optionally take) the time a slower device would.

    ``emulated_s`` is the cost model's download + train + encode + upload for this
    device's profile; it goes in ``UpdateMeta.emulated_s``. With ``time_scale`` set,
    the agent also waits ``emulated_s * time_scale - actual`` before uploading, so a
    simulated fleet's arrival order follows the profiles in real time.
    """

    profile: DeviceProfile
    model: str | None = None
    """A reference model name (``mlp``, ``cnn``...) for exact FLOPs; else 6 x parameters."""
    time_scale: float | None = None

    def __post_init__(self) -> None:
        if self.time_scale is not None and not self.time_scale >= 0:
            raise ConfigError("time_scale must be >= 0")

    def emulated_s(
        self, *, task: TaskSpec, num_parameters: int, samples: int, steps: int, update_bytes: int
    ) -> float:
        flops = None if self.model is not None else 6.0 * num_parameters
        cost = CostTask(
            model_bytes=4 * num_parameters,
            update_bytes=update_bytes,
            dense_update_bytes=4 * num_parameters,
            n_samples=max(samples, 1),
            batch_size=task.batch_size,
            train_flops_per_sample=flops,
            model=self.model,
            max_steps=max(steps, 1),
        )
        return float(predict(self.profile, cost).total_s)

    def wait_s(self, emulated_s: float, actual_s: float) -> float:
        if self.time_scale is None:
            return 0.0
        return max(0.0, emulated_s * self.time_scale - actual_s)


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """Timing knobs of the protocol side (all seconds)."""

    ack_timeout_s: float = 30.0
    """Re-send an unacknowledged update (same bytes, same attempt) after this long."""
    max_resends: int = 20
    request_timeout_s: float = 60.0
    """How long to wait for requested artifacts or a model (never past the deadline)."""
    deadline_margin_s: float = 0.2
    """Budget kept back from ``deadline_s`` for encoding and sending."""
    poll_interval_s: float = 0.5
    eligibility_interval_s: float = 30.0
    status_interval_s: float | None = 15.0
    """Say what the agent waits for (``Agent.status_line``) this often while it waits;
    None: never (a simulator with thousands of agents)."""
    crash_at: str | None = None
    """Test hook (``FLEETLEARN_TEST_CRASH_AT``): SIGKILL this process at that point."""

    def __post_init__(self) -> None:
        for name in ("ack_timeout_s", "request_timeout_s", "poll_interval_s",
                     "eligibility_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.status_interval_s is not None and not self.status_interval_s > 0:
            raise ConfigError("status_interval_s must be positive (or None)")
        if self.deadline_margin_s < 0 or self.max_resends < 0:
            raise ConfigError("deadline_margin_s and max_resends must be >= 0")
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ConfigError(f"crash point {self.crash_at!r} is not one of {CRASH_POINTS}")


@dataclass
class _Job:
    task: TaskSpec
    attempt: int
    received_at: float
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Pending:
    submission: Submission
    sent_at: float = 0.0
    sends: int = 0


@dataclass
class AgentStats:
    """Counters for tests, benchmarks and logs."""

    tasks: int = 0
    declined: int = 0
    updates_sent: int = 0
    resends: int = 0
    acked: int = 0
    cancelled: int = 0
    withdrawn: int = 0
    errors: int = 0
    malformed: int = 0
    last_train_s: float = 0.0
    last_samples: int = 0


_ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (DiskFull, "disk_full"),
    (ArtifactError, "artifact"),
    (DataError, "data"),
    (ModelVersionError, "model_version"),
    (TrainingBackendMissing, "backend"),
)


class _DeviceLog(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['device'] if self.extra else '?'}] {msg}", kwargs


class Agent:
    """One device: answers tasks with trained, encoded updates; survives crashes and bad input."""

    def __init__(
        self,
        *,
        device_id: str,
        channel: Channel,
        data: LocalData,
        state_dir: str | os.PathLike[str],
        profile: DeviceProfile | None = None,
        rules: EligibilityRules | None = None,
        status_probe: StatusProbe | None = None,
        executor: Executor | None = None,
        trainers: TrainerProvider | None = None,
        artifacts: ArtifactCache | None = None,
        models: ModelCache | None = None,
        emulation: Emulation | None = None,
        tamper: Callable[[np.ndarray], np.ndarray] | None = None,
        tamper_meta: Callable[[UpdateMeta], UpdateMeta] | None = None,
        tamper_hello: Callable[[Hello], Hello] | None = None,
        settings: AgentSettings | None = None,
        owns_transport: bool = False,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.channel = channel
        self.fleet = channel.fleet
        self.topics = channel.topics
        self.topics.device(device_id)  # validates the id
        self.data = data
        self.profile = profile
        self.rules = rules or EligibilityRules()
        self.settings = settings or AgentSettings()
        self._probe: StatusProbe = status_probe or SystemProbe()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"agent-{device_id}"
        )
        self._trainers: TrainerProvider = trainers or TrainerPool()
        self._state_dir = Path(state_dir)
        self.artifacts = artifacts or ArtifactCache(root=self._state_dir / "artifacts")
        self.models = models or ModelCache()
        self.emulation = emulation
        # Simulation only: a Byzantine device's transformation of its true update and
        # of what it says about it (robust-aggregation experiments). Production agents
        # never set them.
        self._tamper = tamper
        self._tamper_meta = tamper_meta
        self._tamper_hello = tamper_hello
        self._on_status = on_status
        self._owns_transport = owns_transport
        self.log = _DeviceLog(log, {"device": device_id})
        self.state = AgentState(directory=self._state_dir, crash_hook=self._crash)
        self.stats = AgentStats()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._job: _Job | None = None
        self._pending: _Pending | None = None
        self._bundles: deque[bytes] = deque(maxlen=2)
        self._inbox_seq = 0
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._last_eligible: bool | None = None
        self._last_eligibility_check = 0.0
        self._started = False
        self._waiting_for: str | None = None
        self._idle_since = time.monotonic()
        self._last_status = time.monotonic()
        self.last_status: str | None = None
        self._resume()

    # -- life cycle --------------------------------------------------------------------

    def _resume(self) -> None:
        """Pick up what the state folder says: re-send a committed update, announce a task."""
        record = self.state.record
        submission = self.state.submission
        if record is not None and record.status == TaskStatus.ENCODED and submission is not None:
            self._pending = _Pending(submission=submission)
            self.log.info("resuming: round %d update not acknowledged, will re-send",
                          record.task.round)
        elif record is not None and record.status.in_progress:
            self.log.info("resuming: round %d was in progress; announcing it", record.task.round)

    def start(self, *, timer: bool = True, connect_timeout: float = 30.0) -> None:
        """Subscribe, connect (unless already connected) and greet the aggregator.

        ``timer=False`` leaves :meth:`poll` (re-sends, eligibility changes) to the caller.
        """
        if self._started:
            return
        self._started = True
        self.channel.subscribe(self.topics.device_down(self.device_id), self._on_message)
        self.channel.subscribe(self.topics.all_broadcast, self._on_message)
        if timer:
            self._timer = threading.Thread(
                target=self._run_timer, name=f"agent-timer-{self.device_id}", daemon=True
            )
            self._timer.start()
        transport = self.channel.transport
        transport.on_connect(self._on_connected)
        if transport.connected:
            self._on_connected()
        else:
            transport.connect(timeout=connect_timeout)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Cancel work in progress, say ``offline``, and release what this agent owns."""
        self._stop.set()
        with self._lock:
            if self._job is not None:
                self._job.cancel.set()
            self._cond.notify_all()
        if self._timer is not None:
            self._timer.join(timeout=timeout)
            self._timer = None
        if self._own_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self.channel.transport.connected:
            with contextlib.suppress(FleetlearnError):
                self._send_presence("offline")
                self.channel.transport.flush(timeout=2.0)
        if self._owns_transport:
            self.channel.transport.close()

    def _run_timer(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.poll()
            except Exception:
                self.log.exception("poll failed")

    def poll(self, now: float | None = None) -> None:
        """Periodic work: re-send an unacknowledged update, re-announce on eligibility changes."""
        now = time.monotonic() if now is None else now
        resend: Submission | None = None
        with self._lock:
            p = self._pending
            if p is not None and p.sends > 0 and now - p.sent_at >= self.settings.ack_timeout_s:
                if p.sends > self.settings.max_resends:
                    self.log.warning("round %d: no ack after %d sends; giving up until restart",
                                     p.submission.round, p.sends)
                    self._pending = None
                else:
                    resend = p.submission
        if resend is not None and self.channel.transport.connected:
            self.stats.resends += 1
            self.log.info("round %d: no ack yet, re-sending attempt %d",
                          resend.round, resend.attempt)
            self._send_submission(resend)
        if now - self._last_eligibility_check >= self.settings.eligibility_interval_s:
            self._last_eligibility_check = now
            eligible = self._eligibility().eligible
            if self._last_eligible is not None and eligible != self._last_eligible:
                self._send_hello()
        interval = self.settings.status_interval_s
        if interval is not None and now - self._last_status >= interval:
            self._last_status = now
            line = self.status_line(now)
            self.last_status = line
            if self._on_status is not None:
                self._on_status(line)
            else:
                self.log.info("%s", line)

    def status_line(self, now: float | None = None) -> str:
        """What this agent is doing or waiting for, in one line."""
        now = time.monotonic() if now is None else now
        transport = self.channel.transport
        if not transport.connected:
            error = getattr(transport, "last_error", None)
            where = getattr(transport, "url", None)
            return (f"waiting for the broker{f' at {where}' if where else ''}"
                    f"{f': {error}' if error else ''}")
        with self._lock:
            job, pending, waiting = self._job, self._pending, self._waiting_for
        if job is not None:
            if waiting is not None:
                return f"round {job.task.round}: waiting for {waiting}"
            return f"round {job.task.round}: training"
        if pending is not None and pending.sends > 0:
            return (f"round {pending.submission.round}: update sent {pending.sends} times; "
                    "waiting for the aggregator to acknowledge it")
        return (f"waiting for a task from the aggregator of fleet {self.fleet!r} (connected as "
                f"{self.device_id}, no task for {now - self._idle_since:.0f} s); the "
                f"aggregator must run with --fleet {self.fleet}")

    # -- wire helpers ------------------------------------------------------------------

    def _send(self, kind: str, message: Message) -> None:
        self.channel.send(self.topics.up(self.device_id, kind), message)

    def _send_presence(self, status: str) -> None:
        self.channel.send(
            self.topics.presence(self.device_id),
            presence_message(fleet=self.fleet, device=self.device_id, status=status),
            retain=True,
        )

    def _eligibility(self) -> Eligibility:
        try:
            status = self._probe()
        except Exception:
            self.log.exception("eligibility probe failed; assuming eligible")
            status = DeviceStatus()
        result = check_eligibility(status, self.rules)
        self._last_eligible = result.eligible
        return result

    def data_problem(self) -> str | None:
        """Why the local data cannot train the model of the last task this device took,
        if it cannot (labels outside its classes); said at start-up, before any task."""
        record = self.state.record
        classes = record.task.num_classes if record is not None else None
        y = self.data.y
        if classes is None or not len(y) or not np.issubdtype(y.dtype, np.integer):
            return None
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            return f"class labels range over [{low}, {high}]; the model has {classes} classes"
        return None

    def busy_round(self) -> int | None:
        """The round this device is working on (or was, before a restart), if any."""
        with self._lock:
            if self._job is not None:
                return self._job.task.round
        record = self.state.record
        if record is not None and record.status.in_progress:
            return record.task.round
        return None

    def hello(self) -> Hello:
        """What this device says about itself after each connect."""
        record = self.state.record
        cached = self.artifacts.hashes()
        artifacts_hash = None
        if record is not None and record.task.artifacts_hash in cached:
            artifacts_hash = record.task.artifacts_hash
        elif cached:
            artifacts_hash = cached[0]
        hello = Hello(
            agent=AGENT_NAME,
            profile=self.profile.to_dict() if self.profile is not None else {},
            eligibility=self._eligibility().to_dict(),
            num_samples=self.data.num_samples,
            artifacts_hash=artifacts_hash,
            model_versions=self.models.versions(),
            busy_round=self.busy_round(),
        )
        return self._tamper_hello(hello) if self._tamper_hello is not None else hello

    def _send_hello(self) -> None:
        self._send("hello", self.hello().to_message(fleet=self.fleet, device=self.device_id))

    def _greet(self) -> None:
        self._send_presence("online")
        self._send_hello()

    def _on_connected(self) -> None:
        try:
            self._greet()
            with self._lock:
                pending = self._pending.submission if self._pending is not None else None
            if pending is not None:
                self._send_submission(pending)
        except Exception:
            self.log.exception("greeting the aggregator failed")

    def _ack_task(self, round_: int, attempt: int, status: str, reason: str = "") -> None:
        ack = Ack(round=round_, attempt=attempt, what="task", status=status, reason=reason)
        self._send("ack", ack.to_message(fleet=self.fleet, device=self.device_id, round=round_,
                                          attempt=attempt))

    def _report(self, round_: int | None, code: str, message: str) -> None:
        self.stats.errors += 1
        report = ErrorReport(round=round_, code=code, message=message[:2000])
        try:
            self._send("error", report.to_message(fleet=self.fleet, device=self.device_id,
                                                  round=round_ or 0))
        except FleetlearnError:
            self.log.exception("could not send error report")

    def _send_submission(self, submission: Submission) -> None:
        message = Message(
            kind=Kind.UPDATE, fleet=self.fleet, device=self.device_id, round=submission.round,
            model_version=submission.model_version, attempt=submission.attempt,
            codec=submission.codec, body=submission.body,
        )
        with self._lock:
            if self._pending is None or self._pending.submission is not submission:
                self._pending = _Pending(submission=submission)
            self._pending.sends += 1
            self._pending.sent_at = time.monotonic()
        self._send("update", message)
        self.stats.updates_sent += 1

    # -- inbound (network thread: parse, decide, queue; never raise) -------------------

    def _on_message(self, topic: str, message: Message) -> None:
        try:
            kind = message.kind
            if kind == Kind.TASK:
                self._on_task(message)
            elif kind == Kind.CANCEL:
                self._on_cancel(Cancel.from_message(message))
            elif kind == Kind.ACK:
                self._on_ack(Ack.from_message(message))
            elif kind == Kind.MODEL:
                meta, body = read_model_message(message)
                if self.models.offer(meta, body):
                    self.log.debug("model version %d of run %s received", meta.model_version,
                                   meta.run)
                self._notify()
            elif kind == Kind.ARTIFACTS:
                with self._lock:
                    self._bundles.append(message.body)
                self._notify()
            elif kind == Kind.CONTROL and Request.from_message(message).want == "hello":
                self._greet()  # the aggregator's roll call
            else:
                self.log.debug("ignoring %s message on %s", kind.topic_name, topic)
        except (WireError, ConfigError) as exc:
            self.stats.malformed += 1
            self.log.warning("dropped malformed %s message on %s: %s",
                             message.kind.topic_name, topic, exc)
        except Exception:
            self.stats.malformed += 1
            self.log.exception("handler failed for a message on %s", topic)

    def _on_task(self, message: Message) -> None:
        received_at = self._idle_since = time.monotonic()
        task = TaskSpec.from_message(message)
        if message.round != task.round or message.model_version != task.model_version:
            raise WireError("task envelope round/model_version differ from its body")
        try:
            CodecSpec.parse(task.codec)
        except ConfigError as exc:
            self.stats.declined += 1
            self._ack_task(task.round, 0, "declined", f"unsupported codec: {exc}")
            return
        if len(task.artifacts_hash) != 64:
            raise WireError(f"task artifacts_hash {task.artifacts_hash!r} is not a sha256 hex")
        with self._lock:
            record = self.state.record
            # A task is known by its round and nonce (a fresh aggregator counts rounds
            # from 1 again, with new nonces): the same task again is answered, never
            # trained twice; an older round of the same run is not trained at all.
            same = record is not None and same_task(record.task, task)
            attempt = record.attempt if same and record is not None else 0
            if record is not None and not same and moved_past(record.task, task):
                self.stats.declined += 1
                self._ack_task(task.round, 0, "declined",
                               f"stale: this device has moved on to round {record.task.round}")
                return
            if self._job is not None:
                if same_task(self._job.task, task):
                    self._ack_task(task.round, self._job.attempt, "accepted")  # a re-sent task
                else:
                    self.stats.declined += 1
                    self._ack_task(task.round, 0, "declined",
                                   f"busy with round {self._job.task.round}")
                return
            if same and record is not None and record.status.submitted:
                if record.status == TaskStatus.REJECTED:
                    attempt = record.attempt + 1
                else:
                    # Already submitted: re-send those bytes, never train again.
                    self._ack_task(task.round, record.attempt, "accepted")
                    submission = self.state.submission
                    if submission is not None and record.status == TaskStatus.ENCODED:
                        self._send_submission(submission)
                    return
            eligibility = self._eligibility()
            if not eligibility.eligible:
                self.stats.declined += 1
                self._ack_task(task.round, attempt, "declined",
                               "ineligible: " + "; ".join(eligibility.reasons))
                return
            job = _Job(task=task, attempt=attempt, received_at=received_at)
            self._job = job
            self.stats.tasks += 1
        self._ack_task(task.round, attempt, "accepted")
        try:
            self._executor.submit(self._run_job, job)
        except RuntimeError:  # executor shut down: the agent is stopping
            with self._lock:
                self._job = None

    def _on_cancel(self, cancel: Cancel) -> None:
        with self._lock:
            if self._job is not None and self._job.task.round == cancel.round:
                self.log.info("round %d cancelled: %s", cancel.round, cancel.reason)
                self._job.cancel.set()
                self._notify()
            if self._pending is not None and self._pending.submission.round == cancel.round:
                self._pending = None  # the round closed: re-sending is pointless
            record = self.state.record
            if (self._job is None and record is not None and record.task.round == cancel.round
                    and record.status.in_progress):
                self.state.set_status(TaskStatus.CANCELLED)

    def _on_ack(self, ack: Ack) -> None:
        if ack.what != "update":
            return
        with self._lock:
            record = self.state.record
            if record is None or record.task.round != ack.round or record.attempt != ack.attempt:
                return
            if record.status != TaskStatus.ENCODED:
                return
            if ack.status in ("accepted", "duplicate"):
                self.state.set_status(TaskStatus.ACKED)
                self.stats.acked += 1
            elif ack.status == "rejected":
                # Not counted. The reference encoder is deterministic (a corrected attempt
                # would be the same bytes), so this agent does not retry on its own; it
                # trains again (attempt + 1) only if the task is sent again.
                self.log.warning("round %d update rejected (%s): %s", ack.round,
                                 "a corrected update may still count"
                                 if may_retry(ack_code(ack)) else "final for this round",
                                 ack.reason)
                self.state.set_status(TaskStatus.REJECTED)
            else:
                return
            if self._pending is not None and self._pending.submission.round == ack.round:
                self._pending = None

    # -- the work (executor thread) ----------------------------------------------------

    def _crash(self, point: str) -> None:
        if self.settings.crash_at == point:
            self.log.warning("test hook %s=%s: killing this process", CRASH_ENV, point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def _run_job(self, job: _Job) -> None:
        round_ = job.task.round
        try:
            self._do_task(job)
        except _Cancelled:
            self.stats.cancelled += 1
            self._set_status_quietly(TaskStatus.CANCELLED)
        except Exception as exc:
            code = next((c for t, c in _ERROR_CODES if isinstance(exc, t)), "internal")
            if code == "internal" and not isinstance(exc, FleetlearnError):
                self.log.exception("round %d failed", round_)
            else:
                self.log.error("round %d failed (%s): %s", round_, code, exc)
            self._set_status_quietly(TaskStatus.FAILED)
            self._report(round_, code, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                if self._job is job:
                    self._job = None
                    self._waiting_for = None
                    self._idle_since = time.monotonic()

    def _set_status_quietly(self, status: TaskStatus) -> None:
        try:
            record = self.state.record
            if record is not None and not record.status.submitted:
                self.state.set_status(status)
        except StateError as exc:
            self.log.error("could not record status %s: %s", status, exc)

    def _remaining(self, job: _Job) -> float:
        return job.task.deadline_s - (time.monotonic() - job.received_at)

    def _wait(self, job: _Job, ready: Callable[[], Any], *, what: str) -> Any:
        """Wait (on the executor) until ``ready()`` returns something, bounded by the deadline.

        ``ready`` runs without the agent's lock (it may decode a model); ``_inbox_seq``
        tells whether anything arrived meanwhile, so no notification is missed. ``what``
        is said by the status line meanwhile.
        """
        limit = min(self.settings.request_timeout_s, self._remaining(job))
        end = time.monotonic() + max(limit, 0.0)
        with self._lock:
            self._waiting_for = what
        try:
            return self._wait_loop(job, ready, end)
        finally:
            with self._lock:
                self._waiting_for = None

    def _wait_loop(self, job: _Job, ready: Callable[[], Any], end: float) -> Any:
        while True:
            if job.cancel.is_set() or self._stop.is_set():
                raise _Cancelled
            with self._lock:
                seen = self._inbox_seq
            value = ready()
            if value is not None:
                return value
            left = end - time.monotonic()
            if left <= 0:
                return None
            with self._lock:
                if self._inbox_seq == seen and not job.cancel.is_set():
                    self._cond.wait(min(left, 0.5))

    def _notify(self) -> None:
        with self._lock:
            self._inbox_seq += 1
            self._cond.notify_all()

    def _do_task(self, job: _Job) -> None:
        task = job.task
        self.state.begin(task, attempt=job.attempt)
        self._crash("after_receive")
        directory = self._ensure_artifacts(job)
        with self._trainers.lease(directory, task.artifacts_hash) as trainer:
            layout = Layout(tensors=trainer.parameter_shapes())
            base = self._ensure_model(job, layout)
            self._check_data(trainer, task)
            self.state.set_status(TaskStatus.TRAINING)
            if job.cancel.is_set():
                raise _Cancelled
            eval_loss = eval_acc = None
            eval_samples = 0
            trainer.set_parameters(base.weights)
            if task.evaluate and self.data.x_eval is not None and self.data.y_eval is not None:
                # Federated evaluation of the global model on local held-out data.
                result_eval = trainer.evaluate(self.data.x_eval, self.data.y_eval)
                eval_loss, eval_acc = _finite(result_eval.loss), _finite(result_eval.accuracy)
                eval_samples = len(self.data.y_eval)
            budget = self._remaining(job) - self.settings.deadline_margin_s
            calls = [0]

            def should_stop() -> bool:
                calls[0] += 1
                if calls[0] == 2:
                    self._crash("during_training")
                return job.cancel.is_set() or self._stop.is_set()

            started = time.monotonic()
            if budget > 0:
                try:
                    result = trainer.train(
                        self.data.x, self.data.y, epochs=task.epochs, batch_size=task.batch_size,
                        lr=task.lr, seed=task.seed, deadline_s=budget, should_stop=should_stop,
                        max_steps=task.max_steps,
                    )
                except (ValueError, RuntimeError) as exc:
                    raise DataError(f"training failed on local data: {exc}") from exc
                samples, steps, loss = result.samples_seen, result.steps, result.mean_loss
                stopped_early = result.stopped_early
                trained = trainer.get_parameters()
            else:
                samples = steps = 0
                loss, stopped_early, trained = math.nan, True, base.weights
            train_s = time.monotonic() - started
        self.stats.last_train_s, self.stats.last_samples = train_s, samples
        if job.cancel.is_set() or self._stop.is_set():
            raise _Cancelled
        if samples == 0:
            self.stats.withdrawn += 1
            self._set_status_quietly(TaskStatus.DECLINED)
            self._ack_task(task.round, job.attempt, "declined", "deadline")
            return
        submission, emulated = self._encode(job, layout, base, trained, UpdateMeta(
            num_samples=samples, steps=steps, nonce=task.nonce, train_loss=_finite(loss) or 0.0,
            duration_s=round(train_s, 6), stopped_early=stopped_early,
            eval_loss=eval_loss, eval_accuracy=eval_acc, eval_samples=eval_samples,
        ))
        if self.emulation is not None and self.emulation.time_scale is not None:
            actual = time.monotonic() - job.received_at
            wait = self.emulation.wait_s(emulated, actual)
            if wait > 0 and job.cancel.wait(wait):
                raise _Cancelled
        if job.cancel.is_set():
            raise _Cancelled
        self.state.commit(submission)
        self._crash("after_persist")
        self._send_submission(submission)
        if self.settings.crash_at == "after_send":
            self.channel.transport.flush(timeout=5.0)  # test hook: make sure it left
        self._crash("after_send")
        self.log.info("round %d: sent update (%d samples, %d steps, %d bytes)", task.round,
                      samples, steps, len(submission.body))

    def _check_data(self, trainer: Trainer, task: TaskSpec) -> None:
        shape = trainer.input_shape
        if shape is not None:
            validate_for_model(self.data.x, self.data.y, shape, num_classes=task.num_classes)
        elif len(self.data.y) == 0:
            raise DataError("no local samples")
        elif task.num_classes is not None and np.issubdtype(self.data.y.dtype, np.integer):
            low, high = int(self.data.y.min()), int(self.data.y.max())
            if low < 0 or high >= task.num_classes:
                raise DataError(f"class labels range over [{low}, {high}]; the model has "
                                f"{task.num_classes} classes")

    def _encode(
        self, job: _Job, layout: Layout, base: ModelVersion, trained: np.ndarray, meta: UpdateMeta
    ) -> tuple[Submission, float]:
        task = job.task
        spec = CodecSpec.parse(task.codec)
        feedback: ErrorFeedback | None = None
        if spec.error_feedback:
            raw = self.state.residual()
            if raw is not None:
                try:
                    feedback = ErrorFeedback.from_bytes(raw, layout)
                except CodecError as exc:
                    self.log.warning("residual does not fit this model (%s); starting at zero",
                                     exc)
        delta = np.asarray(trained, np.float32) - base.weights
        if self._tamper is not None:
            delta = np.asarray(self._tamper(delta), np.float32)
        if self._tamper_meta is not None:
            meta = self._tamper_meta(meta)
        encoded = encode_update(delta, layout, spec, feedback=feedback, rng=task.seed)
        emulated = 0.0
        if self.emulation is not None:
            emulated = self.emulation.emulated_s(
                task=task, num_parameters=layout.size, samples=meta.num_samples,
                steps=meta.steps, update_bytes=len(encoded.body),
            )
            meta = UpdateMeta(**{**meta.to_dict(), "emulated_s": round(emulated, 6)})
        submission = Submission(
            round=task.round, attempt=job.attempt, model_version=task.model_version,
            codec=str(spec), body=pack_update_body(meta, encoded.body),
            residual=encoded.feedback.to_bytes() if encoded.feedback is not None else None,
        )
        return submission, emulated

    def _ensure_artifacts(self, job: _Job) -> Path:
        wanted = job.task.artifacts_hash
        cached = self.artifacts.path(wanted)
        if cached is not None:
            return cached
        with self._lock:
            self._bundles.clear()
        request = Request(want="artifacts", artifacts_hash=wanted)
        self._send("request", request.to_message(fleet=self.fleet, device=self.device_id,
                                                 round=job.task.round))

        def ready() -> Path | bytes | None:
            path = self.artifacts.path(wanted)  # another agent sharing the cache got it
            if path is not None:
                return path
            return self._bundles.popleft() if self._bundles else None

        got = self._wait(job, ready, what=f"training artifacts {wanted[:12]}... (requested "
                                          "from the aggregator)")
        if got is None:
            raise ArtifactError(f"no artifacts {wanted[:16]}... received in time")
        if isinstance(got, Path):
            return got
        try:
            files = unpack_bundle(got)
        except BundleError as exc:
            raise ArtifactError(f"artifact bundle for {wanted[:16]}... is unusable: {exc}") from exc
        try:
            return self.artifacts.install(files, expected_hash=wanted)
        except OSError as exc:
            raise state_error("cannot write artifacts", exc) from exc

    def _ensure_model(self, job: _Job, layout: Layout) -> ModelVersion:
        """The global weights the task names by hash (requested when not held)."""
        version, wanted = job.task.model_version, job.task.model_hash

        def ready() -> ModelVersion | None:
            try:
                return self.models.get(wanted, layout)
            except WireError as exc:
                raise ModelVersionError(
                    f"global model version {version} does not fit the task's artifacts: {exc}"
                ) from exc

        model: ModelVersion | None = ready()
        if model is None:
            request = Request(want="model", model_version=version, model_hash=wanted,
                              artifacts_hash=job.task.artifacts_hash,
                              have_versions=self.models.versions())
            self._send("request", request.to_message(fleet=self.fleet, device=self.device_id,
                                                     round=job.task.round,
                                                     model_version=version))
            model = self._wait(job, ready, what=f"global model version {version} "
                                                f"({wanted[:12]}...) from the aggregator")
        if model is None:
            raise ModelVersionError(f"global model version {version} ({wanted[:12]}...) is "
                                    "unknown to this device and was not received in time")
        if model.weights.shape != (layout.size,):
            raise ModelVersionError(f"model version {version} has the wrong size")
        return model


def same_task(a: TaskSpec, b: TaskSpec) -> bool:
    """Two copies of one task (a task sent again carries the same round and nonce)."""
    return a.round == b.round and a.nonce == b.nonce


def moved_past(held: TaskSpec, new: TaskSpec) -> bool:
    """``new`` is an older round of the run this device already worked for."""
    return bool(held.run) and held.run == new.run and new.round < held.round


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def make_agent_transport(
    url: str,
    *,
    fleet: str,
    device_id: str,
    password: str | None = None,
    username: str | None = None,
    tls: TlsConfig | None = None,
    **kwargs: Any,
) -> MqttTransport:
    """The MQTT transport of a device: client id and user name = device id, persistent
    session, and the ``offline`` presence as its last will."""
    return MqttTransport(
        url=url,
        client_id=device_id,
        username=username if username is not None else device_id,
        password=password,
        tls=tls,
        will=presence_will(fleet=fleet, device=device_id),
        clean_session=False,
        **kwargs,
    )
