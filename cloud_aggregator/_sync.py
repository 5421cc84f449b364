"""Synchronous rounds: select, send tasks, gather until quorum and deadline, aggregate.

A round over-selects devices (the policy chooses among the eligible ones; too few for
the quorum are topped up with the fastest others), waits for the target count of
counted updates or for the deadline with a quorum (``_rounds.SyncRound`` decides),
then applies the round's aggregate with the server optimizer, or abandons the round
when it missed its quorum. A device that declines is replaced while there is time.

Bootstrap: until the norm screen has a history, a round journals and acknowledges its
updates without adding them and, at close, cuts each to ``multiple`` x the median of
the round's own norms before adding (``_screen``). Each round judges its updates
against the screens' history as it was when the round opened, so verdicts do not
depend on arrival order.

On restart the open round is rebuilt from the journal: the stored updates are decoded
and added again in acceptance order, so the resumed round reaches the same model.

Extension points for subclasses: ``select`` (which devices a round asks) and
``combine`` (the new global model from the current one and the round's aggregate).

Why this module is longer than 400 lines: it is one round's whole life (open, admit,
count, bootstrap, close, resume, the devices' events); split, the order of its steps
would be spread over several files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker_bridge import (
    Ack,
    AckCode,
    ErrorReport,
    Hello,
    Message,
    WireError,
    decode_update_sparse,
    printable,
)
from broker_bridge._protocol import unpack_update_view
from cloud_aggregator._aggregate import Contribution, RoundAggregate
from cloud_aggregator._aggregation import l2_norm
from cloud_aggregator._answers import Answer, refused, refused_blob
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._events import RoundOpened
from cloud_aggregator._history import finite_or_none
from cloud_aggregator._ingest import Rejection, UpdateItem
from cloud_aggregator._ledger import AddedUpdate, UpdateSource
from cloud_aggregator._metrics import RoundMetrics
from cloud_aggregator._registry import Candidate
from cloud_aggregator._rounds import (
    Admission,
    Decision,
    DeviceState,
    Report,
    RoundOutcome,
    RoundSpec,
    SyncRound,
    over_select,
    took,
)
from cloud_aggregator._screen import clip_factor
from cloud_aggregator._status import fleet_view, round_line, waiting_line
from cloud_aggregator._store import StoredUpdate, StoreError
from cloud_aggregator._strategy import (
    Admit,
    Reply,
    StrategyBase,
    StrategyContext,
    record_round,
)

log = logging.getLogger(__name__)

F32 = np.ndarray




@dataclass(frozen=True, kw_only=True)
class _Deferred:
    device: str
    norm: float
    weight: float


@dataclass(kw_only=True)
class _Open:
    """The open round: its bookkeeping and its aggregate."""

    round: SyncRound
    aggregate: RoundAggregate
    deferred: list[_Deferred] = field(default_factory=list)
    q: float | None = None
    """Central DP: the sampling rate the round is charged at."""


class SyncRounds(StrategyBase):
    """Synchronous FedAvg-style rounds (see the module doc)."""

    name = "sync"
    defers_bootstrap = True
    supports_privacy = True

    def __init__(self) -> None:
        super().__init__()
        self._open: _Open | None = None
        self.next_round = 1
        self.abandoned_streak = 0

    # -- extension points ---------------------------------------------------------------

    def select(self, candidates: list[Candidate], k: int, *, round_index: int) -> list[str]:
        """The devices round ``round_index`` asks (default: the selection policy)."""
        ctx = self.ctx
        return ctx.policy.select(candidates, k, round_index=round_index,
                                 deadline_s=ctx.config.deadline_s, rng=ctx.rng(round_index))

    def combine(self, params: F32, delta: F32) -> F32:
        """The next global model (default: one server-optimizer step)."""
        return self.ctx.model.stepped(delta)

    def opened(self, index: int) -> None:
        """Round ``index`` is open (also when rebuilt after a restart); default: nothing."""

    def counted(self, contribution: Contribution) -> None:
        """``contribution`` was just added to the open round's aggregate (as it arrived,
        when a bootstrapping round judged it, or replayed after a restart); default:
        nothing. Subclasses that need the round's updates one by one keep them here."""

    def _add(self, agg: RoundAggregate, contribution: Contribution) -> None:
        agg.add(contribution)
        self.counted(contribution)

    def _round_delta(self, agg: RoundAggregate) -> F32:
        """The closing round's delta (secure rounds: the unmasked mean)."""
        return agg.result()

    # -- plumbing -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"abandoned_streak": self.abandoned_streak}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.abandoned_streak = int(state.get("abandoned_streak", 0))

    @property
    def current(self) -> SyncRound | None:
        return self._open.round if self._open is not None else None

    @property
    def deferred(self) -> list[str]:
        """Devices whose updates the open (bootstrapping) round keeps aside."""
        return [d.device for d in self._open.deferred] if self._open is not None else []

    # -- rounds -------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        if self._open is None:
            return self._open_round(now)
        decision = self._open.round.decide(now)
        if decision is None:
            return False
        if self.ctx.queued():
            # Updates admitted before this moment are the round's: count them (they are
            # acknowledged 'accepted' once committed), then decide again.
            self.ctx.commit()
            decision = self._open.round.decide(now) if self._open is not None else None
            if decision is None:
                return False
        self._end_round(*decision)
        return True

    def _open_round(self, now: float) -> bool:
        ctx, cfg = self.ctx, self.ctx.config
        candidates = ctx.registry.candidates(duration=ctx.planner.duration)
        if len(candidates) < cfg.effective_min_devices:
            return False
        index = self.next_round
        k = over_select(cfg.devices_per_round, cfg.over_selection, len(candidates))
        selected = self.select(candidates, k, round_index=index)
        if len(selected) < cfg.effective_quorum:
            # A policy may be too strict for the devices at hand (a tier too small, too
            # few predicted to fit). Waiting would never change its answer: top up with
            # the fastest other candidates so the round can reach its quorum.
            chosen = set(selected)
            extra = sorted((c for c in candidates if c.device_id not in chosen),
                           key=lambda c: (c.predicted_duration_s, c.device_id))
            selected = [*selected, *(c.device_id for c in extra)][:max(k, cfg.effective_quorum)]
            log.info("selection chose fewer devices than the quorum of %d; topped up to %d",
                     cfg.effective_quorum, len(selected))
        q: float | None = None
        if ctx.privacy is not None:
            q = ctx.privacy.sampling_rate(asked=len(selected), candidates=len(candidates),
                                          selection=cfg.selection)
            why = ctx.privacy.refusal(q)
            if why is not None:
                ctx.finish(why)
                return False
        ctx.store.open_round(fleet=cfg.fleet, round_index=index,
                             model_version=ctx.model.version, selected=selected,
                             quorum=cfg.effective_quorum, deadline=cfg.deadline_s,
                             started_at=now)
        if q is not None:
            ctx.store.put_state(_dp_blob(index), json.dumps({"q": q}).encode())
        ctx.registry.record_selected(selected, index)
        self._begin(index, selected, quorum=cfg.effective_quorum, deadline_s=cfg.deadline_s,
                    started_at=now, q=q)
        log.info("round %d: %d devices selected from %d (target %d, quorum %d)", index,
                 len(selected), len(candidates), cfg.devices_per_round, cfg.effective_quorum)
        ctx.emit(RoundOpened(round=index, model_version=ctx.model.version,
                             selected=tuple(selected)))
        for device in selected:
            ctx.send_task(device, index, ctx.model.version)
        return True

    def _begin(self, index: int, selected: list[str], *, quorum: int, deadline_s: float,
               started_at: float, q: float | None = None) -> None:
        ctx, cfg = self.ctx, self.ctx.config
        # Under DP a round counts every selected device that reports in time: a cut at
        # the first devices_per_round arrivals would let one device push another out.
        target = len(selected) if ctx.privacy is not None else cfg.devices_per_round
        spec = RoundSpec(index=index, model_version=ctx.model.version,
                         target=target, quorum=quorum, deadline_s=deadline_s,
                         started_at=started_at, virtual=cfg.clock == "virtual",
                         safety_timeout_s=cfg.safety_timeout_s)
        capacity = max(len(selected), cfg.selected_per_round) * 2
        self._open = _Open(round=SyncRound(spec=spec, selected=selected),
                           aggregate=ctx.new_aggregate(capacity), q=q)
        ctx.screen.freeze()  # the round's verdicts must not depend on arrival order
        ctx.weights.freeze()
        ctx.recorder.begin()
        self.next_round = index + 1
        self.opened(index)

    def _end_round(self, decision: Decision, reason: str) -> None:
        ctx = self.ctx
        assert self._open is not None
        rnd, agg = self._open.round, self._open.aggregate
        index = rnd.spec.index
        pending = rnd.pending()
        delta: F32 | None = None
        new_params: F32 | None = None
        parts: dict[str, Any] = {}
        if decision is Decision.CLOSE:
            try:
                self._judge_deferred(index, agg)
                delta = self._round_delta(agg)
                parts = ctx.contributions(agg, index, delta)
                new_params = self.combine(ctx.model.params, delta)
            except AggregatorError as exc:
                log.error("round %d cannot be applied (%s): abandoning it", index, exc)
                decision, reason = Decision.ABANDON, f"not applicable: {exc}"
                new_params, parts = None, {}
        if new_params is None:
            self._list_deferred(index, agg)
        ctx.screen.thaw()
        ctx.weights.thaw()
        reset = ctx.screen.end_epoch()
        if reset is not None:
            log.warning("round %d: %s", index, reset)
        outcome = rnd.finish(decision, reason, now=ctx.clock.now())
        ctx.model.emulated_total_s += outcome.emulated_s
        results = self._results(outcome)
        for r in results:  # before the checkpoint, which saves what the policy learned
            ctx.outcome(r["device"], completed=r["completed"], duration_s=r["duration_s"],
                        loss=r.get("loss"), num_samples=r.get("num_samples"))
        self.abandoned_streak = 0 if new_params is not None else self.abandoned_streak + 1
        dp = self._charge(agg, released=new_params is not None)
        metrics = record_round(ctx, RoundMetrics(
            round=index, model_version=ctx.model.version + (1 if new_params is not None else 0),
            outcome="closed" if new_params is not None else "abandoned", reason=reason,
            devices_selected=len(rnd.selected), devices_reported=len(outcome.counted),
            devices_dropped=len(outcome.missed), devices_declined=len(outcome.declined),
            emulated_s=outcome.emulated_s, wall_s=outcome.wall_s,
            update_norm=float(np.linalg.norm(delta)) if delta is not None else None,
            **parts,
            dp_epsilon=dp.get("epsilon"), dp_clip_norm=dp.get("clip_norm"),
            dp_noise_std=dp.get("noise_std"),
        ))
        self._open = None
        ctx.release(params=new_params, metrics=metrics, close_round=index, aggregate=agg,
                    selected=tuple(rnd.selected))
        if new_params is None and self.abandoned_streak >= ctx.config.max_abandoned:
            ctx.fail(f"{self.abandoned_streak} rounds in a row missed their quorum")
        ctx.store.delete_state(refused_blob(index), _extra_blob(index), _dp_blob(index))
        for device in pending:
            ctx.cancel(device, index, f"round {decision.value}d: {reason}")

    def _charge(self, agg: RoundAggregate, *, released: bool) -> dict[str, float | None]:
        """Charge a released private round to the accountant (before the checkpoint,
        which saves its state); the round's DP figures for its metrics."""
        privacy = self.ctx.privacy
        if privacy is None:
            return {}
        assert self._open is not None
        clip = getattr(agg, "clip_norm", privacy.clip_norm)
        release = getattr(agg, "release", None)
        if released and release is not None:
            privacy.charge(release, self._open.q if self._open.q is not None else 1.0)
            log.info("round %d: epsilon %.4g spent at delta %g (clip %.4g)",
                     self._open.round.spec.index, privacy.epsilon, privacy.plan.delta, clip)
        return {"epsilon": privacy.epsilon, "clip_norm": clip,
                "noise_std": privacy.noise_std(clip)}

    def _judge_deferred(self, index: int, agg: RoundAggregate) -> None:
        """Add the updates a bootstrapping round kept aside, each cut to ``multiple`` x
        the median norm of the round (and to the fleet's weight bound)."""
        ctx = self.ctx
        assert self._open is not None
        deferred = self._open.deferred
        if not deferred:
            return
        limit = ctx.screen.bootstrap_limit([d.norm for d in deferred],
                                           model_norm=l2_norm(ctx.model.params))
        weight_cap = ctx.weights.fleet_cap([d.weight for d in deferred])
        waiting = {d.device: d for d in deferred}
        for stored in ctx.journal(index):
            d = waiting.pop(stored.key.device_id, None)
            if d is None or not stored.meta.get("deferred"):
                continue
            indices, values = _decode(stored.body, ctx)
            scale = clip_factor(d.norm, limit)
            weight = d.weight if weight_cap is None else min(d.weight, weight_cap)
            if weight < d.weight:
                ctx.counters.update("bounded:weight")
            if scale < 1.0:
                ctx.counters.update("clipped:norm")
                ctx.note(d.device, logging.WARNING, "device %s: update of round %d (norm %.4g) "
                         "cut to norm %.4g, the limit of the round's first updates",
                         d.device, index, d.norm, d.norm * scale)
                values = values * np.float32(scale)
            self._add(agg, Contribution(indices=indices, values=values, weight=weight,
                                        norm=d.norm * scale, device=d.device,
                                        source=stored_source(stored), cut=scale))
            ctx.screen.accepted(d.norm * scale)
            ctx.weights.accepted(weight)
        self._open.deferred = []

    def _list_deferred(self, index: int, agg: RoundAggregate) -> None:
        """An abandoned round's updates still kept aside: listed for the training ledger
        as they were accepted (nothing of them is applied)."""
        assert self._open is not None
        waiting = {d.device: d for d in self._open.deferred}
        if not waiting:
            return
        for stored in self.ctx.journal(index):
            d = waiting.pop(stored.key.device_id, None)
            if d is not None and stored.meta.get("deferred"):
                agg.added.append(AddedUpdate(source=stored_source(stored), weight=d.weight,
                                             scale=1.0, cut=1.0, norm=d.norm))
        self._open.deferred = []

    def _results(self, outcome: RoundOutcome) -> list[dict[str, Any]]:
        """What each selected device did in the ending round, for the policy and registry."""
        assert self._open is not None
        rnd = self._open.round
        results: list[dict[str, Any]] = []
        for device in outcome.counted:
            r = rnd.reports[device]
            took_s = (r.emulated_s if (rnd.spec.virtual and r.emulated_s is not None)
                      else r.duration_s)
            results.append({"device": device, "completed": True, "duration_s": took_s,
                            "loss": finite_or_none(r.loss), "num_samples": r.num_samples})
        for device in outcome.missed:
            late = rnd.reports.get(device)
            late_s: float | None = None
            if late is not None and rnd.state(device) is DeviceState.LATE:
                late_s = late.took_s
            results.append({"device": device, "completed": False, "duration_s": late_s})
        return results

    # -- updates ------------------------------------------------------------------------

    def admit(self, device: str, message: Message) -> Admit | Reply:
        ctx, op = self.ctx, self._open
        if op is None or message.round != op.round.spec.index:
            why = "no open round" if op is None else f"round {op.round.spec.index} is open"
            return Reply(ctx.after_round(message.round, device, message.attempt, why=why))
        rnd = op.round
        index = rnd.spec.index
        first = ctx.ledger.recall(index, device, message.attempt)
        if first is not None:  # an attempt is judged once
            return Reply(first)
        admission = rnd.admit(device, emulated_s=None, duration_s=0.0)
        if admission is Admission.NOT_SELECTED:
            return Reply(refused(AckCode.NOT_SELECTED, f"not selected in round {index}"))
        if admission is Admission.ALREADY_COUNTED:
            return Reply(ctx.after_round(index, device, message.attempt))
        if admission is Admission.RESOLVED:
            return Reply(refused(AckCode.RESOLVED, f"device is {rnd.state(device)} in this round"))
        if ctx.ledger.exhausted(index, device):
            return Reply(refused(AckCode.TOO_MANY_ATTEMPTS,
                                 f"{ctx.ledger.max_judged} attempts were refused in round "
                                 f"{index}"), judged=True)
        if message.model_version != rnd.spec.model_version:
            return Reply(refused(AckCode.WRONG_MODEL_VERSION,
                                 f"round trains version {rnd.spec.model_version}"), judged=True)
        return Admit(index)

    def check(self, item: UpdateItem) -> Rejection | None:
        assert self._open is not None and item.meta is not None
        rnd, meta = self._open.round, item.meta
        if rnd.admit(item.device, emulated_s=meta.emulated_s,
                     duration_s=meta.duration_s) is Admission.LATE:
            rnd.late(item.device, _report(meta))
            return Rejection(AckCode.MISSED_DEADLINE,
                             f"took {took(meta.emulated_s, meta.duration_s):.3g} s > deadline "
                             f"{rnd.spec.deadline_s:.3g} s")
        if not self._open.aggregate.has_room(len(self._open.deferred) + self.ctx.queued()):
            return Rejection(AckCode.BUFFER_FULL, "robust buffer is full")
        return None

    def refused(self, device: str, task_round: int, answer: Answer) -> None:
        """Settle the device's part (for good, or until a corrected attempt) and keep the
        round's refusals with it, so a restart neither forgets nor asks again."""
        op, ctx = self._open, self.ctx
        if op is None or op.round.spec.index != task_round:
            return
        if answer.final:
            op.round.rejected(device)
        else:
            op.round.refused(device)
        ctx.store.put_state(refused_blob(task_round),
                            json.dumps(ctx.ledger.to_json(task_round)).encode())

    def stream(self, item: UpdateItem) -> int:
        return item.task_round

    def journal_meta(self, item: UpdateItem) -> dict[str, Any]:
        assert item.meta is not None
        meta: dict[str, Any] = {
            "num_samples": item.meta.num_samples, "weight": item.weight, "norm": item.norm,
            "model_version": item.message.model_version, "emulated_s": item.meta.emulated_s}
        if item.deferred:
            meta["deferred"] = True
        return meta

    def accepted(self, item: UpdateItem) -> None:
        op = self._open
        if op is None or op.round.spec.index != item.task_round:
            # Journaled for a round that closed while the commit was pending: the row
            # is gone with the round, and the device was told its round is over.
            return
        ctx = self.ctx
        assert item.meta is not None
        if item.deferred:
            op.deferred.append(_Deferred(device=item.device, norm=item.norm,
                                         weight=item.weight))
        else:
            self._add(op.aggregate, item.contribution())
            ctx.screen.accepted(item.norm)
            ctx.weights.accepted(item.weight)
        op.round.count(item.device, _report(item.meta))

    def flushed(self) -> None:
        """Rounds close in ``tick``."""

    # -- resume -------------------------------------------------------------------------

    def resume(self) -> None:
        """Rebuild the open round from the store, re-sending unanswered tasks."""
        ctx, cfg = self.ctx, self.ctx.config
        rounds = ctx.store.rounds(cfg.fleet)
        self.next_round = (rounds[-1].round + 1) if rounds else 1
        open_rounds = [r for r in rounds if r.state == "open"]
        if not open_rounds:
            return
        rec = open_rounds[-1]
        for stale in open_rounds[:-1]:  # cannot happen with one aggregator; be safe
            ctx.store.close_round(fleet=cfg.fleet, round_index=stale.round, state="abandoned")
        if rec.model_version != ctx.model.version:
            log.warning("round %d trained from version %d, model is %d: abandoning it",
                        rec.round, rec.model_version, ctx.model.version)
            ctx.store.close_round(fleet=cfg.fleet, round_index=rec.round, state="abandoned")
            return
        extra = _extra_devices(ctx, rec.round)
        selected = list(rec.selected) + [d for d in extra if d not in rec.selected]
        self._begin(rec.round, selected, quorum=rec.quorum,
                    deadline_s=rec.deadline or cfg.deadline_s, started_at=rec.started_at,
                    q=self._charged_rate(rec.round))
        assert self._open is not None
        op = self._open
        restored = 0
        for r in replay(ctx, rec.round, where=f"in round {rec.round}"):
            if op.round.state(r.device) is None:
                op.round.add_device(r.device)
            if r.contribution is None:
                op.deferred.append(_Deferred(device=r.device, norm=r.norm, weight=r.weight))
            else:
                self._add(op.aggregate, r.contribution)
            op.round.count(r.device, _report(r.meta))
            restored += 1
        self._restore_refusals(rec.round)
        log.info("resumed round %d with %d stored updates", rec.round, restored)
        for device in op.round.pending():
            ctx.send_task(device, rec.round, ctx.model.version)

    def _charged_rate(self, index: int) -> float | None:
        """The sampling rate a resumed private round was opened at (1 if unknown)."""
        if self.ctx.privacy is None:
            return None
        raw = self.ctx.store.get_state(_dp_blob(index))
        if raw is None:
            return 1.0
        try:
            return float(json.loads(raw)["q"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"round {index}'s privacy record is unreadable: {exc}") from exc

    def _restore_refusals(self, index: int) -> None:
        """A refusal survives a restart: a device refused for good is not asked again,
        and an attempt gets the answer it got before."""
        ctx = self.ctx
        assert self._open is not None
        raw = ctx.store.get_state(refused_blob(index))
        if raw is None:
            return
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"the refused updates of round {index} in {ctx.store.path} are "
                             f"unreadable: {exc}") from exc
        ctx.ledger.restore(index, data, self._open.round, where=str(ctx.store.path))

    # -- devices ------------------------------------------------------------------------

    def on_task_ack(self, device: str, ack: Ack) -> None:
        op = self._open
        if op is None or ack.round != op.round.spec.index:
            return
        if ack.status == "accepted":
            op.round.task_accepted(device)
        elif ack.status == "declined" and op.round.declined(device):
            self.ctx.note(device, logging.INFO, "device %s declined round %d: %s", device,
                          ack.round, printable(ack.reason))
            self._replace(op.round)

    def _replace(self, rnd: SyncRound) -> None:
        """Select one replacement for a decliner while the round has time left."""
        ctx = self.ctx
        if not ctx.config.replace_declined or ctx.privacy is not None:
            return  # under DP a replacement would be a draw the round was not charged for
        if not rnd.spec.virtual and ctx.clock.now() >= rnd.spec.deadline_at:
            return
        candidates = ctx.registry.candidates(exclude=set(rnd.selected),
                                             duration=ctx.planner.duration)
        if not candidates:
            return
        index = rnd.spec.index
        chosen = ctx.policy.select(candidates, 1, round_index=index,
                                   deadline_s=ctx.config.deadline_s,
                                   rng=ctx.rng(index * 7919 + len(rnd.selected)))
        if not chosen:
            return
        device = chosen[0]
        rnd.add_device(device)
        record = ctx.store.round(ctx.config.fleet, index)
        initial = record.selected if record is not None else ()
        extras = [d for d in rnd.selected if d not in initial]
        ctx.store.put_state(_extra_blob(index), json.dumps(extras).encode())
        ctx.registry.record_selected([device], index)
        log.info("round %d: %s replaces a decliner", index, device)
        ctx.send_task(device, index, rnd.spec.model_version)

    def on_offline(self, device: str) -> None:
        op = self._open
        if op is not None and op.round.dropped(device):
            self.ctx.note(device, logging.INFO, "device %s went offline during round %d",
                          device, op.round.spec.index)

    def on_hello(self, device: str, hello: Hello, *, back: bool) -> None:
        op = self._open
        if op is None:
            return
        rnd = op.round
        state = rnd.state(device)
        busy = (hello.busy_round == rnd.spec.index
                and state in (DeviceState.TASKED, DeviceState.WORKING, DeviceState.DROPPED))
        if busy or (hello.busy_round is None and state is DeviceState.DROPPED and back):
            # Busy with this round (restarted mid-task), or back from offline without it
            # (its session may have lost the task): the same task again. A device that
            # was not busy counts as working again once it accepts the task.
            if hello.busy_round is not None:
                rnd.revive(device)
            self.ctx.send_task(device, rnd.spec.index, rnd.spec.model_version)

    def on_error(self, device: str, report: ErrorReport) -> None:
        op = self._open
        if op is not None and report.round == op.round.spec.index:
            op.round.dropped(device)

    def status(self) -> str:
        ctx = self.ctx
        op = self._open
        if op is None:
            view = fleet_view(ctx.registry.all(), ctx.registry.ready())
            return waiting_line(ctx.config, view, next_round=self.next_round)
        rnd = op.round
        left = None if rnd.spec.virtual else rnd.spec.deadline_at - ctx.clock.now()
        return round_line(index=rnd.spec.index, counted=rnd.counted, selected=len(rnd.selected),
                          pending=len(rnd.pending()), quorum=rnd.spec.quorum,
                          target=rnd.spec.target, seconds_left=left)


def _report(meta: Any) -> Report:
    return Report(duration_s=meta.duration_s, emulated_s=meta.emulated_s,
                  loss=finite_or_none(meta.train_loss), num_samples=meta.num_samples)




def _decode(body: bytes, ctx: StrategyContext, *, what: str = "a journaled update"
            ) -> tuple[Any, Any]:
    """(indices, values) of a journaled update body (envelope body: meta + codec body)."""
    try:
        _, codec_body = unpack_update_view(body)
        return _decode_codec(codec_body, ctx)
    except WireError as exc:
        raise StoreError(f"stored update of {what} does not decode: {exc}") from exc


def _decode_codec(codec_body: bytes | memoryview, ctx: StrategyContext) -> tuple[Any, Any]:
    indices, values = decode_update_sparse(codec_body, ctx.layout)
    return (None if indices is None else np.asarray(indices, dtype=np.int64),
            np.asarray(values, dtype=np.float32))


@dataclass(frozen=True, kw_only=True)
class Replayed:
    """A journaled update, back after a restart."""

    device: str
    task_round: int
    meta: Any
    weight: float
    norm: float
    contribution: Contribution | None
    """None: deferred by a bootstrapping round (decoded when that round closes)."""


def replay(ctx: StrategyContext, stream: int, *, where: str) -> Iterator[Replayed]:
    """The journaled updates of ``stream`` in acceptance order, each decoded once and seen
    again by the screens, the planner and the recorder as when it was accepted."""
    for stored in ctx.journal(stream):
        device = stored.key.device_id
        try:
            meta, codec_body = unpack_update_view(stored.body)
            deferred = bool(stored.meta.get("deferred"))
            decoded = None if deferred else _decode_codec(codec_body, ctx)
        except WireError as exc:
            raise StoreError(f"stored update of {device} {where} does not decode: "
                             f"{exc}") from exc
        weight = float(stored.meta.get("weight", meta.num_samples))
        norm = float(stored.meta.get("norm", 0.0))
        contribution = None
        if decoded is not None:
            contribution = Contribution(indices=decoded[0], values=decoded[1], weight=weight,
                                        norm=norm, scale=float(stored.meta.get("scale", 1.0)),
                                        device=device, source=stored_source(stored))
            ctx.screen.accepted(norm)
            ctx.weights.accepted(weight)
        ctx.planner.observe_body(len(codec_body))
        ctx.recorder.note_report(meta, weight=weight)
        yield Replayed(device=device, task_round=stored.key.round, meta=meta, weight=weight,
                       norm=norm, contribution=contribution)


def stored_source(stored: StoredUpdate) -> UpdateSource:
    """A journaled update as the training ledger names it."""
    signature = stored.meta.get("signature")
    claimed = stored.meta.get("body_sha256")
    version = stored.meta.get("model_version")
    codec = stored.meta.get("codec")
    return UpdateSource(device=stored.key.device_id, round=stored.key.round,
                        attempt=stored.key.attempt,
                        digest=hashlib.sha256(stored.body).hexdigest(),
                        signature=str(signature) if signature is not None else None,
                        body_sha256=str(claimed) if claimed is not None else None,
                        model_version=int(version) if version is not None else None,
                        codec=str(codec) if codec is not None else None)


def _extra_blob(index: int) -> str:
    """The state that names a round's replacements for decliners (kept while it is open)."""
    return f"round:{index}:extra"


def _dp_blob(index: int) -> str:
    """The sampling rate a private round is charged at (kept while it is open)."""
    return f"round:{index}:dp"


def _extra_devices(ctx: StrategyContext, index: int) -> list[str]:
    raw = ctx.store.get_state(_extra_blob(index))
    if raw is None:
        return []
    try:
        return [str(d) for d in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise StoreError(f"round {index}'s replacements are unreadable: {exc}") from exc
