"""Round bookkeeping without MQTT: over-selection, deadlines, quorum, async, virtual time."""

from __future__ import annotations

import pytest

from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._rounds import (
    Admission,
    AsyncScheduler,
    Decision,
    DeviceState,
    ManualClock,
    Report,
    RoundSpec,
    SyncRound,
    over_select,
)


def spec(**kw: object) -> RoundSpec:
    base: dict[str, object] = {"index": 1, "model_version": 0, "target": 3, "quorum": 2,
                               "deadline_s": 10.0, "started_at": 100.0}
    base.update(kw)
    return RoundSpec(**base)  # type: ignore[arg-type]


def rep(s: float = 1.0) -> Report:
    return Report(duration_s=s, emulated_s=s, num_samples=10)


def test_over_selection() -> None:
    assert over_select(10, 1.3, 100) == 13
    assert over_select(10, 1.3, 11) == 11
    assert over_select(3, 1.0, 5) == 3


def test_target_reached_closes_before_the_deadline() -> None:
    rnd = SyncRound(spec=spec(), selected=["a", "b", "c", "d"])
    for d in "abc":
        assert rnd.admit(d, emulated_s=None, duration_s=1.0) is Admission.OK
        rnd.count(d, rep())
    assert rnd.decide(101.0) == (Decision.CLOSE, "target reached")
    out = rnd.finish(Decision.CLOSE, "target reached", now=101.0)
    assert out.counted == ("a", "b", "c") and out.missed == ("d",)


def test_deadline_with_and_without_quorum() -> None:
    rnd = SyncRound(spec=spec(), selected=["a", "b", "c"])
    rnd.count("a", rep())
    assert rnd.decide(105.0) is None
    decision, reason = rnd.decide(110.0)  # type: ignore[misc]
    assert decision is Decision.ABANDON and "quorum missed" in reason
    rnd.count("b", rep())
    assert rnd.decide(110.0)[0] is Decision.CLOSE  # type: ignore[index]


def test_everyone_answered_ends_the_round_early() -> None:
    rnd = SyncRound(spec=spec(), selected=["a", "b", "c"])
    rnd.count("a", rep())
    assert rnd.declined("b")
    assert rnd.dropped("c")
    decision, _ = rnd.decide(100.5)  # type: ignore[misc]
    assert decision is Decision.ABANDON  # 1 < quorum 2: never silently accepted


def test_admission_rules() -> None:
    rnd = SyncRound(spec=spec(), selected=["a", "b"])
    assert rnd.admit("z", emulated_s=None, duration_s=1) is Admission.NOT_SELECTED
    rnd.count("a", rep())
    assert rnd.admit("a", emulated_s=None, duration_s=1) is Admission.ALREADY_COUNTED
    rnd.declined("b")
    assert rnd.admit("b", emulated_s=None, duration_s=1) is Admission.RESOLVED


def test_a_dropped_device_may_still_report_and_be_revived() -> None:
    rnd = SyncRound(spec=spec(), selected=["a", "b"])
    rnd.dropped("a")
    assert rnd.admit("a", emulated_s=None, duration_s=1) is Admission.OK
    rnd.count("a", rep())
    rnd.dropped("b")
    assert rnd.revive("b") and rnd.state("b") is DeviceState.WORKING


def test_virtual_rounds_judge_emulated_time_and_wait_for_everyone() -> None:
    rnd = SyncRound(spec=spec(virtual=True, safety_timeout_s=50.0), selected=["a", "b", "c"])
    rnd.count("a", rep(4.0))
    rnd.count("b", rep(7.0))
    assert rnd.decide(100.0 + 1000 * 0.001) is None  # target not a reason to stop early
    assert rnd.admit("c", emulated_s=12.0, duration_s=0.1) is Admission.LATE
    assert rnd.decide(149.0) is None
    rnd.late("c", rep(12.0))
    decision, _ = rnd.decide(101.0)  # type: ignore[misc]
    out = rnd.finish(decision, "", now=101.0)
    assert out.emulated_s == 10.0  # someone missed: the deadline
    fast = SyncRound(spec=spec(virtual=True), selected=["a", "b"])
    fast.count("a", rep(4.0))
    fast.count("b", rep(7.0))
    assert fast.finish(Decision.CLOSE, "", now=100.2).emulated_s == 7.0


def test_virtual_safety_timeout() -> None:
    rnd = SyncRound(spec=spec(virtual=True, safety_timeout_s=50.0), selected=["a", "b", "c"])
    rnd.count("a", rep())
    rnd.count("b", rep())
    assert rnd.decide(149.9) is None
    decision, reason = rnd.decide(150.0)  # type: ignore[misc]
    assert decision is Decision.CLOSE and "safety timeout" in reason
    out = rnd.finish(decision, reason, now=150.0)
    assert out.missed == ("c",) and out.emulated_s == 10.0


def test_async_scheduler_bounds_concurrency_and_tracks_emulated_time() -> None:
    clock = ManualClock(0.0)
    sched = AsyncScheduler(concurrency=2, deadline_s=5.0)
    t1 = sched.dispatch("a", model_version=0, now=clock.now())
    t2 = sched.dispatch("b", model_version=0, now=clock.now())
    assert sched.free_slots() == 0 and t1.task_round != t2.task_round
    with pytest.raises(AggregatorError):
        sched.dispatch("c", model_version=0, now=0.0)
    assert sched.lookup(t1.task_round, "b") is None  # another device's task
    sched.complete(t1.task_round, emulated_s=3.0)
    assert sched.aggregated() == 3.0
    t3 = sched.dispatch("a", model_version=1, now=1.0)
    assert t3.emulated_start == 3.0
    clock.advance(5.5)
    assert [t.device_id for t in sched.expire(clock.now())] == ["b"]
    restored = AsyncScheduler(concurrency=2, deadline_s=5.0)
    restored.load_json(sched.to_json())
    assert restored.inflight == sched.inflight and restored.next_task_round == 4
