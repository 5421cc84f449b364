"""FedBuff: asynchronous, buffered aggregation.

``concurrency`` devices train at once, each on the model version current when it was
given its task; every accepted update goes into the buffer discounted by its
staleness (``_aggregation.staleness_discount``; too stale: refused), and once the
buffer holds ``buffer_size`` updates (at the end of a journal batch, which is never
split) their weighted mean is applied with the server optimizer as a new model
version. Clipping, robust rules and the screens are the same as in sync rounds (one
``RoundAggregate``).

Durability: each accepted update is journaled with its weight and discount under the
model version its buffer builds, and the buffer is never snapshotted per update. A
release needs nothing more to be durable: the model is checkpointed (dropping the
journals it came from, in one transaction) at most every ``checkpoint_every_s``, and a
restarted aggregator replays the journals after its last checkpoint in order, releasing
each full one again (the same updates added in the same order give the same model), then
rebuilds the open buffer; no accepted update is lost or counted twice. The tasks in
flight are saved at each release and at most once a second (task numbers are reserved
durably before use) and re-sent after a restart.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from broker_bridge import (
    Ack,
    AckCode,
    ErrorReport,
    Hello,
    Message,
    printable,
)
from cloud_aggregator._aggregate import RoundAggregate
from cloud_aggregator._aggregation import StalenessPolicy, check_staleness, staleness_discount
from cloud_aggregator._answers import Answer, refused
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._history import finite_or_none
from cloud_aggregator._ingest import Rejection, UpdateItem
from cloud_aggregator._metrics import RoundMetrics
from cloud_aggregator._rounds import AsyncScheduler, took
from cloud_aggregator._status import async_line, fleet_view
from cloud_aggregator._store import StoreError
from cloud_aggregator._strategy import (
    Admit,
    Reply,
    StrategyBase,
    StrategyContext,
    record_round,
)
from cloud_aggregator._sync import replay

log = logging.getLogger(__name__)

SCHEDULER_STATE = "fedbuff_tasks"
"""State name: the tasks in flight (written at each release, and every ``SAVE_EVERY_S``)."""
NEXT_TASK_STATE = "fedbuff_next_task"
"""State name: a task number not yet given (task numbers are reserved ``TASK_BLOCK`` at a
time, so after a crash none is given twice, at one write per block)."""
TASK_BLOCK = 1000
SAVE_EVERY_S = 1.0
DONE_MEMORY = 10_000
DISPATCH_EVERY_S = 0.05
"""Free slots are filled at once when a twentieth of ``concurrency`` is free, else at
least this often: dispatching scans the fleet, so not once per update."""


class FedBuff(StrategyBase):
    """Buffered asynchronous aggregation (see the module doc)."""

    name = "async"
    defers_bootstrap = False

    def __init__(self) -> None:
        super().__init__()
        self._sched: AsyncScheduler | None = None
        self._agg: RoundAggregate | None = None
        self._policy = StalenessPolicy()
        self._done: collections.OrderedDict[tuple[int, str], None] = collections.OrderedDict()
        self._started = 0.0
        self._last_dispatch = 0.0
        self._last_save = 0.0
        self._reserved = 0

    @property
    def scheduler(self) -> AsyncScheduler:
        assert self._sched is not None
        return self._sched

    @property
    def buffered(self) -> int:
        return self._agg.count if self._agg is not None else 0

    def bind(self, ctx: StrategyContext) -> None:
        super().bind(ctx)
        cfg = ctx.config
        self._sched = AsyncScheduler(concurrency=cfg.concurrency, deadline_s=cfg.deadline_s)
        self._policy = StalenessPolicy(kind=cfg.staleness, max_staleness=cfg.max_staleness)
        self._agg = ctx.new_aggregate(max(cfg.buffer_size * 2, 2))
        self._started = ctx.clock.now()

    def state(self) -> dict[str, Any]:
        return {}  # the tasks in flight have their own state (saved when dispatched)

    def load_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _save_tasks(self, *, full: bool) -> None:
        """Persist the next task number (always: a task number is never given twice, even
        after a crash) and, when ``full`` or a while has passed, the tasks in flight
        (those dispatched since are not re-sent after a crash; their updates are refused
        as unknown and the devices get new tasks)."""
        store, sched = self.ctx.store, self.scheduler
        now = time.monotonic()
        if full or now - self._last_save >= SAVE_EVERY_S:
            store.put_state(SCHEDULER_STATE, json.dumps(sched.to_json()).encode())
            self._last_save = now
        self._reserve(sched.next_task_round)

    def _reserve(self, upto: int) -> None:
        """Make sure task numbers below ``upto`` are reserved (durably) before use."""
        if upto > self._reserved:
            self._reserved = upto + TASK_BLOCK
            self.ctx.store.put_state(NEXT_TASK_STATE, str(self._reserved).encode())

    # -- dispatch -------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        ctx, sched = self.ctx, self.scheduler
        changed = False
        for task in sched.expire(now):
            log.info("device %s: async task %d timed out", task.device_id, task.task_round)
            ctx.outcome(task.device_id, completed=False)
            changed = True
        free = sched.free_slots()
        if free == 0 or (free < max(1, ctx.config.concurrency // 20)
                         and time.monotonic() - self._last_dispatch < DISPATCH_EVERY_S):
            return changed
        self._last_dispatch = time.monotonic()
        candidates = ctx.registry.candidates(exclude=sched.busy(), duration=ctx.planner.duration)
        if not candidates:
            return changed
        seq = sched.next_task_round
        chosen = ctx.policy.select(candidates, min(free, len(candidates)), round_index=seq,
                                   deadline_s=ctx.config.deadline_s, rng=ctx.rng(seq))
        self._reserve(sched.next_task_round + len(chosen))
        tasks = [sched.dispatch(d, model_version=ctx.model.version, now=now) for d in chosen]
        ctx.registry.record_selected(chosen, seq)
        self._save_tasks(full=False)
        for task in tasks:
            ctx.send_task(task.device_id, task.task_round, task.model_version)
        return bool(tasks) or changed

    # -- updates --------------------------------------------------------------------------

    def admit(self, device: str, message: Message) -> Admit | Reply:
        ctx, sched = self.ctx, self.scheduler
        task = sched.lookup(message.round, device)
        first = ctx.ledger.recall(message.round, device, message.attempt)
        if (message.round, device) in self._done or task is None or first is not None:
            # Counted, refused before, or not a task in flight: the store and the ledger
            # say which (after a restart too).
            return Reply(ctx.after_round(message.round, device, message.attempt,
                                         unknown=AckCode.UNKNOWN_TASK,
                                         why="no such task in flight"))
        if ctx.ledger.exhausted(task.task_round, device):
            return Reply(refused(AckCode.TOO_MANY_ATTEMPTS,
                                 f"{ctx.ledger.max_judged} attempts were refused for task "
                                 f"{task.task_round}"), judged=True)
        if message.model_version != task.model_version:
            return Reply(refused(AckCode.WRONG_MODEL_VERSION,
                                 f"task was version {task.model_version}"), judged=True)
        # Too stale is known from the task alone: refused before any decoding.
        verdict = check_staleness(trained_from=task.model_version,
                                  current_version=ctx.model.version, policy=self._policy)
        if not verdict.ok:
            return Reply(refused(str(verdict.reason), verdict.detail), judged=True)
        return Admit(task.task_round)

    def check(self, item: UpdateItem) -> Rejection | None:
        task = self.scheduler.lookup(item.task_round, item.device)
        assert task is not None  # admitted under the same lock: staleness is checked
        assert self._agg is not None
        if not self._agg.has_room(self.ctx.queued()):
            return Rejection(AckCode.BUFFER_FULL, "robust buffer is full")
        item.scale = staleness_discount(self.ctx.model.version - task.model_version,
                                        self._policy)
        return None

    def refused(self, device: str, task_round: int, answer: Answer) -> None:
        if answer.final:  # else the task stays in flight for a corrected attempt
            self.scheduler.complete(task_round)
        if answer.code in (AckCode.NORM_ABOVE_MEDIAN, AckCode.NORM_ABOVE_MODEL):
            reset = self.ctx.screen.end_epoch(
                min_refused=self.ctx.config.buffer_size // 2 + 1, clear=False)
            if reset is not None:
                log.warning("%s", reset)

    def stream(self, item: UpdateItem) -> int:
        return self.ctx.model.version

    def journal_meta(self, item: UpdateItem) -> dict[str, Any]:
        assert item.meta is not None
        return {"num_samples": item.meta.num_samples, "weight": item.weight, "norm": item.norm,
                "scale": item.scale, "model_version": item.message.model_version,
                "emulated_s": item.meta.emulated_s}

    def accepted(self, item: UpdateItem) -> None:
        ctx = self.ctx
        assert self._agg is not None and item.meta is not None
        self._agg.add(item.contribution())
        ctx.screen.accepted(item.norm)
        ctx.weights.accepted(item.weight)
        duration = took(item.meta.emulated_s, item.meta.duration_s)
        self.scheduler.complete(item.task_round, emulated_s=duration)
        self._done[(item.task_round, item.device)] = None
        while len(self._done) > DONE_MEMORY:
            self._done.popitem(last=False)
        loss = finite_or_none(item.meta.train_loss)
        ctx.outcome(item.device, completed=True, duration_s=duration, loss=loss,
                    num_samples=item.meta.num_samples)

    def flushed(self) -> None:
        if self._agg is not None and self._agg.count >= self.ctx.config.buffer_size:
            self._release()

    def _release(self) -> None:
        ctx = self.ctx
        assert self._agg is not None
        agg, self._agg = self._agg, ctx.new_aggregate(max(ctx.config.buffer_size * 2, 2))
        epoch = ctx.model.version
        now = ctx.clock.now()
        emulated = self.scheduler.aggregated()
        try:
            delta = agg.result()
            parts = ctx.contributions(agg, epoch + 1, delta)
            new_params = ctx.model.stepped(delta)
        except AggregatorError as exc:
            # Dropped for good: a restart must not replay what this buffer held.
            log.error("async aggregate of model version %d dropped: %s", epoch + 1, exc)
            ctx.store.drop_stream(ctx.config.fleet, epoch)
            self._started = now
            ctx.recorder.begin()
            return
        virtual = ctx.config.clock == "virtual"
        ctx.model.emulated_total_s = (self.scheduler.emulated_now if virtual
                                      else ctx.model.emulated_total_s + (now - self._started))
        reset = ctx.screen.end_epoch(min_refused=ctx.config.buffer_size // 2 + 1)
        if reset is not None:
            log.warning("%s", reset)
        metrics = record_round(ctx, RoundMetrics(
            round=epoch + 1, model_version=epoch + 1, outcome="aggregated",
            reason=f"{agg.count} updates buffered", devices_reported=agg.count,
            devices_selected=agg.count,
            emulated_s=emulated if virtual else now - self._started,
            wall_s=now - self._started, update_norm=float(np.linalg.norm(delta)),
            **parts,
        ))
        ctx.release(params=new_params, metrics=metrics, drop_stream=epoch, aggregate=agg)
        self._save_tasks(full=True)
        self._started = now
        ctx.recorder.begin()

    # -- resume ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Replay the open buffer's journal; re-send the tasks still in flight."""
        ctx = self.ctx
        raw = ctx.store.get_state(SCHEDULER_STATE)
        counter = ctx.store.get_state(NEXT_TASK_STATE)
        try:
            if raw is not None:
                self.scheduler.load_json(json.loads(raw))
            if counter is not None:
                self.scheduler.next_task_round = max(self.scheduler.next_task_round,
                                                     int(counter))
        except (ValueError, TypeError, KeyError, AggregatorError) as exc:
            raise StoreError(f"the tasks in flight in {ctx.store.path} are unreadable: "
                             f"{exc}") from exc
        # The open buffer's stream, and before it the streams of versions released but
        # not checkpointed yet: each is replayed in acceptance order and released again,
        # which re-derives the same model (the same updates, added in the same order).
        while True:
            assert self._agg is not None
            restored = 0
            for r in replay(ctx, ctx.model.version, where="in the FedBuff buffer"):
                assert r.contribution is not None  # FedBuff defers nothing
                self._agg.add(r.contribution)
                self.scheduler.complete(r.task_round)
                self._done[(r.task_round, r.device)] = None
                restored += 1
            if restored:
                log.info("resumed a FedBuff buffer of model version %d with %d stored updates",
                         ctx.model.version + 1, restored)
            if self.buffered < ctx.config.buffer_size:
                break
            self._release()  # released before the stop, or stopped just before its release
        for task in list(self.scheduler.inflight.values()):
            ctx.send_task(task.device_id, task.task_round, task.model_version)

    # -- devices --------------------------------------------------------------------------

    def on_task_ack(self, device: str, ack: Ack) -> None:
        # Only the device a task was given to may give it back.
        if (ack.status == "declined" and self.scheduler.lookup(ack.round, device) is not None
                and self.scheduler.complete(ack.round) is not None):
            self.ctx.note(device, logging.INFO, "device %s declined async task %d: %s", device,
                          ack.round, printable(ack.reason))

    def on_offline(self, device: str) -> None:
        for task in self.scheduler.drop_device(device):
            log.info("device %s went offline with async task %d", device, task.task_round)
            self.ctx.outcome(device, completed=False)

    def on_hello(self, device: str, hello: Hello, *, back: bool) -> None:
        if hello.busy_round is None:
            return
        task = self.scheduler.lookup(hello.busy_round, device)
        if task is not None:
            self.ctx.send_task(device, task.task_round, task.model_version)

    def on_error(self, device: str, report: ErrorReport) -> None:
        if report.round is not None and self.scheduler.lookup(report.round, device) is not None:
            self.scheduler.complete(report.round)

    def status(self) -> str:
        ctx = self.ctx
        view = fleet_view(ctx.registry.all(), ctx.registry.ready())
        return async_line(inflight=len(self.scheduler.inflight),
                          concurrency=ctx.config.concurrency, buffered=self.buffered,
                          buffer_size=ctx.config.buffer_size, view=view, fleet=ctx.config.fleet)
