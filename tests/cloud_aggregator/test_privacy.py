"""Central differential privacy: the accountant, the noise, adaptive clipping, the budget,
resume, and the configurations refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import devices, make
from dp_accounting import (
    GaussianDpEvent,
    NeighboringRelation,
    PoissonSampledDpEvent,
    pld,
    rdp,
)

from broker_bridge import MemoryBroker
from cloud_aggregator import AggregatorConfig, CentralDP, PrivacyBudgetExhausted
from cloud_aggregator._aggregate import Contribution
from cloud_aggregator._privacy import ORDERS, PrivacyPlan, epsilon_for, make_plan, noise_for
from device_profiles import ConfigError


def _plan(**kw: object) -> PrivacyPlan:
    fields: dict[str, object] = dict(
        epsilon=None, delta=1e-5, noise_multiplier=1.0, rounds=10, asked=10, population=None,
        selection="random", clipping="fixed", clip_norm=1.0, target_quantile=0.5,
        clip_lr=0.2, count_stddev=None)
    fields.update(kw)
    return make_plan(**fields)  # type: ignore[arg-type]


def _independent_rdp(z: float, rounds: list[tuple[float, int]], delta: float,
                     orders: list[float]) -> float:
    """dp_accounting's RDP accountant, composed round by round."""
    acc = rdp.RdpAccountant(orders=orders,
                            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    for q, n in rounds:
        for _ in range(n):  # round by round, not self-composed
            acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)) if q < 1 else
                        GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))


def _pld(z: float, rounds: list[tuple[float, int]], delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    for q, n in rounds:
        acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), n)
    return float(acc.get_epsilon(delta))


# -- the accountant ------------------------------------------------------------------


def test_epsilon_after_rounds_matches_dp_accounting() -> None:
    plan = _plan(noise_multiplier=1.1, rounds=40, asked=13, population=100)
    dp = CentralDP(plan)
    charged = [(0.13, 25), (0.2, 5)]
    for q, n in charged:
        for _ in range(n):
            dp.charge(dp.noised(np.zeros(4), counted=1, unclipped=1, clip_norm=1.0), q)
    same_orders = _independent_rdp(1.1, charged, 1e-5, orders=list(ORDERS))
    assert dp.epsilon == pytest.approx(same_orders, rel=1e-9)
    # RDP bounds epsilon from above; the PLD accountant is tighter, never looser.
    tight = _pld(1.1, charged, 1e-5)
    assert tight <= dp.epsilon <= 1.6 * tight
    assert dp.rounds_spent == 30


def test_noise_is_calibrated_to_the_budget() -> None:
    z = noise_for(epsilon=4.0, delta=1e-5, rounds=50, q=0.1)
    assert _independent_rdp(z, [(0.1, 50)], 1e-5, orders=list(ORDERS)) <= 4.0 + 1e-6
    assert _independent_rdp(0.98 * z, [(0.1, 50)], 1e-5, orders=list(ORDERS)) > 4.0
    plan = _plan(epsilon=4.0, noise_multiplier=None, rounds=50, asked=10, population=100)
    assert plan.noise_multiplier == pytest.approx(z) and plan.amplified
    assert plan.planned_epsilon == pytest.approx(4.0, rel=1e-3)


def test_without_a_random_sample_there_is_no_amplification() -> None:
    deadline = _plan(selection="deadline", population=1000, rounds=20)
    assert not deadline.amplified and deadline.sampling_rate == 1.0
    dp = CentralDP(deadline)
    assert dp.sampling_rate(asked=10, candidates=1000, selection="deadline") == 1.0
    assert deadline.planned_epsilon == pytest.approx(
        epsilon_for(noise_multiplier=1.0, rounds=[(1.0, 20)], delta=1e-5))


# -- the noise -----------------------------------------------------------------------


def test_the_noise_added_has_the_stated_variance() -> None:
    # 400,000 draws from the OS-seeded generator: the sample variance has a standard
    # error of sqrt(2 / n) = 0.0022, the mean 0.0016; the tolerances are ~14 of them.
    plan = _plan(noise_multiplier=1.3, clip_norm=0.7, asked=10)
    dp = CentralDP(plan)
    agg = dp.new_aggregate(400_000)
    agg.add(Contribution(indices=None, values=np.zeros(400_000, np.float32), weight=5.0,
                         norm=0.0))
    noise = agg.result().astype(np.float64) * plan.denominator / (1.3 * 0.7)
    assert abs(noise.mean()) < 0.02
    assert abs(noise.var() - 1.0) < 0.03
    assert dp.noise_std(0.7) == pytest.approx(1.3 * 0.7 / 10)


def test_adaptive_clipping_takes_its_share_of_the_noise_as_the_paper_says() -> None:
    plan = _plan(clipping="adaptive", noise_multiplier=1.0, asked=100, clip_norm=0.5)
    sigma_b = 100 / 20  # the default: devices asked / 20
    z_u = (1.0 ** -2 - (2 * sigma_b) ** -2) ** -0.5
    assert plan.count_stddev == sigma_b and plan.update_noise_multiplier == pytest.approx(z_u)
    agg = CentralDP(plan).new_aggregate(400_000)
    agg.add(Contribution(indices=None, values=np.zeros(400_000, np.float32), weight=1.0,
                         norm=0.0))
    noise = agg.result().astype(np.float64) * 100 / (z_u * 0.5)
    assert abs(noise.var() - 1.0) < 0.03


def test_the_sum_is_clipped_uniformly_weighted_and_divided_by_the_fixed_denominator() -> None:
    plan = _plan(noise_multiplier=0.8, clip_norm=1.0, asked=4)
    dp = CentralDP(plan, rng=np.random.default_rng(7))
    rng = np.random.default_rng(1)
    ups = [rng.standard_normal(50).astype(np.float32) * s for s in (0.01, 0.1, 3.0)]
    agg = dp.new_aggregate(50)
    for i, u in enumerate(ups):  # weights (sample counts) do not matter under DP
        norm = float(np.linalg.norm(u.astype(np.float64)))
        if i == 1:  # a sparse update adds the same as its dense form
            idx = np.flatnonzero(u)
            agg.add(Contribution(indices=idx, values=u[idx], weight=1e12, norm=norm))
        else:
            agg.add(Contribution(indices=None, values=u, weight=10.0 * (i + 1), norm=norm))
    clipped = [u.astype(np.float64) * min(1.0, 1.0 / np.linalg.norm(u.astype(np.float64)))
               for u in ups]
    np.testing.assert_allclose(agg.clipped_sum(), sum(clipped), atol=1e-6)
    expected_noise = np.random.default_rng(7).normal(0.0, 1.0, 50) * 0.8
    np.testing.assert_allclose(agg.result(), (sum(clipped) + expected_noise) / 4, atol=1e-6)
    assert agg.unclipped == 2  # norm ~21 is clipped; ~0.07 and ~0.7 are within


# -- adaptive clipping ----------------------------------------------------------------


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clipping_converges_to_the_target_quantile(quantile: float) -> None:
    m = 1000
    plan = _plan(clipping="adaptive", noise_multiplier=0.5, asked=m, clip_norm=0.05,
                 target_quantile=quantile)
    dp = CentralDP(plan, rng=np.random.default_rng(3))
    data = np.random.default_rng(4)
    sigma = 0.5  # update norms: lognormal with median 2
    for _ in range(120):
        agg = dp.new_aggregate(2)
        for norm in np.exp(np.log(2.0) + sigma * data.standard_normal(m)):
            agg.add(Contribution(indices=None, values=np.array([norm, 0.0], np.float32),
                                 weight=1.0, norm=float(norm)))
        agg.result()
        assert agg.release is not None
        dp.charge(agg.release, 1.0)
    z = {0.5: 0.0, 0.9: 1.2816}[quantile]
    true_quantile = 2.0 * math.exp(sigma * z)
    assert dp.clip_norm == pytest.approx(true_quantile, rel=0.1)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "why"), [
    ({"robust": "median"}, "robust = median"),
    ({"robust": "multi_krum"}, "one device can change the output"),
    ({"mode": "async"}, "sync rounds only"),
    ({"selection": "oort"}, "training loss they report"),
    ({"federated_eval": True}, "without noise"),
    ({"dp_clipping": "fixed"}, "needs clip_norm"),
    ({"dp_population": 50, "dp_delta": 0.05}, "below 1 / dp_population"),
    ({"dp_noise_multiplier": 0.3, "rounds": 100}, "the plan cannot fit"),
    ({"dp_clip_count_stddev": 0.1}, "dp_clip_count_stddev"),
    ({"secure_aggregation": True, "dp_clipping": "adaptive"}, "adaptive clipping"),
    ({"secure_aggregation": True, "dp_noise_multiplier": 0.3, "rounds": 100},
     "the plan cannot fit"),
    ({"secure_aggregation": True, "devices_per_round": 5_000_000, "over_selection": 1.0},
     "cannot sum in a 32-bit word"),
])
def test_combinations_that_break_the_guarantee_are_refused(
        settings: dict[str, object], why: str) -> None:
    fields: dict[str, object] = {"dp_epsilon": 2.0}
    fields.update(settings)
    with pytest.raises(ConfigError, match=why):
        AggregatorConfig(**fields)  # type: ignore[arg-type]


def test_dp_settings_without_dp_are_refused_and_dp_turns_the_screen_off() -> None:
    with pytest.raises(ConfigError, match="differential privacy is off"):
        AggregatorConfig(dp_population=100)
    assert AggregatorConfig().screen_multiple == 4.0
    config = AggregatorConfig(dp_noise_multiplier=1.0)
    assert config.screen_multiple is None
    plan = config.privacy_plan()
    assert plan is not None and plan.clipping == "adaptive" and not plan.amplified


# -- the aggregator -------------------------------------------------------------------


def test_training_stops_cleanly_when_the_next_round_would_pass_the_budget(
        tmp_path: Path, artifacts: Path) -> None:
    # Planned for 10 rounds with 3 of a population of 6 asked (q = 0.5); only 3 devices
    # are online, so every round is really charged at q = 1 and the budget runs out early.
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=10, dp_epsilon=8.0, dp_population=6,
               dp_clipping="fixed", clip_norm=0.05)
    assert agg.privacy is not None and agg.privacy.plan.sampling_rate == pytest.approx(0.5)
    for _ in range(10):
        if not agg.tick():  # no round opened: the budget is spent
            break
        for dev in fleet.values():
            dev.send_update(layout=agg.layout)
        assert agg.tick()
    assert agg.done and agg.failure is None
    assert agg.finished is not None and "privacy budget reached" in agg.finished
    assert 1 <= agg.model_version < 10
    z = agg.privacy.plan.noise_multiplier
    spent = _independent_rdp(z, [(1.0, agg.model_version)], 1e-5, orders=list(ORDERS))
    one_more = _independent_rdp(z, [(1.0, agg.model_version + 1)], 1e-5, orders=list(ORDERS))
    assert spent <= 8.0 < one_more  # stopped exactly where the next round would not fit
    rows = agg.metrics_log.read()
    eps = [r["dp_epsilon"] for r in rows]
    assert len(rows) == agg.model_version and eps == sorted(eps)
    assert eps[-1] == pytest.approx(spent) == pytest.approx(agg.privacy.epsilon)
    assert all(r["dp_clip_norm"] == 0.05 for r in rows)
    with pytest.raises(PrivacyBudgetExhausted, match="above dp_epsilon"):
        agg.privacy.check_budget(1.0)
    assert not agg.tick()  # nothing more opens


def test_a_restarted_aggregator_keeps_the_privacy_spent(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    settings: dict[str, object] = {"rounds": 4, "dp_noise_multiplier": 2.0,
                                   "dp_clip_count_stddev": 2.0}
    agg = make(tmp_path, artifacts, broker, **settings)
    for _ in range(2):
        assert agg.tick()
        for dev in fleet.values():
            dev.send_update(layout=agg.layout)
        assert agg.tick()
    assert agg.privacy is not None
    spent, clip = agg.privacy.epsilon, agg.privacy.clip_norm
    assert clip != agg.privacy.plan.clip_norm  # adaptive clipping moved the bound
    assert agg.tick()  # round 3 opens; one update arrives, then the aggregator stops
    fleet["d0"].send_update(layout=agg.layout)
    agg.close()

    again = make(tmp_path, artifacts, broker, **settings)
    assert again.privacy is not None
    assert again.privacy.epsilon == spent and again.privacy.clip_norm == clip
    assert again.privacy.rounds_spent == 2 and again.round_index == 3
    for dev in list(fleet.values())[1:]:
        dev.send_update(layout=again.layout)
    assert again.tick()
    assert again.model_version == 3
    assert again.privacy.epsilon == pytest.approx(
        _independent_rdp(2.0, [(1.0, 3)], 1e-5, orders=list(ORDERS)))
    assert again.metrics_log.read()[-1]["dp_epsilon"] == pytest.approx(again.privacy.epsilon)
    again.close()
    # Other privacy settings on this state dir would charge the past wrongly: refused.
    with pytest.raises(ConfigError, match="noise multiplier"):
        make(tmp_path, artifacts, broker, rounds=4, dp_noise_multiplier=3.0,
             dp_clip_count_stddev=2.0)


def test_a_strategy_that_does_not_charge_the_accountant_is_refused(
        tmp_path: Path, artifacts: Path) -> None:
    from cloud_aggregator import FedBuff

    with pytest.raises(ConfigError, match="does not charge its releases"):
        make(tmp_path, artifacts, MemoryBroker(), dp_noise_multiplier=1.0,
             dp_clip_count_stddev=1.0, strategy=FedBuff())
