"""What one device can do to the aggregator with messages it is allowed to send: never
stop it, never count twice, never touch another device's task, never grow it without
bound. Updates wait for their group commit here (run() loops), as in production."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aggregator_rig import FLEET, FakeDevice, devices, make
from waiting import wait_for

from broker_bridge import Ack, ErrorReport, MemoryBroker
from cloud_aggregator import Aggregator


@pytest.fixture
def running() -> Iterator[list[Aggregator]]:
    """Aggregators whose run() loop is started with ``_run``; stopped at teardown."""
    started: list[Aggregator] = []
    yield started
    for agg in started:
        agg.stop()


def _run(agg: Aggregator, started: list[Aggregator]) -> threading.Thread:
    agg.journal.max_delay_s = 0.5  # what arrives within half a second is one batch
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 60.0}, daemon=True)
    runner.start()
    started.append(agg)
    return runner


def _send_error(device: FakeDevice, round_index: int, code: str) -> None:
    report = ErrorReport(round=round_index, code=code, message="x")
    device.channel.send(device.channel.topics.up(device.id, "error"),
                        report.to_message(fleet=FLEET, device=device.id))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_attempts_in_one_batch_count_once(tmp_path: Path, artifacts: Path, mode: str,
                                              running: list[Aggregator]) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    extra = {"concurrency": 3, "buffer_size": 2} if mode == "async" else {}
    agg = make(tmp_path, artifacts, broker, mode=mode, rounds=1, norm_median_multiple=None,
               **extra)
    agg.tick()
    runner = _run(agg, running)
    d0 = fleet["d0"]
    for attempt in range(3):  # the same task answered three times before any commit
        d0.send_update(layout=agg.layout, attempt=attempt)
    assert wait_for(lambda: len(d0.acks) == 3, 10)
    assert sorted(a.status for a in d0.acks) == ["accepted", "duplicate", "duplicate"]
    for d in list(fleet.values())[1:]:
        d.send_update(layout=agg.layout)
    assert wait_for(lambda: len(agg.history) >= 1, 10), agg.status_line()
    assert runner.is_alive() or agg.done  # the run loop did not die
    assert agg.history[-1].devices_reported == 3  # d0 once


def test_an_update_then_a_decline_before_the_commit_counts_the_update(
        tmp_path: Path, artifacts: Path, running: list[Aggregator]) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1, norm_median_multiple=None)
    agg.tick()
    runner = _run(agg, running)
    fleet["d0"].send_update(layout=agg.layout)
    fleet["d0"].decline()  # contradicts it, before the update is committed
    _send_error(fleet["d0"], 1, "data")
    for d in ("d1", "d2"):
        fleet[d].send_update(layout=agg.layout)
    assert wait_for(lambda: len(agg.history) >= 1, 10), agg.status_line()
    assert runner.is_alive() or agg.done
    assert fleet["d0"].acks[0].status == "accepted"
    assert agg.history[-1].devices_reported == 3


def test_a_device_cannot_cancel_another_devices_async_task(tmp_path: Path,
                                                           artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=3,
               rounds=1, norm_median_multiple=None)
    agg.tick()
    d0, d1, d2 = fleet.values()
    theirs = [d0.tasks[-1].round, d1.tasks[-1].round]
    for r in theirs:  # d2 reports errors and declines for the others' tasks
        _send_error(d2, r, "data")
        ack = Ack(round=r, what="task", status="declined", reason="x")
        d2.channel.send(d2.channel.topics.up(d2.id, "ack"),
                        ack.to_message(fleet=FLEET, device=d2.id))
    d0.send_update(layout=agg.layout)
    assert d0.last_ack().status == "accepted", d0.last_ack()
    d1.send_update(layout=agg.layout)
    assert d1.last_ack().status == "accepted", d1.last_ack()


def test_error_codes_a_device_makes_up_do_not_grow_the_counters(tmp_path: Path,
                                                                artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 1)
    agg = make(tmp_path, artifacts, broker, rounds=1, norm_median_multiple=None)
    agg.tick()
    before = len(agg.counters.snapshot()["updates"])
    for i in range(200):
        _send_error(fleet["d0"], 1, f"made-up-{i}")
    assert len(agg.counters.snapshot()["updates"]) <= before + 1


def test_a_presence_storm_costs_no_commit_per_message(tmp_path: Path, artifacts: Path,
                                                       running: list[Aggregator]) -> None:
    """Presence flapping is written in the registry's batches, not a transaction each."""
    from broker_bridge import presence_message

    broker = MemoryBroker()
    fleet = devices(broker, 2)
    agg = make(tmp_path, artifacts, broker, rounds=1, norm_median_multiple=None)
    _run(agg, running)
    writes = 0
    real = agg.store._write

    def counting() -> object:
        nonlocal writes
        writes += 1
        return real()

    agg.store._write = counting  # type: ignore[method-assign]
    d0 = fleet["d0"]
    for i in range(200):
        status = "offline" if i % 2 else "online"
        d0.channel.send(d0.channel.topics.presence(d0.id),
                        presence_message(fleet=FLEET, device=d0.id, status=status))
    assert writes < 20, writes
    assert agg.counters.snapshot()["gauges"]["devices_online"] == 1  # d0 ended offline


def test_claimed_samples_do_not_dictate_the_rounds_training_loss(tmp_path: Path,
                                                                 artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1, norm_median_multiple=None)
    agg.tick()
    fleet["d0"].send_update(layout=agg.layout, num_samples=10**12, train_loss=100.0)
    for d in ("d1", "d2"):
        fleet[d].send_update(layout=agg.layout)
    assert agg.tick()
    loss = agg.history[-1].train_loss
    # Its update counts with a bounded weight (its announced 50 samples), so does its loss.
    assert loss is not None and loss == pytest.approx((100.0 + 1.0 + 1.0) / 3)


def test_what_arrives_while_the_aggregator_starts_is_bounded_in_bytes(
        tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages held until the open round is rebuilt count against a byte budget too
    (full updates are megabytes): past it they are dropped and counted."""
    import cloud_aggregator._runtime as runtime

    broker = MemoryBroker()
    devices(broker, 3)  # their retained presence reaches the aggregator as it subscribes
    monkeypatch.setattr(runtime, "MAX_EARLY_BYTES", 1)
    agg = make(tmp_path, artifacts, broker, rounds=1)
    assert agg.counters.snapshot()["updates"].get("dropped:starting", 0) >= 3
