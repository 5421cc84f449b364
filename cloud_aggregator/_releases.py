"""Releases: a strategy's new model made durable, checkpointed, ledgered and announced.

``Releases.release`` is what a strategy calls (``StrategyContext.release``) when its
aggregate becomes the next model version, or when a round is abandoned. In order:

1. the devices' contributions and standing (``DeviceHistory``) change;
2. the training ledger's entry is prepared (``LedgerWriter.pending``);
3. the model becomes the current version and is checkpointed, with what was learned,
   the optimizer's state, the round's metrics, the devices' records and the ledger
   entry, in one transaction (``save_model``), or, for a release from a journal stream
   (a FedBuff buffer), kept unsaved: every input it was derived from is journaled and a
   restart re-derives it (``FedBuff.resume``), so it is checkpointed at most every
   ``checkpoint_every_s`` (``save_unsaved``), dropping the streams it came from;
4. the model is broadcast, the ledger's signed head and proofs published, the metrics
   recorded (once: not again for a release re-derived after a restart).

The aggregator's lock is held throughout (the runtime calls in under it), except for one
thing: while the run loop runs, a due FedBuff checkpoint is written on a thread of its
own (``_Save``). What it saves is taken under the lock (the released model, never
changed in place, what was learned as of that release, the ledger entries and device
records since the last checkpoint); the file, its fsync and the transaction then run
without it, so updates keep coming in; its proofs are published, and a failure raised,
on the aggregator's own thread at the next look (``poll``). A checkpoint of any other
kind, and a close, waits for it first: ledger entries append in release order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from cloud_aggregator._aggregate import RoundAggregate
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._events import EventBus, ModelReleased, RoundEnded
from cloud_aggregator._history import DeviceHistory
from cloud_aggregator._learned import STATE_BLOB, LearnedState
from cloud_aggregator._ledger import PendingEntry, model_sha256
from cloud_aggregator._ledger_writer import LedgerWriter
from cloud_aggregator._metrics import RoundMetrics
from cloud_aggregator._recorder import PENDING_METRICS, RoundRecorder
from cloud_aggregator._registry import FleetRegistry
from cloud_aggregator._store import Store
from cloud_aggregator._strategy import ModelState, Strategy

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
OPT_BLOB = "server_opt"
JOIN_SAY_S = 5.0
"""A wait for a checkpoint being written says so after this long."""
REGISTRY_EVERY_S = 1.0
"""While ``run`` loops, the registry's devices and their histories are written at most
this often: they are advisory, and hellos bring the devices back after a crash."""


@dataclass(eq=False, kw_only=True)
class _Save:
    """One checkpoint's content, taken under the lock (``Releases._take``); written there
    or on a thread of its own (see the module doc)."""

    version: int
    params: F32
    states: dict[str, bytes]
    close_round: int | None
    drop: range | None
    entries: list[PendingEntry]
    histories: Mapping[str, DeviceHistory]
    unsaved: tuple[RoundMetrics, bytes] | None
    """The FedBuff release waiting for a checkpoint when this was taken (given back if
    the write fails)."""
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


class Releases:
    """The release, checkpoint and ledger path of one aggregator (see the module doc)."""

    def __init__(self, *, config: AggregatorConfig, store: Store, registry: FleetRegistry,
                 state: ModelState, strategy: Strategy, learned: LearnedState,
                 recorder: RoundRecorder,
                 trail: LedgerWriter, events: EventBus, broadcast: Callable[[], None],
                 gauges: Callable[[], None], resuming: Callable[[], bool],
                 background: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.fleet = config.fleet
        self.store = store
        self.registry = registry
        self.state = state
        self.strategy = strategy
        self.learned = learned
        self.recorder = recorder
        self.trail = trail
        self.events = events
        self._broadcast = broadcast
        self._gauges = gauges
        self._resuming = resuming
        self._background = background
        """Whether a due FedBuff checkpoint may be written on a thread of its own (while
        the run loop runs; a manual ``tick`` saves before it returns)."""
        self._job: _Save | None = None
        """The checkpoint being written on its own thread, if any."""
        self.model_sha = ""
        """SHA-256 of the current model as a checkpoint file (the ledger's model hash)."""
        self._unsaved_histories: dict[str, DeviceHistory] = {}
        """Device records changed by releases not yet saved (``_take_histories``)."""
        self._unsaved_from: int | None = None
        """The first journal stream released into a model not checkpointed yet."""
        self._unsaved: tuple[RoundMetrics, bytes] | None = None
        """The metrics and learned state of the last release not checkpointed yet."""
        self._unsaved_entries: list[PendingEntry] = []
        """Training-ledger entries of releases not checkpointed yet (appended with it)."""
        self._saved_at = time.monotonic()
        self._below: set[str] | None = None
        """Devices below the reputation floor (``distrusted``; None: not counted yet)."""

    @property
    def checkpoint_due(self) -> bool:
        """A release waits for its checkpoint, ``checkpoint_every_s`` has passed and no
        checkpoint is being written (``poll`` first: one may have finished)."""
        return (self._unsaved is not None and self._job is None
                and time.monotonic() - self._saved_at >= self.config.checkpoint_every_s)

    def poll(self, *, wait: bool = False) -> None:
        """Finish a checkpoint written on its own thread once it is done (``wait``: wait
        for it): publish its ledger entries' heads and proofs, or raise its failure."""
        job = self._job
        if job is None or job.thread is None or (not wait and job.thread.is_alive()):
            return
        _join(job)
        self._job = None
        self._finish(job)

    def _take(self, metrics: RoundMetrics | None, *, learned: bytes,
              close_round: int | None = None) -> _Save:
        """What a checkpoint of the current model saves, taken now: what was ``learned``,
        the optimizer's state, ``metrics`` (until their line is written), the journal
        streams it was derived from, the ledger entries and device records since the
        last checkpoint."""
        states = {STATE_BLOB: learned, OPT_BLOB: self.state.optimizer.to_bytes()}
        if metrics is not None:
            states[PENDING_METRICS] = RoundRecorder.pending_blob(metrics)
        save = _Save(version=self.state.version, params=self.state.params, states=states,
                     close_round=close_round,
                     drop=(None if self._unsaved_from is None
                           else range(self._unsaved_from, self.state.version)),
                     entries=self._unsaved_entries, histories=self._take_histories(),
                     unsaved=self._unsaved)
        self._unsaved_entries = []
        self._unsaved_from = None
        self._unsaved = None
        self._saved_at = time.monotonic()
        return save

    def _write(self, save: _Save) -> None:
        """Write ``save`` (file and transaction); a failure is kept in ``save.error``."""
        try:
            self.store.save_checkpoint(
                fleet=self.fleet, model_version=save.version, params=save.params,
                states=save.states, close_round=save.close_round, drop_streams=save.drop,
                histories=save.histories, ledger=save.entries,
                keep_newest=self.config.keep_checkpoints)
        except BaseException as exc:
            save.error = exc

    def _finish(self, save: _Save) -> None:
        """After ``_write``: publish the entries' heads and proofs; or, if it failed,
        give everything back to the next save (nothing of it committed) and raise."""
        if save.error is not None:
            self._unsaved_entries = save.entries + self._unsaved_entries
            self._unsaved_histories = {**save.histories, **self._unsaved_histories}
            if save.drop is not None:
                self._unsaved_from = (save.drop.start if self._unsaved_from is None
                                      else min(save.drop.start, self._unsaved_from))
            if self._unsaved is None:
                self._unsaved = save.unsaved
            raise save.error
        for entry in save.entries:
            if entry.appended is not None:
                self.trail.publish(entry.appended)

    def release(self, *, params: F32 | None, metrics: RoundMetrics,
                close_round: int | None = None,
                drop_stream: int | None = None,
                aggregate: RoundAggregate | None = None,
                selected: Sequence[str] | None = None) -> None:
        """Apply ``params`` as the next model version (None: the round is abandoned) and
        make it durable with everything learned, the round's metrics and its training
        ledger entry (from ``aggregate``), in one transaction; then broadcast it, publish
        the ledger's signed head and proofs, and record the metrics.

        A release from a journal stream (``drop_stream``: a FedBuff buffer) is durable
        without its checkpoint (see the module doc). The devices' contributions and
        standing change here and are saved with the next checkpoint or abandoned round,
        in its transaction: a release re-derived after a restart changes them again from
        what was saved.
        """
        history = self.registry.history
        histories = history.contributed(metrics.contributions, metrics.screened)
        history.apply(histories)  # the registry's batches never write the standing
        self._unsaved_histories.update(histories)
        metrics = replace(metrics, devices_distrusted=self.distrusted(histories))
        entry: PendingEntry | None = None
        new_sha = model_sha256(params) if params is not None else self.model_sha
        if aggregate is not None:
            stream = close_round if close_round is not None else drop_stream
            assert stream is not None
            entry = self.trail.pending(
                round_index=metrics.round, outcome=metrics.outcome,
                model_version=self.state.version + (1 if params is not None else 0),
                prev_model=self.model_sha, model=new_sha, aggregate=aggregate,
                stream=stream, selected=selected, optimizer=self.state.optimizer,
                strategy=self.strategy, contribution_records=metrics.contributions)
        if params is not None:
            self.state.params = params
            self.state.version += 1
            self.model_sha = new_sha
            if entry is not None:
                self._unsaved_entries.append(entry)
            if drop_stream is None:
                self.save_model(metrics, close_round=close_round)
            else:
                if self._unsaved_from is None:
                    self._unsaved_from = drop_stream
                # What was learned is taken now: the open buffer's updates, replayed
                # after a restart, must find it as it was when the buffer opened.
                self._unsaved = (metrics, self.learned.to_bytes())
                self.poll()
                if self.checkpoint_due:
                    self.save_unsaved(background=self._background())
        else:
            assert close_round is not None
            self.poll(wait=True)  # ledger entries append in release order
            self.store.close_round(fleet=self.fleet, round_index=close_round, state="abandoned",
                                   states={STATE_BLOB: self.learned.to_bytes(),
                                           PENDING_METRICS: RoundRecorder.pending_blob(metrics)},
                                   histories=self._take_histories(),
                                   ledger=[entry] if entry is not None else [])
            if entry is not None and entry.appended is not None:
                self.trail.publish(entry.appended)
        self.registry.flush(every_s=REGISTRY_EVERY_S)  # advisory: not at every release
        if params is not None:
            self._broadcast()
            self.events.emit(ModelReleased(model_version=self.state.version))
        if self._resuming() and self.recorder.written(metrics):
            return  # re-derived after a restart: its line was written before the stop
        recorded = self.recorder.record(metrics, params=self.state.params
                                        if params is not None else None)
        self._gauges()
        self.events.emit(RoundEnded(metrics=recorded))

    def save_model(self, metrics: RoundMetrics | None = None, *, close_round: int | None = None,
                   learned: bytes | None = None) -> None:
        """Checkpoint the current model with what was learned (and ``metrics``, until
        their line is written), dropping the journal streams it was derived from."""
        self.poll(wait=True)  # ledger entries append in release order
        save = self._take(metrics, close_round=close_round,
                          learned=self.learned.to_bytes() if learned is None else learned)
        self._write(save)
        self._finish(save)

    def save_unsaved(self, *, background: bool = False) -> None:
        """Checkpoint a model released without one (see ``release``), if any, with what
        was learned as of its release; ``background``: on a thread of its own (see the
        module doc). Without it, a checkpoint being written is waited for first."""
        if background and self._job is None and self._unsaved is not None:
            metrics, learned = self._unsaved
            job = self._take(metrics, learned=learned)
            job.thread = threading.Thread(target=self._write, args=(job,),
                                          name="fleetlearn-checkpoint", daemon=True)
            self._job = job
            job.thread.start()
            return
        self.poll(wait=True)
        if self._unsaved is not None:
            metrics, learned = self._unsaved
            self.save_model(metrics, learned=learned)

    def join_background(self) -> None:
        """Wait for a checkpoint being written, keeping quiet about its outcome (the
        aggregator is going away: what committed is what the next start finds)."""
        job = self._job
        if job is not None and job.thread is not None:
            _join(job)

    def _take_histories(self) -> dict[str, DeviceHistory]:
        """The records of the devices releases changed since the last save, as they are
        now (their standing changes only at releases: it is the last release's), and
        forget them."""
        taken, self._unsaved_histories = self._unsaved_histories, {}
        history = self.registry.history
        return {d: history.get(d) for d in taken}

    def distrusted(self, changed: Iterable[str] = ()) -> int:
        """Devices whose reputation is below the floor. A device's reputation changes
        only with its record at a release (``changed``): the fleet is scanned once, then
        only the devices each release changed are looked at again."""
        floor = self.config.reputation_floor
        if floor is None:
            return 0
        history = self.registry.history
        if self._below is None:
            self._below = {d for d in history if history.get(d).reputation < floor}
        else:
            for device in changed:
                if history.get(device).reputation < floor:
                    self._below.add(device)
                else:
                    self._below.discard(device)
        return len(self._below)


def _join(job: _Save) -> None:
    """Wait for ``job``'s thread, saying so if that takes more than a few seconds."""
    assert job.thread is not None
    job.thread.join(JOIN_SAY_S)
    if job.thread.is_alive():
        log.warning("waiting for the checkpoint of model version %d being written (its "
                    "file, fsync and transaction)", job.version)
        job.thread.join()
