"""Selection policies on synthetic fleets with known answers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cloud_aggregator import (
    Candidate,
    DeadlinePolicy,
    FleetHistory,
    OortPolicy,
    RandomPolicy,
    SelectionPolicy,
    TieredPolicy,
    local_steps,
    local_steps_for,
    make_policy,
)
from device_profiles import ConfigError, Task, get_profile, predict


def _fleet(durations: list[float], **kw: object) -> list[Candidate]:
    return [
        Candidate(device_id=f"d{i:02d}", predicted_duration_s=t, num_samples=80, **kw)  # type: ignore[arg-type]
        for i, t in enumerate(durations)
    ]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- registry and protocol ------------------------------------------------------------------


def test_make_policy_by_name() -> None:
    for name, cls in [
        ("random", RandomPolicy),
        ("deadline", DeadlinePolicy),
        ("tiered", TieredPolicy),
        ("oort", OortPolicy),
    ]:
        policy = make_policy(name)
        assert isinstance(policy, cls)
        assert isinstance(policy, SelectionPolicy)
        assert policy.name == name
    assert make_policy("tiered", num_tiers=3).num_tiers == 3  # type: ignore[attr-defined]


def test_make_policy_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ConfigError, match=r"known: .*oort"):
        make_policy("fedbuff-magic")
    with pytest.raises(ConfigError, match="bad options"):
        make_policy("random", speed=3)
    with pytest.raises(ConfigError):
        make_policy("oort", alpha=-1.0)


def test_common_input_validation() -> None:
    policy = RandomPolicy()
    fleet = _fleet([1.0, 2.0])
    with pytest.raises(ConfigError):
        policy.select(fleet, -1, round_index=0, rng=_rng())
    with pytest.raises(ConfigError):
        policy.select(fleet + fleet[:1], 1, round_index=0, rng=_rng())
    assert policy.select(fleet, 0, round_index=0, rng=_rng()) == []
    assert policy.select([], 3, round_index=0, rng=_rng()) == []
    with pytest.raises(ConfigError):
        Candidate(device_id="x", predicted_duration_s=0.0)


# -- random ---------------------------------------------------------------------------------


def test_random_is_seeded_and_without_replacement() -> None:
    fleet = _fleet([1.0] * 50)
    a = RandomPolicy().select(fleet, 10, round_index=3, rng=_rng(42))
    b = RandomPolicy().select(fleet, 10, round_index=3, rng=_rng(42))
    c = RandomPolicy().select(fleet, 10, round_index=3, rng=_rng(43))
    assert a == b
    assert a != c
    assert len(set(a)) == 10
    assert sorted(RandomPolicy().select(fleet[:4], 10, round_index=0, rng=_rng())) == [
        "d00",
        "d01",
        "d02",
        "d03",
    ]


def test_random_covers_the_fleet_uniformly() -> None:
    fleet = _fleet([1.0] * 20)
    policy = RandomPolicy()
    rng = _rng(1)
    counts = Counter(d for r in range(500) for d in policy.select(fleet, 5, round_index=r, rng=rng))
    assert set(counts) == {c.device_id for c in fleet}
    assert max(counts.values()) < 1.5 * min(counts.values())


# -- deadline (FedCS) ---------------------------------------------------------------------------


def test_deadline_picks_exactly_the_devices_that_fit() -> None:
    durations = [5.0, 50.0, 12.0, 30.0, 9.0, 31.0, 29.9]
    fleet = _fleet(durations)
    chosen = DeadlinePolicy().select(fleet, 100, round_index=0, deadline_s=30.0, rng=_rng())
    assert chosen == ["d00", "d04", "d02", "d06", "d03"]  # all <= 30 s, fastest first
    capped = DeadlinePolicy().select(fleet, 2, round_index=0, deadline_s=30.0, rng=_rng())
    assert capped == ["d00", "d04"]
    safe = DeadlinePolicy(slack=0.5).select(fleet, 100, round_index=0, deadline_s=30.0, rng=_rng())
    assert safe == ["d00", "d04", "d02"]
    no_deadline = DeadlinePolicy().select(fleet, 3, round_index=0, rng=_rng())
    assert no_deadline == ["d00", "d04", "d02"]


def test_deadline_learns_from_a_device_that_keeps_missing() -> None:
    fleet = _fleet([10.0, 20.0, 25.0])
    policy = DeadlinePolicy()
    for r in range(6):
        chosen = policy.select(fleet, 3, round_index=r, deadline_s=30.0, rng=_rng())
        for device_id in chosen:
            if device_id == "d00":  # predicted 10 s, really takes 40 s: misses every time
                policy.feedback(device_id, duration_s=None, completed=False)
            else:
                policy.feedback(device_id, duration_s=15.0, completed=True, loss=1.0)
    final = policy.select(fleet, 3, round_index=6, deadline_s=30.0, rng=_rng())
    assert "d00" not in final
    assert policy.corrections.factor("d00") > 3.0


def test_deadline_takes_as_many_as_fit_up_to_max_devices() -> None:
    fleet = _fleet([1.0] * 6 + [50.0] * 4)
    wide = DeadlinePolicy(sampling="random", max_devices=8)
    chosen = wide.select(fleet, 3, round_index=0, deadline_s=10.0, rng=_rng())
    assert sorted(chosen) == [f"d{i:02d}" for i in range(6)]  # every fitting one, not 3
    capped = DeadlinePolicy(sampling="random", max_devices=4)
    assert len(capped.select(fleet, 3, round_index=0, deadline_s=10.0, rng=_rng())) == 4
    plain = DeadlinePolicy(sampling="random")
    assert len(plain.select(fleet, 3, round_index=0, deadline_s=10.0, rng=_rng())) == 3
    with pytest.raises(ConfigError):
        DeadlinePolicy(max_devices=0)


def test_deadline_stops_exploring_a_device_once_it_has_shown_it_misses() -> None:
    fleet = _fleet([1.0] * 5 + [50.0])
    policy = DeadlinePolicy(sampling="random", exploration=1.0, explore_until=2)
    tries = 0
    for r in range(10):
        chosen = policy.select(fleet, 3, round_index=r, deadline_s=10.0, rng=_rng(r))
        for device_id in chosen:
            if device_id == "d05":
                tries += 1
                policy.feedback(device_id, duration_s=None, completed=False)
            else:
                policy.feedback(device_id, duration_s=1.0, completed=True, loss=1.0)
    assert tries == 2  # explored every round until observed twice, then never again


# -- tiered (TiFL) ----------------------------------------------------------------------------


def test_tiered_selects_within_one_tier() -> None:
    durations = [float(t) for t in range(1, 21)]  # 20 devices, 4 tiers of 5
    fleet = _fleet(durations)
    policy = TieredPolicy(num_tiers=4)
    tiers = [{c.device_id for c in t} for t in policy.tiers(fleet)]
    assert [len(t) for t in tiers] == [5, 5, 5, 5]
    assert tiers[0] == {"d00", "d01", "d02", "d03", "d04"}
    rng = _rng(5)
    seen_tiers = set()
    for r in range(40):
        chosen = set(policy.select(fleet, 3, round_index=r, rng=rng))
        assert len(chosen) == 3
        owners = [i for i, t in enumerate(tiers) if chosen <= t]
        assert len(owners) == 1
        assert owners[0] == policy.last_tier
        seen_tiers.add(owners[0])
    assert seen_tiers == {0, 1, 2, 3}


def test_tiered_favours_tiers_with_higher_loss() -> None:
    fleet = _fleet([float(t) for t in range(1, 21)])
    policy = TieredPolicy(num_tiers=4, uniform_mix=0.1)
    for c in fleet:
        # The slowest tier lags: its loss is 10x the others'.
        loss = 5.0 if c.predicted_duration_s > 15 else 0.5
        policy.feedback(c.device_id, duration_s=c.predicted_duration_s, completed=True, loss=loss)
    p = policy.tier_probabilities(policy.tiers(fleet))
    assert p[3] == pytest.approx(max(p))
    assert p[3] > 0.6
    assert p.sum() == pytest.approx(1.0)


def test_tiered_credits_limit_each_tier() -> None:
    fleet = _fleet([float(t) for t in range(1, 13)])
    policy = TieredPolicy(num_tiers=3, credits=2)
    rng = _rng(0)
    picked = []
    for r in range(6):
        policy.select(fleet, 2, round_index=r, rng=rng)
        picked.append(policy.last_tier)
    assert Counter(picked) == {0: 2, 1: 2, 2: 2}


def test_tiered_respects_a_deadline() -> None:
    fleet = _fleet([1.0, 2.0, 3.0, 100.0, 200.0, 300.0])
    policy = TieredPolicy(num_tiers=2)
    rng = _rng(0)
    for r in range(20):
        chosen = policy.select(fleet, 2, round_index=r, deadline_s=10.0, rng=rng)
        assert set(chosen) <= {"d00", "d01", "d02"}


# -- oort ---------------------------------------------------------------------------------------


def _explored(policy: OortPolicy, fleet: list[Candidate], losses: dict[str, float]) -> None:
    for c in fleet:
        policy.select([c], 1, round_index=0, rng=_rng())
        policy.feedback(
            c.device_id, duration_s=c.predicted_duration_s, completed=True, loss=losses[c.device_id]
        )


def test_oort_prefers_high_utility_fast_devices() -> None:
    durations = [10.0] * 10 + [10.0, 10.0, 200.0, 200.0]
    fleet = _fleet(durations)
    losses = {c.device_id: 0.1 for c in fleet}
    losses.update({"d10": 5.0, "d11": 5.0, "d12": 5.0, "d13": 5.0})  # high loss; 12, 13 slow
    policy = OortPolicy(exploration=0.0, min_exploration=0.0, preferred_duration_s=20.0)
    _explored(policy, fleet, losses)
    counts: Counter[str] = Counter()
    rng = _rng(3)
    for r in range(1, 51):
        counts.update(policy.select(fleet, 2, round_index=r, rng=rng))
    assert counts["d10"] == counts["d11"] == 50  # high utility and fast: always
    assert counts["d12"] == counts["d13"] == 0  # high utility but (200/20)^2 slower


def test_oort_still_explores_unseen_devices() -> None:
    fleet = _fleet([10.0] * 20)
    policy = OortPolicy(exploration=0.5, exploration_decay=1.0, min_exploration=0.5)
    _explored(policy, fleet[:10], {c.device_id: 1.0 for c in fleet[:10]})
    chosen = policy.select(fleet, 10, round_index=1, rng=_rng())
    unseen = {c.device_id for c in fleet[10:]}
    assert len(set(chosen) & unseen) == 5
    assert len(chosen) == 10


def test_oort_exploration_decays_to_its_floor() -> None:
    policy = OortPolicy(exploration=0.9, exploration_decay=0.5, min_exploration=0.2)
    fleet = _fleet([1.0] * 10)
    for r in range(10):
        policy.select(fleet, 2, round_index=r, rng=_rng(r))
    assert policy.epsilon == pytest.approx(0.2)


def test_oort_explores_faster_devices_first() -> None:
    fleet = _fleet([1.0] * 5 + [1000.0] * 5)
    policy = OortPolicy()  # nothing explored yet: every slot is exploration
    counts: Counter[str] = Counter()
    for r in range(40):
        counts.update(policy.select(fleet, 2, round_index=r, rng=_rng(r)))
        policy = OortPolicy()
    fast = sum(counts[f"d{i:02d}"] for i in range(5))
    assert fast > 0.95 * sum(counts.values())


def test_oort_participation_cap_is_respected() -> None:
    fleet = _fleet([5.0] * 12)
    policy = OortPolicy(max_participation=3)
    rng = _rng(9)
    counts: Counter[str] = Counter()
    for r in range(30):
        chosen = policy.select(fleet, 4, round_index=r, rng=rng)
        counts.update(chosen)
        for device_id in chosen:
            policy.feedback(device_id, duration_s=5.0, completed=True, loss=1.0)
    assert max(counts.values()) <= 3
    assert sum(counts.values()) == 12 * 3  # everyone used up their cap, then nothing


def test_oort_staleness_bonus_brings_back_idle_devices() -> None:
    policy = OortPolicy()
    fleet = _fleet([5.0, 5.0])
    _explored(policy, fleet, {"d00": 1.0, "d01": 1.0})
    policy.select(fleet[1:], 1, round_index=50, rng=_rng())  # d01 was just used
    utils = policy.utilities(fleet, round_index=51, preferred_s=10.0)
    assert utils["d00"] > utils["d01"]


def test_oort_weighs_speed_under_a_generous_deadline() -> None:
    # Same loss everywhere; a deadline every device meets must not make speed irrelevant:
    # T falls back to the median expected duration, so the slow half is penalised.
    fleet = _fleet([1.0] * 10 + [10.0] * 10)
    policy = OortPolicy(exploration=0.0, min_exploration=0.0)
    _explored(policy, fleet, {c.device_id: 1.0 for c in fleet})
    counts: Counter[str] = Counter()
    rng = _rng(5)
    for r in range(1, 31):
        counts.update(policy.select(fleet, 5, round_index=r, deadline_s=100.0, rng=rng))
    slow = sum(counts[f"d{i:02d}"] for i in range(10, 20))
    assert slow == 0


def test_oort_preferred_duration_is_capped_by_the_deadline() -> None:
    fleet = _fleet([1.0] * 4 + [8.0] * 4)

    def slow_picks(deadline_s: float | None) -> int:
        # preferred_quantile=1.0: T is the slowest device, so only a deadline can lower it.
        policy = OortPolicy(exploration=0.0, min_exploration=0.0, preferred_quantile=1.0)
        _explored(policy, fleet, {c.device_id: 1.0 for c in fleet})
        rng = _rng(7)
        chosen = [d for r in range(1, 21)
                  for d in policy.select(fleet, 2, round_index=r, deadline_s=deadline_s, rng=rng)]
        return sum(1 for d in chosen if d >= "d04")

    assert slow_picks(None) > 0
    assert slow_picks(2.0) == 0
    with pytest.raises(ConfigError):
        OortPolicy(preferred_quantile=0.0)


def test_oort_gives_no_utility_to_a_device_that_cannot_make_the_deadline() -> None:
    # d03 has by far the highest loss but needs 12 s: under a 10 s deadline its update
    # would be discarded, so it must not be chosen however slightly it is over.
    fleet = _fleet([1.0, 1.0, 1.0, 12.0])
    policy = OortPolicy(exploration=0.0, min_exploration=0.0, preferred_duration_s=10.0)
    _explored(policy, fleet, {"d00": 0.1, "d01": 0.1, "d02": 0.1, "d03": 9.0})
    utils = policy.utilities(fleet, round_index=1, preferred_s=10.0, deadline_s=10.0)
    assert utils["d03"] == 0.0 and utils["d00"] > 0.0
    rng = _rng(2)
    picks = [d for r in range(1, 31)
             for d in policy.select(fleet, 2, round_index=r, deadline_s=10.0, rng=rng)]
    assert "d03" not in picks
    assert "d03" in policy.select(fleet, 2, round_index=31, deadline_s=None, rng=rng)


def test_oort_does_not_keep_exploring_a_device_that_missed() -> None:
    # A device that missed never reports a loss; it must count as explored (zero
    # statistical utility), not stay in the unexplored pool that exploration draws from.
    fleet = _fleet([1.0] * 8)
    policy = OortPolicy(exploration=0.5, exploration_decay=1.0, min_exploration=0.5)
    counts: Counter[str] = Counter()
    for r in range(40):
        chosen = policy.select(fleet, 2, round_index=r, deadline_s=5.0, rng=_rng(r))
        counts.update(chosen)
        for device_id in chosen:
            if device_id == "d00":
                policy.feedback(device_id, duration_s=None, completed=False)
            else:
                policy.feedback(device_id, duration_s=1.0, completed=True, loss=1.0)
    assert policy.explored(fleet[0])
    assert counts["d00"] <= 2  # once by exploration; its correction then keeps it out


def test_oort_reads_losses_from_the_history_it_is_handed() -> None:
    """The aggregator hands its registry's history: what the devices did before this
    policy existed (a restart, another policy) counts, and the policy records nothing."""
    fleet = [Candidate(device_id=d, predicted_duration_s=1.0, num_samples=100) for d in "abc"]
    history = FleetHistory()
    for device, loss in (("a", 3.0), ("b", 0.1), ("c", 0.1)):
        history.selected([device], 0)
        history.finished(device, completed=True, duration_s=1.0, loss=loss)
    policy = OortPolicy(exploration=0.0, min_exploration=0.0)
    policy.use_history(history)
    assert policy.select(fleet, 1, round_index=1, rng=_rng()) == ["a"]
    policy.feedback("a", duration_s=1.0, completed=True, loss=0.2)
    assert history.get("a").selections == 1 and history.get("a").last_loss == 3.0


# -- adapting local work -----------------------------------------------------------------------


def test_local_steps_fit_the_deadline() -> None:
    assert local_steps(10.0, step_time_s=0.5, fixed_s=2.0, max_steps=100) == 16
    assert local_steps(10.0, step_time_s=0.5, fixed_s=2.0, max_steps=5) == 5
    assert local_steps(10.0, step_time_s=0.5, fixed_s=9.8, max_steps=5) == 0
    assert local_steps(10.0, step_time_s=0.5, fixed_s=9.0, max_steps=5, min_steps=3) == 0
    assert local_steps(10.0, step_time_s=0.5, fixed_s=12.0, max_steps=5) == 0
    with pytest.raises(ConfigError):
        local_steps(10.0, step_time_s=0.0, max_steps=5)


def test_slow_devices_get_fewer_steps_not_dropped() -> None:
    task = Task.for_model("mlp-xl", n_samples=8000, epochs=1, batch_size=32)
    fast = predict(get_profile("phone-high"), task)
    slow = predict(get_profile("pi-zero-2w"), task)
    deadline = slow.fixed_s + slow.train_s / 2  # room for half of the slow device's work
    assert fast.total_s < deadline
    assert local_steps_for(fast, deadline) == task.steps
    slow_steps = local_steps_for(slow, deadline)
    assert slow_steps == pytest.approx(task.steps / 2, abs=1)
    # A learned 2x correction halves the work that fits.
    assert local_steps_for(slow, deadline, factor=2.0) < slow_steps


# -- persistence ------------------------------------------------------------------------------


def test_policy_state_round_trips_through_json() -> None:
    import json

    fleet = _fleet([1.0, 2.0, 30.0, 4.0])
    for make in (lambda: OortPolicy(exploration=0.5),
                 lambda: TieredPolicy(num_tiers=2, credits=2),
                 lambda: DeadlinePolicy(sampling="random", exploration=0.5)):
        policy = make()
        for r in range(5):
            for device_id in policy.select(fleet, 2, round_index=r, deadline_s=10.0, rng=_rng(r)):
                late = device_id == "d02"
                policy.feedback(device_id, duration_s=None if late else 1.5, completed=not late,
                                loss=None if late else 0.5, num_samples=80)
        policy.select(fleet, 2, round_index=5, deadline_s=10.0, rng=_rng(5))  # feedback pending
        saved = json.loads(json.dumps(policy.state()))
        restored = make()
        restored.load_state(saved)
        restored.use_history(policy.history)  # histories are their owner's to save
        assert restored.state() == policy.state()
        assert (restored.select(fleet, 2, round_index=6, deadline_s=10.0, rng=_rng(6))
                == policy.select(fleet, 2, round_index=6, deadline_s=10.0, rng=_rng(6)))
    with pytest.raises(ConfigError, match="malformed"):
        RandomPolicy().load_state({"policy": "random", "pending": {"d00": ["soon", None]}})
