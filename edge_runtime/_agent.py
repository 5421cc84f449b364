"""The device agent: a protocol state machine (``_phase``) that wires its parts together.

The parts, each in its own module: the inbox (``_inbox``: receiving, hand-off of models
and artifact bundles, task dedupe), the fetcher (``_fetch``: artifacts and global
models), the trainer pool (``_trainer_pool``), local training as a replaceable callable
(``_local_training``), the outbox (``_outbox``: durable commit, sending and re-sending
until acknowledged), emulation of a device profile (``_emulation``), crash-safe state
(``_state``; its docstring gives the commit order) and typed hooks (``_hooks``; its
docstring gives the order they run in and what each may change).

Threads: the inbox runs on the transport's network thread and only parses, decides and
queues; fetching, training and encoding run on the *executor* (default: one worker
thread); re-sending unacknowledged updates and noticing an eligibility change happen in
:meth:`Agent.poll`, driven by the agent's own timer thread or, in a simulator with
thousands of agents, by the simulator. Everything heavy is injectable so that many
agents can share one process: the channel, the executor, the trainer provider, the
artifact cache and the global-model cache.

Why this module is a little over 400 lines: the ``Agent`` class owns the one lock under
which the phase, the task in hand and the outbox change together; its handlers are the
state machine's edges and stay side by side so each move can be read against the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker_bridge import (
    Ack,
    Cancel,
    Channel,
    ErrorReport,
    Hello,
    Message,
    Request,
    TaskSpec,
)
from device_profiles import DeviceProfile, FleetlearnError
from edge_runtime._artifact_cache import ArtifactCache, ModelCache
from edge_runtime._data import LocalData
from edge_runtime._eligibility import EligibilityRules, StatusProbe, SystemProbe
from edge_runtime._emulation import Emulation
from edge_runtime._fetch import Fetcher
from edge_runtime._hooks import AgentHooks, ask_on_task, notify
from edge_runtime._identity import DeviceKey, state_key_path
from edge_runtime._inbox import Inbox, InboxHandlers, admit, read_task
from edge_runtime._ledger_check import LedgerCheck
from edge_runtime._local_training import LocalTraining, labels_problem, train_locally
from edge_runtime._outbox import Outbox
from edge_runtime._phase import Phase, PhaseMachine
from edge_runtime._presence import Presence
from edge_runtime._presence import make_agent_transport as make_agent_transport
from edge_runtime._secure import SecureSession
from edge_runtime._settings import AgentSettings, AgentStats
from edge_runtime._state import AgentState, CommitStep, TaskStatus, lock_state_folder
from edge_runtime._trainer_pool import TrainerPool, TrainerProvider
from edge_runtime._work import Control, Job, Worker

log = logging.getLogger(__name__)

_WORKING = frozenset(phase for phase in Phase if phase.working)


class _DeviceLog(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['device'] if self.extra else '?'}] {msg}", kwargs


class Agent:
    """One device: answers tasks with trained, encoded updates; survives crashes and bad input.

    ``hooks`` (``AgentHooks``) and ``training`` (a ``LocalTraining`` callable, default
    ``train_locally``) are how a library user changes what the device does without
    touching the protocol. ``key`` is the device's signing key (``DeviceKey``); by
    default the one in the state folder, made there at the first start.
    """

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
        hooks: AgentHooks | None = None,
        training: LocalTraining | None = None,
        settings: AgentSettings | None = None,
        owns_transport: bool = False,
        on_status: Callable[[str], None] | None = None,
        key: DeviceKey | None = None,
        lock_state: bool = True,
    ) -> None:
        state_path = Path(state_dir)
        self._state_lock = lock_state_folder(state_path) if lock_state else None
        """Held until ``stop`` or ``abort`` (``lock_state=False``: the caller owns the folder,
        as the simulator owns its fleet's)."""
        self.device_id = device_id
        self.channel = channel
        self.fleet = channel.fleet
        self.topics = channel.topics
        self.topics.device(device_id)  # validates the id
        self.data = data
        self.profile = profile
        self.rules = rules or EligibilityRules()
        self.settings = settings or AgentSettings()
        self._hooks = hooks or AgentHooks()
        self._training: LocalTraining = training or train_locally
        self.emulation = emulation
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"agent-{device_id}"
        )
        self._trainers: TrainerProvider = trainers or TrainerPool()
        self.key = key or DeviceKey.load_or_create(state_key_path(state_path))
        """The device's Ed25519 key (``_identity``): made at the first start in the state
        folder; every update is signed with it."""
        self.artifacts = artifacts or ArtifactCache(root=state_path / "artifacts")
        self.models = models or ModelCache()
        self._on_status = on_status
        self._owns_transport = owns_transport
        self.log = _DeviceLog(log, {"device": device_id})
        self.state = AgentState(directory=state_path, on_step=self._commit_step)
        self.stats = AgentStats()
        self._lock = threading.RLock()
        self._job: Job | None = None
        self._stop = threading.Event()
        self._aborted = False
        self._timer: threading.Thread | None = None
        self._last_eligibility_check = 0.0
        self._started = False
        self._idle_since = self._last_status = time.monotonic()
        self._presence = Presence(
            channel=channel, device_id=device_id, profile=profile, data=data, rules=self.rules,
            probe=status_probe or SystemProbe(), artifacts=self.artifacts, models=self.models,
            state=self.state, hooks=self._hooks, busy_round=self.busy_round, log=self.log)
        self._secure = SecureSession(fleet=self.fleet, device=device_id,
                                     publish=lambda m: self._send("secagg", m),
                                     notify=lambda: self._inbox.notify(), log=self.log)
        self.ledger = LedgerCheck(fleet=self.fleet, device_id=device_id,
                                  public_key=self.settings.ledger_public_key, hooks=self._hooks,
                                  log=self.log)
        self._inbox = Inbox(models=self.models, log=self.log, handlers=InboxHandlers(
            task=self._on_task, cancel=self._on_cancel, ack=self._on_ack,
            roll_call=self._presence.greet, malformed=self._count_malformed,
            secagg=self._secure.handle, proof=self.ledger.on_proof))
        self._fetcher = Fetcher(inbox=self._inbox, artifacts=self.artifacts, models=self.models,
                                request=self._send_request)
        self._outbox = Outbox(
            state=self.state, publish=lambda m: self._send("update", m), fleet=self.fleet,
            device=device_id, settings=self.settings, stats=self.stats, hooks=self._hooks,
            lock=self._lock, log=self.log, sign=self.key.sign_update)
        self._worker = Worker(
            control=Control(enter=self._enter, end=self._end_job, aborted=lambda: self._aborted,
                            stopping=self._stop.is_set, ack_task=self._ack_task,
                            report=self._report),
            state=self.state, fetcher=self._fetcher, trainers=self._trainers,
            outbox=self._outbox, data=data, training=self._training, hooks=self._hooks,
            emulation=emulation, settings=self.settings, stats=self.stats, log=self.log,
            secure=self._secure, inbox=self._inbox)
        self._phase = PhaseMachine(Phase.IDLE)
        self._resume()

    # -- life cycle --------------------------------------------------------------------

    @property
    def hooks(self) -> AgentHooks:
        return self._hooks

    @property
    def training(self) -> LocalTraining:
        """The local training callable (``train_locally`` unless one was given)."""
        return self._training

    def _commit_step(self, step: CommitStep) -> None:
        notify(self._hooks.on_commit_step, step, self.log)

    @property
    def phase(self) -> Phase:
        """Where the agent's state machine stands (``_phase`` gives the edges)."""
        return self._phase.phase

    def _resume(self) -> None:
        """Pick up what the state folder says: re-send a committed update, announce a task."""
        record = self.state.record
        if self._outbox.resume() and record is not None:
            self._phase.move(Phase.AWAITING_ACK)
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
        self.log.info("signs its updates with %s (the aggregator must have it enrolled)",
                      self.key.public_text)
        self.channel.subscribe(self.topics.device_down(self.device_id), self._inbox.handle)
        self.channel.subscribe(self.topics.all_broadcast, self._inbox.handle)
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
        self._halt()
        if self._timer is not None:
            self._timer.join(timeout=timeout)
            self._timer = None
        if self._own_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self.channel.transport.connected:
            with contextlib.suppress(FleetlearnError):
                self._presence.send_presence("offline")
                self.channel.transport.flush(timeout=2.0)
        if self._owns_transport:
            self.channel.transport.close()
        if self._state_lock is not None:
            self._state_lock.release()

    def abort(self) -> None:
        """Stop at once, as a power cut would: the task in hand ends without writing or
        sending anything more, no ``offline`` is said, and a transport this agent owns is
        dropped without a DISCONNECT (the broker publishes the last will). What the state
        folder holds is what a restarted agent finds. Safe to call from a hook."""
        self._aborted = True
        self._halt()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_transport:
            self.channel.transport.abort()
        if self._state_lock is not None:  # a dead process's lock goes with it
            self._state_lock.release()

    def _halt(self) -> None:
        self._stop.set()
        with self._lock:
            if self._job is not None:
                self._job.cancel.set()
            self._phase.move(Phase.STOPPED)
        self._inbox.notify()

    def _run_timer(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.poll()
            except Exception:
                self.log.exception("poll failed")

    def poll(self, now: float | None = None) -> None:
        """Periodic work: re-send an unacknowledged update, re-announce on eligibility changes."""
        now = time.monotonic() if now is None else now
        with self._lock:
            resend, gave_up = self._outbox.due(now)
            if gave_up:
                self._phase.move(Phase.IDLE, expect=frozenset({Phase.AWAITING_ACK}))
        if resend is not None and self.channel.transport.connected \
                and self._outbox.send(resend):
            self.stats.resends += 1
            self.log.info("round %d: no ack yet, re-sent attempt %d",
                          resend.round, resend.attempt)
        if now - self._last_eligibility_check >= self.settings.eligibility_interval_s:
            self._last_eligibility_check = now
            if self._presence.eligibility_changed():
                self._presence.send_hello()
        interval = self.settings.status_interval_s
        if interval is not None and now - self._last_status >= interval:
            self._last_status = now
            line = self.status_line(now)
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
            job, pending, phase = self._job, self._outbox.pending, self._phase.phase
        waiting = self._fetcher.waiting_for
        if job is not None:
            return f"round {job.task.round}: {job.doing(phase, waiting, now)}"
        if pending is not None and pending.sends > 0:
            return (f"round {pending.submission.round}: update sent {pending.sends} times; "
                    "waiting for the aggregator to acknowledge it")
        return (f"waiting for a task from the aggregator of fleet {self.fleet!r} (connected as "
                f"{self.device_id}, no task for {now - self._idle_since:.0f} s); the "
                f"aggregator must run with --fleet {self.fleet}")

    # -- what the device says ----------------------------------------------------------

    def data_problem(self) -> str | None:
        """Why the local data cannot train the model of the last task this device took,
        if it cannot (labels outside its classes); said at start-up, before any task."""
        record = self.state.record
        return labels_problem(self.data, record.task.num_classes if record is not None else None)

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
        return self._presence.hello()

    def announce(self) -> None:
        """Send the hello again now (what the device or its ``transform_hello`` hook says
        about itself changed); nothing while the broker is unreachable."""
        if self.channel.transport.connected:
            with contextlib.suppress(FleetlearnError):
                self._presence.send_hello()

    # -- wire helpers ------------------------------------------------------------------

    def _send(self, kind: str, message: Message) -> None:
        self.channel.send(self.topics.up(self.device_id, kind), message)
        if kind == "update":
            self.ledger.sent(message)

    def _send_request(self, request: Request, task: TaskSpec) -> None:
        version = task.model_version if request.want == "model" else 0
        self._send("request", request.to_message(fleet=self.fleet, device=self.device_id,
                                                 round=task.round, model_version=version))

    def _on_connected(self) -> None:
        try:
            self._presence.greet()
        except Exception:
            self.log.exception("greeting the aggregator failed")
        try:  # on its own: a failed hello must not hold back the update awaiting its ack
            self._outbox.send_pending()
        except Exception:
            self.log.exception("re-sending the update after connecting failed")

    def _ack_task(self, round_: int, attempt: int, status: str, reason: str = "") -> None:
        ack = Ack(round=round_, attempt=attempt, what="task", status=status, reason=reason)
        self._send("ack", ack.to_message(fleet=self.fleet, device=self.device_id, round=round_,
                                          attempt=attempt))

    def _decline(self, task: TaskSpec, attempt: int, reason: str) -> None:
        self.stats.declined += 1
        self._ack_task(task.round, attempt, "declined", reason)

    def _report(self, round_: int | None, code: str, message: str) -> None:
        self.stats.errors += 1
        report = ErrorReport(round=round_, code=code, message=message[:2000])
        try:
            self._send("error", report.to_message(fleet=self.fleet, device=self.device_id,
                                                  round=round_ or 0))
        except FleetlearnError:
            self.log.exception("could not send error report")

    # -- inbound (network thread, from the inbox: decide and queue; never block) -------

    def _count_malformed(self) -> None:
        self.stats.malformed += 1

    def _on_task(self, message: Message) -> None:
        received_at = self._idle_since = time.monotonic()
        task, unsupported = read_task(message)
        if unsupported is not None:
            self._decline(task, 0, unsupported)
            return
        with self._lock:  # held to the end: two copies of a task must not both be taken
            if self._phase.phase == Phase.STOPPED:
                return
            working = (self._job.task, self._job.attempt) if self._job is not None else None
            decision = admit(task, record=self.state.record, working=working)
            if decision.action == "decline":
                self._decline(task, decision.attempt, decision.reason)
                return
            if decision.action != "take":  # a copy of a task already taken: answer it again
                self._ack_task(task.round, decision.attempt, "accepted")
                submission = self.state.submission
                if decision.resend and submission is not None:
                    self._outbox.send(submission)
                return
            eligibility = self._presence.eligibility()
            if not eligibility.eligible:
                self._decline(task, decision.attempt,
                              "ineligible: " + "; ".join(eligibility.reasons))
                return
            reason = ask_on_task(self._hooks, task, self.log)
            if self._phase.phase == Phase.STOPPED:
                return  # the hook stopped the agent
            if reason is not None:
                self._decline(task, decision.attempt, reason)
                return
            job = Job(task=task, attempt=decision.attempt, received_at=received_at)
            self._phase.move(Phase.FETCHING)
            self._job = job
            self.stats.tasks += 1
        self._ack_task(task.round, job.attempt, "accepted")
        try:
            self._executor.submit(self._worker.run, job)
        except RuntimeError:  # executor shut down: the agent is stopping
            self._end_job(job)

    def _on_cancel(self, cancel: Cancel) -> None:
        with self._lock:
            if self._job is not None and self._job.task.round == cancel.round:
                self.log.info("round %d cancelled: %s", cancel.round, cancel.reason)
                self._job.cancel.set()
            if self._outbox.drop_round(cancel.round):  # the round closed: re-sending is pointless
                self._phase.move(Phase.IDLE, expect=frozenset({Phase.AWAITING_ACK}))
            record = self.state.record
            if (self._job is None and record is not None and record.task.round == cancel.round
                    and record.status.in_progress):
                self.state.set_status(TaskStatus.CANCELLED)
        self._inbox.notify()

    def _on_ack(self, ack: Ack) -> None:
        with self._lock:
            if self._outbox.on_ack(ack):
                self._phase.move(Phase.IDLE, expect=frozenset({Phase.AWAITING_ACK}))

    # -- the work's moves (executor thread) --------------------------------------------

    def _enter(self, job: Job, phase: Phase) -> bool:
        with self._lock:
            if self._job is not job or self._stop.is_set():
                return False
            self._phase.move(phase)
            return True

    def _end_job(self, job: Job) -> None:
        with self._lock:
            if self._job is not job:
                return
            self._job = None
            self._idle_since = time.monotonic()
            after = Phase.AWAITING_ACK if self._outbox.pending is not None else Phase.IDLE
            self._phase.move(after, expect=_WORKING)
