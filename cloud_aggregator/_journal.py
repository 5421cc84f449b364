"""The journal: accepted updates made durable in groups, before they are acknowledged.

An update is acknowledged only after the transaction that stores it commits, and one
commit carries up to ``max_batch`` updates (or ``max_bytes`` of bodies, 32 MiB: seven
dense ``mlp-xl`` updates) or whatever arrived within ``max_delay_s`` (128 and 20 ms: an
ack waits at most that much longer, and at a thousand updates a second a commit, with
its fsync, carries about twenty of them).

Two ways to commit a batch:

- ``flush`` writes everything queued now, in the caller's thread, and returns when it is
  durable and every entry's ``then`` has run (used when the aggregator is driven by
  hand, and wherever an order must hold: before a decline, at shutdown);
- ``begin`` hands the queued batch to the journal's writer thread (started on first use,
  stopped by ``close``) and returns at once;
  ``finish`` (called by the aggregator under its lock, woken by ``on_written``) runs the
  thens of a batch the writer has made durable. At most one batch is being written;
  updates keep arriving into the next one meanwhile, so the aggregator's lock is never
  held across a transaction's fsync (the run loop uses this).

Thens always run in submission order, under the caller's lock, never on the writer
thread; a batch being written still counts for ``queued_attempt``, ``holds`` and
``pending`` until its thens have run.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._evolve import evolve
from cloud_aggregator._store import JournalEntry, Store, StoreError

log = logging.getLogger(__name__)

Outcome = Literal["fresh", "duplicate", "failed"]


@dataclass
class _Pending:
    entry: JournalEntry
    then: Callable[[Outcome], None]
    since: float
    stream: Callable[[], int] | None = None


@dataclass
class _Batch:
    """Entries committed together, with what ``queued_attempt``/``holds`` look up."""

    entries: list[_Pending] = field(default_factory=list)
    tasks: dict[tuple[int, str], int] = field(default_factory=dict)  # (round, device) -> attempt
    devices: set[str] = field(default_factory=set)
    bytes: int = 0
    written: Future[list[Outcome]] | None = None


class Journal:
    """Group commit of accepted updates (see the module doc).

    ``submit`` queues an entry; a commit writes a batch in one transaction and then calls
    each entry's ``then`` in submission order with ``fresh`` (stored), ``duplicate`` (its
    key was already accepted) or ``failed`` (the transaction failed: nothing was stored,
    nothing must be acknowledged). ``queued_attempt`` says whether an update of a device
    for a round is already waiting (one task has one answer per batch, whatever its
    attempt number) and ``holds`` whether any of a device's is.
    """

    def __init__(self, store: Store, *, max_batch: int = 128, max_delay_s: float = 0.02,
                 max_bytes: int = 32 * 2**20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1 or max_delay_s < 0 or max_bytes < 1:
            raise AggregatorError("journal batches need max_batch >= 1, max_delay_s >= 0 "
                                  "and max_bytes >= 1")
        self._store = store
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._open = _Batch()
        self._writing: _Batch | None = None
        self._closed = False
        self._writer: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[_Batch, Callable[[], None]] | None] = (
            queue.SimpleQueue())

    @property
    def pending(self) -> int:
        """Entries whose thens have not run yet (queued or being written)."""
        return len(self._open.entries) + (len(self._writing.entries) if self._writing else 0)

    @property
    def writing(self) -> bool:
        """Is a batch with the writer thread (``finish`` will run its thens)?"""
        return self._writing is not None

    @property
    def full(self) -> bool:
        """The batch holds ``max_batch`` updates or ``max_bytes`` of bodies: commit it
        now (whoever queues an update checks, so memory stays bounded however fast
        updates arrive)."""
        return len(self._open.entries) >= self.max_batch or self._open.bytes >= self.max_bytes

    def queued_attempt(self, round_index: int, device: str) -> int | None:
        """The attempt of ``device``'s update of ``round_index`` waiting here, if any."""
        key = (round_index, device)
        attempt = self._open.tasks.get(key)
        if attempt is None and self._writing is not None:
            attempt = self._writing.tasks.get(key)
        return attempt

    def holds(self, device: str) -> bool:
        """Is an update of ``device`` waiting for its commit?"""
        return device in self._open.devices or (
            self._writing is not None and device in self._writing.devices)

    def submit(self, entry: JournalEntry, then: Callable[[Outcome], None], *,
               stream: Callable[[], int] | None = None) -> None:
        """Queue ``entry``; ``stream`` (if given) names its journal stream when its batch
        is taken, replacing ``entry.stream``: a strategy may move on (a FedBuff release)
        between two batches, never within one, so an entry is kept under the stream
        whose aggregate its batch settles into."""
        batch = self._open
        batch.entries.append(_Pending(entry, then, self._clock(), stream))
        batch.tasks[(entry.key.round, entry.key.device_id)] = entry.key.attempt
        batch.devices.add(entry.key.device_id)
        batch.bytes += len(entry.body)

    def wait_s(self) -> float | None:
        """Seconds until the queued entries are due (0: now; None: nothing queued, or a
        batch is being written: its end wakes the caller through ``on_written``)."""
        if not self._open.entries or self._writing is not None:
            return None
        if self.full:
            return 0.0
        return max(0.0, self._open.entries[0].since + self.max_delay_s - self._clock())

    def flush(self) -> int:
        """Commit everything queued, in this thread; returns how many entries were
        written or refused (their thens have run)."""
        done = self.finish(wait=True)
        batch = self._take()
        if batch is None:
            return done
        self._settle(batch, self._write(batch))
        return done + len(batch.entries)

    def begin(self, on_written: Callable[[], None]) -> bool:
        """Hand the queued batch to the writer thread (False: nothing queued, or a batch
        is still being written). ``on_written`` is called on the writer thread once the
        batch is durable (or failed): wake whoever calls ``finish``. It must not wait for
        anything ``finish``'s caller holds while waiting for the write (take the lock
        briefly to notify, nothing more)."""
        if self._writing is not None or self._closed:
            return False
        batch = self._take()
        if batch is None:
            return False
        written: Future[list[Outcome]] = Future()
        batch.written = written
        self._writing = batch
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="fleetlearn-journal",
                                            daemon=True)
            self._writer.start()
        self._jobs.put((batch, on_written))
        return True

    def _write_loop(self) -> None:
        """The writer thread: one batch at a time, until ``close``."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch, on_written = job
            assert batch.written is not None
            try:
                outcomes = self._write(batch)
            except BaseException:  # never leave finish() waiting: nothing is acknowledged
                log.exception("the journal's writer failed")
                outcomes = ["failed"] * len(batch.entries)
            batch.written.set_result(outcomes)
            try:
                on_written()
            except Exception:
                log.exception("waking the aggregator after a journal write failed")

    def finish(self, *, wait: bool) -> int:
        """Run the thens of the batch the writer was given, once it is durable (``wait``:
        block until it is); returns how many entries that settled (0: none, or still
        being written)."""
        batch = self._writing
        if batch is None or batch.written is None:
            return 0
        if not wait and not batch.written.done():
            return 0
        outcomes = _waited(batch)
        self._writing = None
        self._settle(batch, outcomes)
        return len(batch.entries)

    def close(self) -> None:
        """Take no more batches to the writer; wait for the one it has (its thens are not
        run: an aggregator that closes after ``flush`` has none)."""
        self._closed = True
        batch = self._writing
        if batch is not None and batch.written is not None:
            _waited(batch)
        if self._writer is not None:
            self._jobs.put(None)
            self._writer = None

    def _take(self) -> _Batch | None:
        if not self._open.entries:
            return None
        batch, self._open = self._open, _Batch()
        for pending in batch.entries:
            if pending.stream is not None:
                pending.entry = evolve(pending.entry, stream=pending.stream())
        return batch

    def _write(self, batch: _Batch) -> list[Outcome]:
        try:
            fresh = self._store.journal([p.entry for p in batch.entries])
            return ["fresh" if f else "duplicate" for f in fresh]
        except StoreError:
            log.exception("cannot journal %d updates; none is acknowledged (devices send "
                          "them again)", len(batch.entries))
            return ["failed"] * len(batch.entries)

    @staticmethod
    def _settle(batch: _Batch, outcomes: list[Outcome]) -> None:
        for pending, outcome in zip(batch.entries, outcomes, strict=True):
            pending.then(outcome)


SLOW_WRITE_S = 5.0
"""A wait for the writer longer than this says what it waits for."""


def _waited(batch: _Batch) -> list[Outcome]:
    """The outcomes of ``batch``'s write, waiting for it; a slow disk is named."""
    assert batch.written is not None
    try:
        return batch.written.result(timeout=SLOW_WRITE_S)
    except concurrent.futures.TimeoutError:
        log.warning("waiting for the journal's write of %d updates (over %.0f s: the "
                    "store's disk is slow or busy)", len(batch.entries), SLOW_WRITE_S)
        return batch.written.result()
