"""The work of one accepted task, on the executor: fetch, train, transform, encode, commit, send.

Each step that changes the agent's phase goes through ``Control.enter`` (the agent's
state machine), which ends the work with ``Cancelled`` when the task is no longer the
agent's (cancelled, stopped, aborted). Errors become an ``error`` report with a code
(docs/PROTOCOL.md section 4); a cancelled task sends nothing; an aborted agent (a
simulated power cut) writes and sends nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from broker_bridge import Layout, TaskSpec, UpdateMeta, pack_update_body
from device_profiles import FleetlearnError
from edge_runtime._data import LocalData
from edge_runtime._emulation import Emulation
from edge_runtime._errors import (
    ArtifactError,
    DataError,
    HookError,
    ModelVersionError,
    TrainingBackendMissing,
)
from edge_runtime._fetch import Fetcher
from edge_runtime._hooks import AgentHooks, UpdateDraft
from edge_runtime._inbox import Cancelled, Inbox
from edge_runtime._local_training import LocalTraining, TrainingBudget, checked_result, finite
from edge_runtime._outbox import Outbox, encode_submission
from edge_runtime._phase import Phase
from edge_runtime._secure import SECURE_CODEC, SecureSession
from edge_runtime._settings import AgentSettings, AgentStats
from edge_runtime._state import AgentState, DiskFull, StateError, Submission, TaskStatus
from edge_runtime._trainer_pool import TrainerProvider

ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (DiskFull, "disk_full"),
    (ArtifactError, "artifact"),
    (DataError, "data"),
    (ModelVersionError, "model_version"),
    (TrainingBackendMissing, "backend"),
)


@dataclass
class Job:
    """A task the agent accepted, and when (its deadline counts from receipt)."""

    task: TaskSpec
    attempt: int
    received_at: float
    cancel: threading.Event = field(default_factory=threading.Event)
    held_until: float | None = None
    """While the encoded update is held to its emulated duration: when that ends."""

    def remaining(self) -> float:
        return self.task.deadline_s - (time.monotonic() - self.received_at)

    def doing(self, phase: Phase, waiting: str | None, now: float) -> str:
        """What the work is at, for the agent's status line (``waiting``: what the
        fetcher waits for, if anything)."""
        held_until = self.held_until
        if held_until is not None:
            return (f"holding the encoded update to its emulated duration "
                    f"({max(0.0, held_until - now):.0f} s left), then sending it")
        if waiting is not None:
            return f"waiting for {waiting}"
        if phase == Phase.FETCHING:
            return "loading the artifacts and the global model"
        if phase == Phase.ENCODING:
            return "encoding and storing the update"
        return "training"


@dataclass(frozen=True, kw_only=True)
class Control:
    """What the work needs from the agent's state machine."""

    enter: Callable[[Job, Phase], bool]
    """Move to the phase for the job; False (and no move) when the job is over."""
    end: Callable[[Job], None]
    """The job is over (whatever its outcome): leave its phase."""
    aborted: Callable[[], bool]
    stopping: Callable[[], bool]
    ack_task: Callable[[int, int, str, str], None]
    report: Callable[[int | None, str, str], None]


@dataclass(frozen=True, kw_only=True)
class Worker:
    """Runs accepted tasks with the agent's parts."""

    control: Control
    state: AgentState
    fetcher: Fetcher
    trainers: TrainerProvider
    outbox: Outbox
    data: LocalData
    training: LocalTraining
    hooks: AgentHooks
    emulation: Emulation | None
    settings: AgentSettings
    stats: AgentStats
    log: logging.LoggerAdapter[logging.Logger]
    secure: SecureSession | None = None
    inbox: Inbox | None = None

    def run(self, job: Job) -> None:
        round_ = job.task.round
        try:
            self._do(job)
        except Cancelled:
            if not self.control.aborted():
                self.stats.cancelled += 1
                self._set_status_quietly(TaskStatus.CANCELLED)
        except Exception as exc:
            if self.control.aborted():
                return
            code = next((c for t, c in ERROR_CODES if isinstance(exc, t)), "internal")
            if code == "internal" and not isinstance(exc, FleetlearnError):
                self.log.exception("round %d failed", round_)
            else:
                self.log.error("round %d failed (%s): %s", round_, code, exc)
            self._set_status_quietly(TaskStatus.FAILED)
            self.control.report(round_, code, f"{type(exc).__name__}: {exc}")
        finally:
            self.control.end(job)

    def _secure_submission(self, job: Job, draft: UpdateDraft, cancelled: Callable[[], bool]
                           ) -> tuple[Submission, float] | None:
        return _secure_submission_impl(self, job, draft, cancelled)

    def _set_status_quietly(self, status: TaskStatus) -> None:
        try:
            record = self.state.record
            if record is not None and not record.status.submitted:
                self.state.set_status(status)
        except StateError as exc:
            self.log.error("could not record status %s: %s", status, exc)

    def _enter(self, job: Job, phase: Phase) -> None:
        if job.cancel.is_set() or not self.control.enter(job, phase):
            raise Cancelled

    def _do(self, job: Job) -> None:
        task = job.task

        def cancelled() -> bool:
            return job.cancel.is_set() or self.control.stopping()

        def wait_s() -> float:
            return min(self.settings.request_timeout_s, job.remaining())

        if cancelled():  # cancelled or stopped before it started: nothing is written
            raise Cancelled
        self.state.begin(task, attempt=job.attempt)
        directory = self.fetcher.fetch_artifacts(task, seconds=wait_s(), cancelled=cancelled)
        with self.trainers.lease(directory, task.artifacts_hash) as trainer:
            layout = Layout(tensors=trainer.parameter_shapes())
            base = self.fetcher.fetch_model(task, layout, seconds=wait_s(), cancelled=cancelled)
            self.state.set_status(TaskStatus.TRAINING)
            self._enter(job, Phase.TRAINING)
            budget = TrainingBudget(seconds=job.remaining() - self.settings.deadline_margin_s,
                                    should_stop=cancelled)
            started = time.monotonic()
            result = checked_result(
                self.training(task, base.weights, self.data, trainer, budget), layout.size)
            train_s = time.monotonic() - started
        self.stats.last_train_s, self.stats.last_samples = train_s, result.samples
        if cancelled():
            raise Cancelled
        if result.samples == 0:
            self.stats.withdrawn += 1
            self._set_status_quietly(TaskStatus.DECLINED)
            self.control.ack_task(task.round, job.attempt, "declined", "deadline")
            return
        self._enter(job, Phase.ENCODING)
        draft = transform(self.hooks.transform_update, layout, UpdateDraft(
            task=task,
            delta=np.asarray(result.parameters, np.float32) - base.weights,
            meta=UpdateMeta(
                num_samples=int(result.samples), steps=int(result.steps), nonce=task.nonce,
                train_loss=finite(result.loss) or 0.0, duration_s=round(train_s, 6),
                stopped_early=bool(result.stopped_early), eval_loss=result.eval_loss,
                eval_accuracy=result.eval_accuracy, eval_samples=result.eval_samples,
            )))
        if cancelled():
            raise Cancelled
        if task.codec == SECURE_CODEC:
            secured = self._secure_submission(job, draft, cancelled)
            if secured is None:
                return
            submission, emulated = secured
        else:
            submission, emulated = encode_submission(
                task=task, attempt=job.attempt, layout=layout, draft=draft,
                residual=self.state.residual(), emulation=self.emulation, log=self.log)
        if self.emulation is not None and self.emulation.time_scale is not None:
            wait = self.emulation.wait_s(emulated, time.monotonic() - job.received_at)
            if wait > 0:
                job.held_until = time.monotonic() + wait
                try:
                    if job.cancel.wait(wait):
                        raise Cancelled
                finally:
                    job.held_until = None
        if cancelled():
            raise Cancelled
        self.outbox.commit(submission)
        if not self.control.enter(job, Phase.AWAITING_ACK):
            return  # stopping: a restarted agent sends the committed update
        self.outbox.send(submission)
        self.log.info("round %d: sent update (%d samples, %d steps, %d bytes)", task.round,
                      result.samples, result.steps, len(submission.body))


def _secure_submission_impl(worker: Worker, job: Job, draft: UpdateDraft,
                            cancelled: Callable[[], bool]) -> tuple[Submission, float] | None:
    """A secure round's update: wait for the round's shares, then mask (the agent's
    ``SecureSession``); None when they never came (the task is declined)."""
    task = job.task
    if worker.secure is None:
        raise HookError("a secure task reached an agent without a secure session")
    secure = worker.secure
    device = worker.fetcher.wait(
        lambda: secure.ready(task), seconds=job.remaining(), cancelled=cancelled,
        what=f"round {task.round}'s secure-aggregation shares from the aggregator")
    if device is None:
        worker.stats.withdrawn += 1
        worker._set_status_quietly(TaskStatus.DECLINED)
        worker.control.ack_task(task.round, job.attempt, "declined",
                                "secure round: its shares never arrived")
        return None
    body = secure.masked_body(device, np.asarray(draft.delta, np.float32), task.seed)
    submission = Submission(round=task.round, attempt=job.attempt,
                            model_version=task.model_version, codec=SECURE_CODEC,
                            body=pack_update_body(draft.meta, body), residual=None)
    return submission, 0.0


def transform(hook: Callable[[UpdateDraft], UpdateDraft] | None, layout: Layout,
              draft: UpdateDraft) -> UpdateDraft:
    """``draft`` through the ``transform_update`` hook, checked (``HookError``)."""
    if hook is None:
        return draft
    out = hook(draft)
    if not isinstance(out, UpdateDraft):
        raise HookError(f"transform_update returned {type(out).__name__}, not an UpdateDraft")
    if not isinstance(out.meta, UpdateMeta):
        raise HookError(f"transform_update returned meta of type {type(out.meta).__name__}")
    delta = np.asarray(out.delta, np.float32)
    if delta.shape != (layout.size,):
        raise HookError(f"transform_update returned an update of shape {delta.shape}; "
                        f"the model has {layout.size} parameters")
    return UpdateDraft(task=draft.task, delta=delta, meta=out.meta)
