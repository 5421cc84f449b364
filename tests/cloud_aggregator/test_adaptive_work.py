"""Adaptive local work: a device too slow for the whole task is given fewer steps, not dropped.

The aggregator runs on an in-memory broker with fake devices (``profiled_fleet``) whose
hand-made profiles' measured step time makes the cost model's answer easy to check by
hand.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import numpy as np
from profiled_fleet import SAMPLES, ProfiledDevice, profile, start_aggregator

from broker_bridge import MemoryBroker
from cloud_aggregator import Aggregator
from cloud_aggregator._planner import ADAPTIVE_HEADROOM
from cloud_aggregator._selection import local_steps_for
from device_profiles import DeviceProfile, Task, predict

FLEET = "adaptive"
DEADLINE_S = 30.0

FAST = profile("fast", 20.0)  # 10 steps: 0.2 s
SLOW = profile("slow", 5_000.0)  # 10 steps: 50 s, past the 30 s deadline
HOPELESS = profile("hopeless", 100_000.0)  # not even one step fits

Device = functools.partial(ProfiledDevice, fleet=FLEET)
start = functools.partial(start_aggregator, fleet=FLEET, deadline_s=DEADLINE_S)


def expected_steps(prof: DeviceProfile, *, factor: float = 1.0) -> int:
    """What fits in the deadline by the cost model, written out independently."""
    cost = predict(prof, Task.for_model("mlp", n_samples=SAMPLES, epochs=1, batch_size=32))
    return local_steps_for(cost, DEADLINE_S * ADAPTIVE_HEADROOM, factor=factor)


def test_a_slow_device_gets_fewer_steps_a_fast_one_the_whole_task(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 4)
    fleet = {p.name: Device(broker, p.name, p) for p in (FAST, SLOW, HOPELESS)}
    fleet["unprofiled"] = Device(broker, "unprofiled", None)
    assert agg.tick()
    tasks = {name: dev.tasks[-1] for name, dev in fleet.items()}
    assert tasks["fast"].max_steps is None  # 0.2 s of training: the whole task fits
    assert tasks["unprofiled"].max_steps is None  # no profile, nothing to adapt by
    slow = tasks["slow"].max_steps
    assert slow is not None and slow == expected_steps(SLOW)
    assert 1 <= slow < 10  # fewer than the 10 steps of one epoch
    assert tasks["hopeless"].max_steps == 1  # never dropped: at least one step
    assert all(t.epochs == 1 and t.deadline_s == DEADLINE_S for t in tasks.values())
    agg.close()


def test_the_flag_turns_it_off(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2, adaptive_local_work=False, max_steps=8)
    fleet = {p.name: Device(broker, p.name, p) for p in (FAST, SLOW)}
    assert agg.tick()
    assert {d.tasks[-1].max_steps for d in fleet.values()} == {8}  # the configured cap
    agg.close()


def test_the_round_is_weighted_by_the_samples_reported(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2)
    fast, slow = Device(broker, "fast", FAST), Device(broker, "slow", SLOW)
    before = agg.params.copy()
    assert agg.tick()
    steps = slow.tasks[-1].max_steps
    assert steps is not None
    rng = np.random.default_rng(zlib.crc32(b"adaptive"))
    ups = {d.id: (rng.standard_normal(agg.layout.size) * 0.01).astype(np.float32)
           for d in (fast, slow)}
    fast.send_update(ups["fast"], layout=agg.layout, num_samples=SAMPLES, steps=10)
    slow.send_update(ups["slow"], layout=agg.layout, num_samples=32 * steps, steps=steps)
    assert fast.acks[-1] == slow.acks[-1] == "accepted"
    assert agg.tick()  # both answered: the round closes
    total = SAMPLES + 32 * steps
    expected = (SAMPLES * ups["fast"].astype(np.float64)
                + 32 * steps * ups["slow"].astype(np.float64)) / total
    np.testing.assert_allclose(agg.params, before + expected.astype(np.float32), atol=1e-6)
    agg.close()


def _round_where_the_slow_device_runs_late(
    agg: Aggregator, fast: ProfiledDevice, slow: ProfiledDevice
) -> int:
    """Round 1: the fast device reports in time, the slow one takes twice what its
    profile says (emulated time past the deadline). Returns the slow one's first steps."""
    assert agg.tick()
    first = slow.tasks[-1].max_steps
    assert first is not None and first == expected_steps(SLOW)
    fast.send_update(np.zeros(agg.layout.size, np.float32), layout=agg.layout,
                     num_samples=SAMPLES, steps=10, emulated_s=1.0)
    slow.send_update(np.zeros(agg.layout.size, np.float32), layout=agg.layout,
                     num_samples=32 * first, steps=first, emulated_s=2 * 5.0 * first)
    assert slow.acks[-1] == "rejected"
    assert agg.tick() and agg.model_version == 1
    return first


def test_a_device_that_ran_late_is_given_less_next_time(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2, clock="virtual")
    fast, slow = Device(broker, "fast", FAST), Device(broker, "slow", SLOW)
    first = _round_where_the_slow_device_runs_late(agg, fast, slow)
    assert agg.tick()  # round 2
    second = slow.tasks[-1].max_steps
    assert second is not None and 1 <= second < first
    assert fast.tasks[-1].max_steps is None
    agg.close()


def test_what_was_learned_survives_an_aggregator_restart(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2, clock="virtual", selection="deadline")
    fast, slow = Device(broker, "fast", FAST), Device(broker, "slow", SLOW)
    first = _round_where_the_slow_device_runs_late(agg, fast, slow)
    learned = agg.policy.state()
    factor = agg.policy.corrections.factor("slow")  # type: ignore[attr-defined]
    assert factor > 1.0
    agg.close()

    again = start(tmp_path, artifacts, broker, 2, clock="virtual", selection="deadline")
    assert again.model_version == 1
    assert again.policy.corrections.factor("slow") == factor  # type: ignore[attr-defined]
    assert again.policy.state() == learned
    assert again.tick()  # round 2: the slow device is still given less than at first
    second = slow.tasks[-1].max_steps
    assert second is not None and 1 <= second < first
    again.close()

    # Another policy keeps the corrections (they describe devices) and reads the same
    # device histories: the registry's, which outlive any policy.
    other = start(tmp_path, artifacts, broker, 2, clock="virtual", selection="oort")
    assert other.policy.corrections.factor("slow") == factor  # type: ignore[attr-defined]
    history = other.policy.history.get("slow")  # type: ignore[attr-defined]
    assert history is other.registry.history.get("slow")
    assert history.selections >= 2 and history.misses >= 1
    assert "stats" not in other.policy.state()
    other.close()
