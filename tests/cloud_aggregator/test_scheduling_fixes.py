"""Scheduling on the virtual clock: the task's wall budget, codec-aware predictions, and
the deadline policy sampling among the devices that fit.

The aggregator runs on an in-memory broker with fake devices (``profiled_fleet``) whose
hellos carry hand-made profiles.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from profiled_fleet import SAMPLES, ProfiledDevice, profile, start_aggregator

from broker_bridge import MemoryBroker
from cloud_aggregator import Candidate, DeadlinePolicy, make_policy
from cloud_aggregator._planner import ADAPTIVE_HEADROOM
from cloud_aggregator._selection import local_steps_for
from device_profiles import ConfigError, Task, predict

FLEET = "sched"
CODEC = "topk:0.1+q8+zstd:3"

FAST = profile("fast", 5.0)
SLOW = profile("slow", 200.0)  # 10 steps: 2 s of training
SLOW_LINK = profile("slow-link", 5.0, uplink_mbps=0.05)  # a dense mlp update: ~7 s up

Device = functools.partial(ProfiledDevice, fleet=FLEET)
start = functools.partial(start_aggregator, fleet=FLEET)


# -- the task's deadline is the device's wall budget ------------------------------------------


def test_virtual_rounds_send_a_wall_budget_and_judge_the_emulated_deadline(
    tmp_path: Path, artifacts: Path
) -> None:
    deadline = 1.0  # emulated seconds: far too short as a wall budget on a busy host
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2, clock="virtual", deadline_s=deadline,
                safety_timeout_s=120.0)
    fast, slow = Device(broker, "fast", FAST), Device(broker, "slow", SLOW)
    assert agg.tick()
    assert fast.tasks[-1].deadline_s == slow.tasks[-1].deadline_s == 120.0
    # Adaptive local work still sizes the slow device's steps to the emulated deadline.
    cost = predict(SLOW, Task.for_model("mlp", n_samples=SAMPLES, epochs=1, batch_size=32))
    expected = local_steps_for(cost, deadline * ADAPTIVE_HEADROOM)
    assert 1 <= expected < 10 and slow.tasks[-1].max_steps == expected
    assert fast.tasks[-1].max_steps is None
    # ... and the emulated deadline is what an update is judged by.
    fast.send_update(layout=agg.layout, emulated_s=0.5)
    slow.send_update(layout=agg.layout, emulated_s=1.5)
    assert fast.acks[-1] == "accepted" and slow.acks[-1] == "rejected"
    assert agg.tick()
    assert agg.history[-1].emulated_s == deadline
    agg.close()


def test_real_clock_and_async_tasks_keep_the_deadline(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path / "real", artifacts, broker, 1, deadline_s=7.0,
                safety_timeout_s=120.0)
    dev = Device(broker, "fast", FAST)
    assert agg.tick() and dev.tasks[-1].deadline_s == 7.0
    agg.close()
    broker = MemoryBroker()
    agg = start(tmp_path / "async", artifacts, broker, 1, deadline_s=7.0, mode="async",
                clock="virtual", concurrency=1, buffer_size=1, safety_timeout_s=120.0)
    dev = Device(broker, "fast", FAST)
    assert agg.tick() and dev.tasks[-1].deadline_s == 7.0  # async expires tasks by it
    agg.close()


# -- predictions use the compression the fleet's updates achieve ---------------------------------


def test_duration_prediction_follows_the_observed_compression(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 1, codec=CODEC, deadline_s=600.0)
    dev = Device(broker, "slow-link", SLOW_LINK)
    info = agg.registry.get("slow-link")
    assert info is not None

    def predicted(ratio: float) -> float:
        task = Task.for_model("mlp", n_samples=SAMPLES, epochs=1, batch_size=32,
                              compression_ratio=ratio)
        return predict(SLOW_LINK, task).total_s

    assert agg.compression_ratio == 1.0  # nothing seen yet: dense uploads
    assert agg.planner.duration(info) == pytest.approx(predicted(1.0))
    assert agg.tick()
    body = dev.send_update(layout=agg.layout, codec=CODEC)
    assert dev.acks[-1] == "accepted"
    ratio = 4 * agg.layout.size / len(body)
    assert ratio > 5  # top-10% of the values, 8 bits each
    assert agg.compression_ratio == pytest.approx(ratio)
    after = agg.planner.duration(info)
    assert after is not None and after == pytest.approx(predicted(ratio))
    assert after < predicted(1.0) / 3  # the upload dominated; now it does not
    agg.close()


def test_rejected_updates_do_not_count_towards_the_compression(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 1, codec=CODEC, clock="virtual", deadline_s=1.0)
    dev = Device(broker, "fast", FAST)
    assert agg.tick()
    dev.send_update(layout=agg.layout, codec=CODEC, emulated_s=5.0)  # late: rejected
    assert dev.acks[-1] == "rejected"
    assert agg.compression_ratio == 1.0
    agg.close()


# -- the deadline policy samples among the devices that fit --------------------------------------


def _fleet(durations: list[float]) -> list[Candidate]:
    return [Candidate(device_id=f"d{i:02d}", predicted_duration_s=t, num_samples=80)
            for i, t in enumerate(durations)]


def test_random_sampling_spreads_over_every_device_that_fits() -> None:
    fleet = _fleet([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 50.0, 60.0])
    policy = DeadlinePolicy(sampling="random")
    rng = np.random.default_rng(3)
    counts: Counter[str] = Counter()
    for r in range(400):
        chosen = policy.select(fleet, 3, round_index=r, deadline_s=10.0, rng=rng)
        assert len(chosen) == len(set(chosen)) == 3
        counts.update(chosen)
    assert set(counts) == {f"d{i:02d}" for i in range(8)}  # not the three fastest only
    assert max(counts.values()) < 1.5 * min(counts.values())
    again = DeadlinePolicy(sampling="random")
    first = again.select(fleet, 3, round_index=0, deadline_s=10.0,
                         rng=np.random.default_rng(3))
    assert first == DeadlinePolicy(sampling="random").select(
        fleet, 3, round_index=0, deadline_s=10.0, rng=np.random.default_rng(3))


def test_devices_that_never_fit_get_an_exploration_share() -> None:
    fleet = _fleet([1.0] * 20 + [20.0, 40.0])
    policy = DeadlinePolicy(sampling="random", exploration=0.1)
    rng = np.random.default_rng(0)
    picks = Counter(d for r in range(300)
                    for d in policy.select(fleet, 5, round_index=r, deadline_s=10.0, rng=rng))
    explored = picks["d20"] + picks["d21"]
    assert 0.05 * 1500 < explored < 0.15 * 1500
    assert picks["d20"] > picks["d21"]  # the nearer miss is tried more often
    none = DeadlinePolicy(sampling="random")
    assert not {"d20", "d21"} & {
        d for r in range(100)
        for d in none.select(fleet, 5, round_index=r, deadline_s=10.0, rng=rng)}


def test_fastest_fill_the_quorum_when_too_few_fit() -> None:
    fleet = _fleet([5.0, 30.0, 20.0, 40.0, 25.0])
    policy = DeadlinePolicy(sampling="random", min_devices=3)
    chosen = policy.select(fleet, 4, round_index=0, deadline_s=10.0,
                           rng=np.random.default_rng(0))
    assert chosen == ["d00", "d02", "d04"]  # only d00 fits: the three fastest
    assert DeadlinePolicy().select(fleet, 4, round_index=0, deadline_s=10.0,
                                   rng=np.random.default_rng(0)) == ["d00"]
    with pytest.raises(ConfigError):
        make_policy("deadline", sampling="slowest")
    with pytest.raises(ConfigError):
        make_policy("deadline", min_devices=0)


def test_the_aggregator_samples_with_its_quorum_as_the_floor(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 4, selection="deadline", quorum=3,
                clock="virtual", deadline_s=1.0)
    policy = agg.policy
    assert isinstance(policy, DeadlinePolicy)
    assert policy.sampling == "random" and policy.min_devices == 3
    assert policy.exploration > 0
    agg.close()


def test_fedcs_with_max_selected_sends_tasks_to_every_device_that_fits(
    tmp_path: Path, artifacts: Path
) -> None:
    # Two devices per round by default; max_selected lets FedCS take all four fast ones
    # (the slow one cannot make the deadline even with one local step).
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2, selection="deadline", clock="virtual",
                deadline_s=1.0, max_selected=6)
    assert agg.policy.max_devices == 6  # type: ignore[attr-defined]
    fast = [Device(broker, f"fast{i}", FAST) for i in range(4)]
    stuck = Device(broker, "stuck", profile("stuck", 5.0, latency_ms=2000.0))
    assert agg.tick()
    assert all(len(d.tasks) == 1 for d in fast)
    assert agg.current_round is not None and len(agg.current_round.selected) in (4, 5)
    assert len(stuck.tasks) <= 1  # only ever by the exploration share
    agg.close()
