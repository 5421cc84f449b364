"""The ack state machine (docs/PROTOCOL.md section 5.1) on an in-memory fleet.

Issue 12, item 16: a device whose accepted update arrived again after the round closed
was told ``stale_round`` and could not tell it had been counted; after one rejection
every later attempt of the round was refused, so a device could not correct a bad
update; the same task could reach a device twice. Each test plays the symptom with
devices speaking the protocol (``FakeDevice``) and checks what the protocol says now.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from agent_rig import Rig, idle
from aggregator_rig import FakeDevice, devices, fake_update, make
from waiting import wait_for

from broker_bridge import (
    AckCode,
    MemoryBroker,
    MemoryTransport,
    ack_code,
    may_retry,
    unpack_update_body,
)
from cloud_aggregator._rounds import ManualClock
from edge_runtime import TaskStatus

FLEET = "test"


def garbled(agg: object, device: str, index: int) -> bytes:
    """A codec body that does not decode (its values are cut short)."""
    from broker_bridge import CodecSpec, encode_update

    layout = agg.layout  # type: ignore[attr-defined]
    body = encode_update(fake_update(device, index, layout.size), layout,
                         CodecSpec.parse("fp32")).body
    return body[:-8]


def answer(dev: FakeDevice) -> tuple[str, str]:
    ack = dev.last_ack()
    return ack.status, ack_code(ack)


# -- (a) an update that arrives again after its round closed --------------------------------


def test_a_counted_update_that_arrives_after_the_round_closed_says_counted(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
        assert answer(d) == ("accepted", "")
    assert agg.tick() and agg.model_version == 1  # round 1 closed with all three
    d0 = fleet["d0"]
    d0.send_update(layout=agg.layout, round_index=1, model_version=0)  # its ack was lost
    # Before: ("rejected", "stale_round"): the device could not tell it had counted.
    assert answer(d0) == ("duplicate", AckCode.ALREADY_COUNTED)
    assert "round 1" in d0.last_ack().reason and "attempt 0" in d0.last_ack().reason
    agg.tick()  # round 2 opens: the same holds while another round is open
    d0.send_update(layout=agg.layout, round_index=1, model_version=0)
    assert answer(d0) == ("duplicate", AckCode.ALREADY_COUNTED)
    # An update the aggregator never accepted is still stale, and not counted.
    fleet["d1"].send_update(layout=agg.layout, round_index=7, model_version=0)
    assert answer(fleet["d1"]) == ("rejected", AckCode.STALE_ROUND)
    assert agg.store.count_accepted(FLEET, 1) == 3


def test_an_update_of_an_abandoned_round_says_it_was_not_applied(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    clock = ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, quorum=2)
    agg.tick()
    d0 = fleet["d0"]
    d0.send_update(layout=agg.layout)
    assert answer(d0) == ("accepted", "")
    clock.advance(31)
    assert agg.tick() and agg.history[-1].outcome == "abandoned"  # 1 < quorum 2
    d0.send_update(layout=agg.layout, round_index=1, model_version=0)
    # Held for the round, but the round was abandoned: nothing of it was applied.
    assert answer(d0) == ("rejected", AckCode.ROUND_ABANDONED)
    assert not may_retry(AckCode.ROUND_ABANDONED)


def test_a_counted_async_update_that_arrives_after_a_restart_says_counted(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    opts = {"mode": "async", "concurrency": 3, "buffer_size": 2, "rounds": 5}
    agg = make(tmp_path, artifacts, broker, **opts)
    agg.tick()
    busy = [d for d in fleet.values() if d.tasks]
    busy[0].send_update(layout=agg.layout)
    assert answer(busy[0]) == ("accepted", "")
    assert isinstance(agg.channel.transport, MemoryTransport)
    agg.abort()  # crash: the ack may not have reached the device
    again = make(tmp_path, artifacts, broker, **opts)
    task = busy[0].tasks[0]
    busy[0].send_update(layout=again.layout, round_index=task.round,
                        model_version=task.model_version)
    # Before: ("rejected", "unknown_task"): the counted update looked refused.
    assert answer(busy[0]) == ("duplicate", AckCode.ALREADY_COUNTED)


# -- (b) a rejection, then a corrected attempt ------------------------------------------------


def test_a_malformed_update_can_be_corrected_with_a_new_attempt(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0 = fleet["d0"]
    d0.send_update(layout=agg.layout, codec_body=garbled(agg, "d0", 1))
    status, code = answer(d0)
    assert (status, code) == ("rejected", AckCode.CODEC) and may_retry(code)
    # The same attempt again (a redelivery) gets the same answer, never a new verdict.
    d0.send_update(layout=agg.layout)
    assert answer(d0) == ("rejected", AckCode.CODEC)
    # Before: a new attempt was refused ("resolved") for the rest of the round.
    d0.send_update(layout=agg.layout, attempt=1)
    assert answer(d0) == ("accepted", "")
    d0.send_update(layout=agg.layout, attempt=2)  # one update per device per round
    assert answer(d0) == ("duplicate", AckCode.ALREADY_COUNTED)
    for d in ("d1", "d2"):
        fleet[d].send_update(layout=agg.layout)
    assert agg.tick() and agg.model_version == 1
    assert agg.store.count_accepted(FLEET, 1) == 3
    assert agg.history[-1].devices_reported == 3


def test_a_rejection_that_allows_a_retry_does_not_hold_the_round_open(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, clock="virtual", quorum=2)
    agg.tick()
    fleet["d0"].send_update(layout=agg.layout, codec_body=garbled(agg, "d0", 1))
    assert answer(fleet["d0"]) == ("rejected", AckCode.CODEC)
    fleet["d1"].send_update(layout=agg.layout, emulated_s=1.0)
    fleet["d2"].send_update(layout=agg.layout, emulated_s=1.0)
    # A virtual round closes when every device has answered; d0's refusal is an answer.
    assert agg.tick() and agg.model_version == 1
    assert agg.history[-1].devices_reported == 2


def test_a_screened_update_cannot_be_retried_in_its_round(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, max_update_norm=10.0, quorum=1)
    agg.tick()
    d0 = fleet["d0"]
    d0.send_update(layout=agg.layout, values=np.full(agg.layout.size, 1.0, np.float32))
    status, code = answer(d0)
    assert (status, code) == ("rejected", "norm_above_cap") and not may_retry(code)
    d0.send_update(layout=agg.layout, attempt=1)  # a small one: the screen is not a probe
    assert answer(d0) == ("rejected", AckCode.RESOLVED)
    assert agg.current_round is not None and agg.current_round.counted == 0


def test_corrected_attempts_are_bounded(tmp_path: Path, artifacts: Path) -> None:
    from cloud_aggregator._answers import MAX_JUDGED_ATTEMPTS

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0 = fleet["d0"]
    for attempt in range(MAX_JUDGED_ATTEMPTS):
        d0.send_update(layout=agg.layout, attempt=attempt, codec_body=garbled(agg, "d0", 1))
        assert answer(d0) == ("rejected", AckCode.CODEC)
    d0.send_update(layout=agg.layout, attempt=MAX_JUDGED_ATTEMPTS)
    status, code = answer(d0)
    assert (status, code) == ("rejected", AckCode.TOO_MANY_ATTEMPTS) and not may_retry(code)
    assert agg.current_round is not None and agg.current_round.counted == 0


def test_a_retry_after_a_rejection_survives_an_aggregator_restart(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, max_update_norm=10.0, quorum=1)
    agg.tick()
    big = np.full(agg.layout.size, 1.0, np.float32)
    fleet["d0"].send_update(layout=agg.layout, values=big)  # final: screened
    fleet["d1"].send_update(layout=agg.layout, codec_body=garbled(agg, "d1", 1))  # may retry
    assert isinstance(agg.channel.transport, MemoryTransport)
    agg.abort()
    for d in fleet.values():
        d.tasks_before_restart = list(d.tasks)  # type: ignore[attr-defined]
    again = make(tmp_path, artifacts, broker, max_update_norm=10.0, quorum=1)
    # The screened device is not asked again and cannot try again after the restart.
    assert len(fleet["d0"].tasks) == len(fleet["d0"].tasks_before_restart)  # type: ignore[attr-defined]
    fleet["d0"].send_update(layout=again.layout, attempt=1)
    assert answer(fleet["d0"]) == ("rejected", AckCode.RESOLVED)
    fleet["d1"].send_update(layout=again.layout)  # attempt 0 again: its first answer
    assert answer(fleet["d1"]) == ("rejected", AckCode.CODEC)
    fleet["d1"].send_update(layout=again.layout, attempt=1)
    assert answer(fleet["d1"]) == ("accepted", "")


def test_an_async_task_can_be_corrected_too(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
               rounds=5)
    agg.tick()
    dev = next(d for d in fleet.values() if d.tasks)
    dev.send_update(layout=agg.layout, codec_body=garbled(agg, dev.id, dev.tasks[-1].round))
    assert answer(dev) == ("rejected", AckCode.CODEC)
    dev.send_update(layout=agg.layout, attempt=1)  # before: unknown_task
    assert answer(dev) == ("accepted", "")


# -- (d) the same task twice ----------------------------------------------------------------


def test_a_task_sent_again_is_the_same_task(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    dev = fleet["d0"]
    first = dev.tasks[-1]
    dev.hello(busy_round=first.round)  # restarted mid-task: the task comes again
    assert len(dev.tasks) == 2 and dev.tasks[-1] == first


# -- (d) the agent's side: a task is identified by its round and nonce -----------------------


def test_an_agent_trains_a_new_runs_task_that_reuses_a_round_number(
    tmp_path: Path, artifacts: Path
) -> None:
    rig = Rig(tmp_path, artifacts)
    try:
        agent = rig.agent()
        rig.agg.send_task("dev-1", rig.agg.task(round_=1, run="run-a"))
        assert wait_for(lambda: len(rig.agg.updates) == 1 and idle(agent)
                        and agent.state.record is not None
                        and agent.state.record.status == TaskStatus.ACKED)
        # The same task again (a restarted aggregator of the same run): answered, not
        # trained again.
        rig.agg.send_task("dev-1", rig.agg.task(round_=1, run="run-a"))
        assert wait_for(lambda: len(rig.agg.task_acks) == 2)
        assert agent.stats.tasks == 1 and len(rig.agg.updates) == 1
        # A fresh aggregator (another run) counts rounds from 1 again. Before: the agent
        # took its task for the one it had answered and never trained it.
        fresh = rig.agg.task(round_=1, run="run-b", nonce="nonce-of-run-b-round-1")
        rig.agg.send_task("dev-1", fresh)
        assert wait_for(lambda: len(rig.agg.updates) == 2 and idle(agent))
        assert agent.stats.tasks == 2
        assert unpack_update_body(rig.agg.updates[-1].body)[0].nonce == fresh.nonce
    finally:
        rig.close()


def test_an_agent_does_not_train_a_task_of_a_round_it_has_moved_past(
    tmp_path: Path, artifacts: Path
) -> None:
    rig = Rig(tmp_path, artifacts)
    try:
        agent = rig.agent()
        rig.agg.send_task("dev-1", rig.agg.task(round_=3, run="run-a"))
        assert wait_for(lambda: len(rig.agg.updates) == 1 and idle(agent))
        # Round 2's task, held in the device's session while it was away, arrives late.
        rig.agg.send_task("dev-1", rig.agg.task(round_=2, run="run-a"))
        assert wait_for(lambda: any(a.round == 2 for a in rig.agg.task_acks))
        (late,) = [a for a in rig.agg.task_acks if a.round == 2]
        assert late.status == "declined" and "round 3" in late.reason
        assert agent.stats.tasks == 1 and len(rig.agg.updates) == 1
        record = agent.state.record
        assert record is not None and record.task.round == 3  # its state is untouched
    finally:
        rig.close()
