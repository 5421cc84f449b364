"""A due FedBuff checkpoint, while the run loop runs, is written on a thread of its own:
updates keep being accepted meanwhile, and nothing of the checkpoint is lost or
reordered (``_releases``' module doc)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from aggregator_rig import FakeDevice, devices, make
from waiting import wait_for

from broker_bridge import MemoryBroker
from cloud_aggregator import Aggregator, StoreError, verify_ledger


class HeldCheckpoints:
    """Wraps the store's ``save_checkpoint``: notes each call's thread and, while
    ``hold`` is set, keeps the call waiting (a slow disk)."""

    def __init__(self, agg: Aggregator) -> None:
        self.threads: list[str] = []
        self.hold = threading.Event()
        self.entered = threading.Event()
        self._release = threading.Event()
        self.fail_next = False
        original = agg.store.save_checkpoint

        def save_checkpoint(**kw: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            if self.fail_next:
                self.fail_next = False
                raise StoreError("disk full (a test)")
            if self.hold.is_set():
                self.entered.set()
                assert self._release.wait(30), "the test never let the checkpoint go"
            return original(**kw)

        agg.store.save_checkpoint = save_checkpoint  # type: ignore[method-assign]

    def let_go(self) -> None:
        self._release.set()


class Answers:
    """Answers each task once, from a thread of its own (over the in-memory broker the
    aggregator's handler runs in the sender's thread)."""

    def __init__(self, agg: Aggregator, fleet: dict[str, FakeDevice]) -> None:
        self.agg, self.fleet = agg, fleet
        self.answered: set[tuple[str, int]] = set()

    def waiting(self) -> list[FakeDevice]:
        return [d for d in self.fleet.values()
                if d.tasks and (d.id, d.tasks[-1].round) not in self.answered]

    def answer(self, device: FakeDevice) -> threading.Thread:
        self.answered.add((device.id, device.tasks[-1].round))
        t = threading.Thread(target=device.send_update, kwargs={"layout": self.agg.layout},
                             daemon=True)
        t.start()
        return t

    def next(self) -> None:
        """Answer the next task that waits (within 10 s), and wait for that."""
        assert wait_for(lambda: bool(self.waiting()), 10), "no device holds a new task"
        self.answer(self.waiting()[0]).join(10)


def _running(tmp: Path, artifacts: Path, broker: MemoryBroker,
             **kw: Any) -> tuple[Aggregator, threading.Thread]:
    agg = make(tmp, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
               rounds=1000, checkpoint_every_s=0.0, **kw)
    runner = threading.Thread(target=agg.run, daemon=True)
    runner.start()
    return agg, runner


def _accepted(device: FakeDevice) -> int:
    return sum(a.what == "update" and a.status == "accepted" for a in device.acks)


def test_updates_are_accepted_while_a_checkpoint_is_written(tmp_path: Path,
                                                            artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg, runner = _running(tmp_path, artifacts, broker)
    held = HeldCheckpoints(agg)
    answers = Answers(agg, fleet)
    try:
        assert wait_for(lambda: len(answers.waiting()) == 3, 10)
        held.hold.set()
        d0, d1, d2 = fleet.values()
        for d in (d0, d1):  # a buffer of two: the release, its checkpoint due at once
            answers.answer(d).join(10)
        assert held.entered.wait(10), "no checkpoint was started"
        # The checkpoint is held. Before, it held the aggregator's lock: this update's
        # handler waited for it (and with it the devices' acks and tasks).
        sender = answers.answer(d2)
        assert wait_for(lambda: _accepted(d2) == 1, 10), d2.acks
        assert held.threads == ["fleetlearn-checkpoint"]
        held.hold.clear()
        held.let_go()
        sender.join(10)
        for _ in range(7):  # more releases and checkpoints; a clean stop saves the rest
            answers.next()
    finally:
        held.let_go()
        agg.stop()
        runner.join(30)
    version = agg.model_version
    agg.close()
    assert version >= 2  # a release takes what its journal batch brought: 2 or more
    assert sum(map(_accepted, fleet.values())) == 10
    (report,) = verify_ledger(tmp_path)
    assert report.ok, report
    assert report.models_rederived == version


def test_a_checkpoint_that_fails_in_the_background_loses_nothing(
    tmp_path: Path, artifacts: Path
) -> None:
    """Its failure is raised on one of the aggregator's own threads at its next look, as
    a checkpoint written there would raise it (the run loop's ``run`` ends with it; a
    handler's is logged); what it would have saved goes with the next checkpoint, and
    the ledger verifies."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
               rounds=1000, checkpoint_every_s=0.0)
    held = HeldCheckpoints(agg)
    held.fail_next = True
    raised: list[BaseException] = []

    def run() -> None:
        try:
            agg.run()
        except BaseException as exc:  # the test looks at it
            raised.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    answers = Answers(agg, fleet)
    for _ in range(2):
        answers.next()
    assert wait_for(lambda: len(held.threads) >= 2 or not runner.is_alive(), 10)
    agg.stop()
    runner.join(30)
    assert held.threads[0] == "fleetlearn-checkpoint"  # the one that failed
    assert all(isinstance(e, StoreError) and "disk full" in str(e) for e in raised)
    version = agg.model_version
    agg.close()
    assert len(held.threads) >= 2  # the failed one was written again
    (report,) = verify_ledger(tmp_path)
    assert report.ok, report
    assert version >= 1 and report.models_rederived == version


def test_waiting_for_a_checkpoint_being_written_says_so(
    tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    import cloud_aggregator._releases as releases_module

    monkeypatch.setattr(releases_module, "JOIN_SAY_S", 0.1)
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg, runner = _running(tmp_path, artifacts, broker)
    held = HeldCheckpoints(agg)
    held.hold.set()
    answers = Answers(agg, fleet)
    try:
        for _ in range(2):
            answers.next()
        assert held.entered.wait(10), "no checkpoint was started"
        threading.Timer(0.5, held.let_go).start()
        with caplog.at_level(logging.WARNING, logger="cloud_aggregator._releases"), \
                agg.condition:
            agg.releases.poll(wait=True)
        assert any("waiting for the checkpoint of model version" in r.getMessage()
                   for r in caplog.records)
    finally:
        held.let_go()
        agg.stop()
        runner.join(30)
