"""Distributed DP's accounting (``cloud_aggregator._skellam_dp`` through ``CentralDP``):
the Skellam RDP epsilon matches an independent computation (the bound written out here,
converted by dp_accounting), approaches the Gaussian's where the Skellam mechanism should,
charges each round with the devices it summed, stops at the budget and survives a
restart; the plan's levels and noise fit the 32-bit sum; a whole in-process secure round
with DP sums exactly the devices' noisy levels."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, NeighboringRelation, rdp
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from secagg_fleet import rng_bytes

from broker_bridge._secagg_device import SecAggDevice
from broker_bridge._secagg_msg import Setup, parse
from broker_bridge._skellam import MAX_DEVICE_VARIANCE, privatize, wrap_margin
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._privacy import ORDERS, CentralDP, RoundRelease
from cloud_aggregator._secagg import SecAggRound
from cloud_aggregator._skellam_dp import DIM_BOUND, SUM_LIMIT, skellam_epsilon


def independent_epsilon(rounds: list[tuple[float, int]], l1: float, l2: float,
                        delta: float) -> float:
    """Agarwal et al. 2021's bound, order by order, in plain Python."""
    total = [0.0] * len(ORDERS)
    for variance, count in rounds:
        for i, a in enumerate(ORDERS):
            first = a * l2 ** 2 / (2 * variance)
            second = min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2),
                         3 * l1 / (2 * variance))
            total[i] += count * (first + second)
    return float(compute_epsilon(list(ORDERS), total, delta)[0])


def config(**kw: object) -> AggregatorConfig:
    fields: dict[str, object] = {"secure_aggregation": True, "dp_epsilon": 8.0,
                                 "dp_delta": 1e-5, "rounds": 4, "devices_per_round": 5}
    fields.update(kw)
    return AggregatorConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("variance", "l1", "l2", "rounds"),
                         [(50.0, 30.0, 6.0, 3), (1e4, 400.0, 40.0, 20), (7.0, 9.0, 3.0, 1)])
def test_skellam_epsilon_matches_an_independent_computation(
        variance: float, l1: float, l2: float, rounds: int) -> None:
    got = skellam_epsilon([(variance, rounds)], l1=l1, l2=l2, delta=1e-5)
    assert got == pytest.approx(independent_epsilon([(variance, rounds)], l1, l2, 1e-5),
                                rel=1e-12)
    # the Skellam bound is never below the Gaussian with the same variance
    acc = rdp.RdpAccountant(list(ORDERS), NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(GaussianDpEvent(math.sqrt(variance) / l2), rounds)
    assert got >= acc.get_epsilon(1e-5) * (1 - 1e-9)


def test_at_a_fine_scale_skellam_spends_what_the_gaussian_does() -> None:
    plan = config().privacy_plan()
    assert plan is not None and plan.skellam is not None
    sk = plan.skellam
    acc = rdp.RdpAccountant(list(ORDERS), NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(GaussianDpEvent(plan.noise_multiplier), plan.rounds)
    assert plan.planned_epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
    assert plan.planned_epsilon <= 8.0 * (1 + 1e-9)
    assert sk.variance == pytest.approx((plan.noise_multiplier * sk.norm_bound) ** 2)
    assert sk.device_variance == pytest.approx(sk.variance / (sk.min_summed - 1))


def test_the_plans_levels_and_noise_fit_the_32_bit_sum() -> None:
    for kw in ({}, {"devices_per_round": 50, "quorum": 3}, {"clip_norm": 2.0},
               {"dp_epsilon": 0.5, "rounds": 100}):
        cfg = config(**kw)
        plan = cfg.privacy_plan()
        assert plan is not None and plan.skellam is not None
        sk = plan.skellam
        fixed = cfg.secure_fixed_point()
        assert fixed.scale == sk.scale and fixed.clip == sk.clip
        worst = (cfg.secure_max_devices * math.ceil(sk.clip * sk.scale)
                 + wrap_margin(cfg.secure_max_devices * sk.device_variance, DIM_BOUND))
        assert worst <= SUM_LIMIT
        assert sk.device_variance <= MAX_DEVICE_VARIANCE
        # and the next scale up would not fit (the finest that does)
        doubled = (cfg.secure_max_devices * math.ceil(sk.clip * sk.scale * 2)
                   + wrap_margin(cfg.secure_max_devices * sk.device_variance * 4, DIM_BOUND))
        assert doubled > SUM_LIMIT or sk.device_variance * 4 > MAX_DEVICE_VARIANCE
        assert sk.min_summed == max(3, cfg.effective_quorum)


def release(summed: int) -> RoundRelease:
    return RoundRelease(delta=np.zeros(1, np.float32), counted=summed, unclipped=0,
                        noisy_unclipped_share=None, next_clip_norm=0.1)


def test_each_round_is_charged_with_the_devices_it_summed_less_one() -> None:
    plan = config(dp_epsilon=None, dp_noise_multiplier=1.0, rounds=10).privacy_plan()
    assert plan is not None and plan.skellam is not None
    sk = plan.skellam
    dp = CentralDP(plan)
    assert dp.epsilon == 0.0
    dp.charge(release(7), 1.0)
    dp.charge(release(3), 1.0)
    dp.charge(release(7), 1.0)
    v = sk.device_variance
    want = independent_epsilon([(6 * v, 2), (2 * v, 1)], sk.l1, sk.norm_bound, 1e-5)
    assert dp.epsilon == pytest.approx(want, rel=1e-12)
    # fewer summed devices, less noise: more epsilon for the same number of rounds
    more = CentralDP(plan)
    for _ in range(3):
        more.charge(release(3), 1.0)
    assert more.epsilon > dp.epsilon
    assert dp.noise_std(0.1) == pytest.approx(math.sqrt(7 * v) / sk.scale / 7)
    with pytest.raises(Exception, match="fewer than the 3"):
        dp.charge(release(2), 1.0)
    # a restart charges the same
    again = CentralDP(plan)
    again.load_state(dp.state())
    assert again.epsilon == pytest.approx(dp.epsilon) and again.rounds_spent == 3
    report = dp.report()
    assert report["mechanism"] == "skellam" and report["charged_by_summed"] == [[3, 1], [7, 2]]
    assert "zero-out" in report["guarantee"] and "Skellam" in report["guarantee"]


def test_the_budget_stops_a_round_that_could_pass_it() -> None:
    plan = config(rounds=3).privacy_plan()
    assert plan is not None and plan.skellam is not None
    dp = CentralDP(plan)
    for _ in range(3):
        assert dp.refusal(1.0) is None
        dp.charge(release(plan.skellam.min_summed), 1.0)
    assert dp.epsilon <= 8.0 * (1 + 1e-9)
    why = dp.refusal(1.0)
    assert why is not None and "privacy budget reached" in why


def test_a_private_secure_round_sums_exactly_the_devices_noisy_levels() -> None:
    cfg = config(devices_per_round=6, over_selection=1.0)
    plan = cfg.privacy_plan()
    assert plan is not None and plan.skellam is not None
    sk = plan.skellam
    rng = random.Random(0)
    words = 3000
    server = SecAggRound(fleet="f", round_index=1, clip=sk.clip, scale=sk.scale,
                         fraction=1.0, size=words, max_devices=cfg.secure_max_devices,
                         randbytes=rng_bytes(rng), randbelow=rng.randrange, dp=sk.params)
    setup = parse(server.setup.to_bytes())
    assert isinstance(setup, Setup) and setup.dp == sk.params
    names = [f"d{i}" for i in range(6)]
    devices = {d: SecAggDevice(fleet="f", setup=setup, randbytes=rng_bytes(rng),
                               randbelow=rng.randrange) for d in names}
    for d, dev in devices.items():
        server.on_advertise(d, dev.advertise())
    for d, keys in server.close_advertising().items():
        server.on_shares(d, devices[d].on_keys(keys))
    values = np.random.default_rng(2).normal(0, 0.01, (6, words)).astype(np.float32)
    private = {}
    for (d, deliver), x in zip(server.close_sharing().items(), values, strict=True):
        devices[d].on_deliver(deliver)
        private[d] = privatize(x, setup.dp, setup.scale)
        server.on_masked(d, parse(devices[d].masked(private[d].words).to_bytes()))  # type: ignore[arg-type]
    for d, request in server.close_upload().items():
        server.on_reveal(d, devices[d].on_unmask(request))
    total, counted = server.finish()
    assert counted == names
    levels = total.view(np.int32).astype(np.int64)
    rounded = np.sum([p.rounded for p in private.values()], axis=0)
    noise = np.sum([p.noise for p in private.values()], axis=0)
    assert np.array_equal(levels, rounded + noise)  # exactly, nothing lost or wrapped
    # the sum's noise has the full variance: 6 devices' share each
    var = float(np.var((levels - rounded).astype(np.float64)))
    assert var == pytest.approx(6 * sk.device_variance, rel=0.15)
    # and the decoded mean is the clipped mean plus noise of that size
    mean = levels / sk.scale / 6
    clean = rounded / sk.scale / 6
    assert np.std(mean - clean) == pytest.approx(sk.noise_std(6), rel=0.1)
