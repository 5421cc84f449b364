"""The device side of distributed DP (``broker_bridge._skellam``): the noise each device
adds has the stated variance, the sum of n devices' noise has n times it, conditional
rounding keeps the norm bound and is unbiased, and the setup's DP extension round-trips
and refuses what breaks its bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker_bridge._errors import SecAggRejected
from broker_bridge._secagg_msg import Setup, parse
from broker_bridge._skellam import (
    EXTENSION,
    MAX_DEVICE_VARIANCE,
    SkellamParams,
    conditional_round,
    l1_bound,
    noise_rng,
    norm_bound,
    privatize,
    skellam,
    wrap_margin,
)


def _sample_var_ok(x: np.ndarray, variance: float, *, sigmas: float = 6.0) -> None:
    """The sample variance is within ``sigmas`` standard errors of ``variance`` (the
    standard error of a sample variance: variance sqrt(2 / n) for near-Gaussian data,
    plus the kurtosis of a Skellam variable, 1 / variance, which is small here)."""
    n = len(x)
    se = variance * math.sqrt(2.0 / n + 1.0 / (variance * n))
    assert abs(float(np.var(x)) - variance) < sigmas * se, (np.var(x), variance, se)
    assert abs(float(np.mean(x))) < sigmas * math.sqrt(variance / n)


@pytest.mark.parametrize("variance", [0.5, 7.0, 3e6, MAX_DEVICE_VARIANCE])
def test_one_devices_noise_has_the_stated_variance(variance: float) -> None:
    rng = np.random.default_rng(1)
    noise = skellam(variance, 400_000, rng)
    assert noise.dtype == np.int64
    _sample_var_ok(noise.astype(np.float64), variance)
    # symmetric Skellam: P(0) = exp(-v) I_0(v) (v = 2 mu), checked at a small variance
    if variance < 1:
        mu = variance / 2
        p0 = math.exp(-2 * mu) * sum((mu ** k / math.factorial(k)) ** 2 for k in range(30))
        assert abs(float(np.mean(noise == 0)) - p0) < 6 * math.sqrt(p0 * (1 - p0) / len(noise))


def test_the_sum_of_n_devices_noise_has_the_full_variance() -> None:
    params = SkellamParams(clip=1.0, norm_bound=1e9, device_variance=40.0)
    n, words = 12, 60_000
    zeros = np.zeros(words, np.float32)
    draws = [privatize(zeros, params, 1024.0) for _ in range(n)]  # each from os.urandom
    assert all(not d.rounded.any() for d in draws)
    total = np.sum([d.noise for d in draws], axis=0).astype(np.float64)
    _sample_var_ok(total, n * params.device_variance)
    for d in draws[:3]:
        _sample_var_ok(d.noise.astype(np.float64), params.device_variance)
    # independent devices: no two draw the same noise
    assert not np.array_equal(draws[0].noise, draws[1].noise)


def test_the_noise_generator_is_seeded_from_the_os_not_a_known_seed() -> None:
    a, b = noise_rng(), noise_rng()
    assert not np.array_equal(a.integers(0, 2**32, 8), b.integers(0, 2**32, 8))


@pytest.mark.parametrize("dim", [1, 10, 5000])
def test_conditional_rounding_keeps_the_norm_bound(dim: int) -> None:
    rng = np.random.default_rng(dim)
    clip, scale = 1.0, 64.0
    bound = norm_bound(clip=clip, scale=scale, dim=dim)
    assert clip * scale <= bound <= clip * scale + math.sqrt(dim)
    for _ in range(200):
        x = rng.normal(size=dim)
        x *= clip * scale / np.linalg.norm(x)  # on the clipping sphere: the worst case
        levels = conditional_round(x, bound, rng)
        assert float(np.linalg.norm(levels)) <= bound + 1e-9
        assert np.all(np.abs(levels - x) < 1.0)
    assert l1_bound(bound, dim) <= min(bound ** 2, math.sqrt(dim) * bound) + 1e-9


def test_conditional_rounding_is_unbiased_and_falls_back_within_the_bound() -> None:
    rng = np.random.default_rng(3)
    x = np.array([0.25, -1.75, 3.5, 0.0])
    mean = np.mean([conditional_round(x, 100.0, rng) for _ in range(40_000)], axis=0)
    assert np.allclose(mean, x, atol=0.02)
    # a bound no draw can meet, but the truncation does: the truncation
    tight = float(np.linalg.norm(np.trunc(x)))
    out = conditional_round(x, tight, rng)
    assert float(np.linalg.norm(out)) <= tight


def test_privatize_clips_to_the_l2_bound_before_rounding() -> None:
    params = SkellamParams(clip=0.5, norm_bound=norm_bound(clip=0.5, scale=256.0, dim=100),
                           device_variance=1e-9)
    values = np.full(100, 3.0, np.float32)  # norm 30, far above the clip
    out = privatize(values, params, 256.0)
    assert float(np.linalg.norm(out.rounded)) <= params.norm_bound
    assert abs(float(np.linalg.norm(out.rounded)) - 0.5 * 256) < 10


def test_the_wrap_margin_covers_the_noise_tail() -> None:
    rng = np.random.default_rng(5)
    variance = 1e6
    margin = wrap_margin(variance, words=1000, failure_bits=10)
    draws = skellam(variance, 200_000, rng)
    assert np.max(np.abs(draws)) < margin
    assert margin > 3 * math.sqrt(variance)


def test_the_setup_carries_the_dp_extension_and_refuses_a_bad_one() -> None:
    dp = SkellamParams(clip=0.1, norm_bound=2.7e7, device_variance=3.25e11)
    setup = Setup(round=3, session=bytes(range(16)), clip=0.1, scale=2.0**28, fraction=0.5,
                  max_devices=14, size=1000, subset_seed=bytes(32), dp=dp)
    raw = setup.to_bytes()
    assert len(raw) == len(Setup(round=3, session=bytes(range(16)), clip=0.1, scale=2.0**28,
                                 fraction=0.5, max_devices=14, size=1000,
                                 subset_seed=bytes(32)).to_bytes()) + EXTENSION.size
    back = parse(raw)
    assert isinstance(back, Setup) and back.dp == dp and back == setup
    bad = raw[:-8] + np.float64(-1.0).tobytes()
    with pytest.raises(SecAggRejected, match="DP extension"):
        parse(bad)
    too_wide = raw[:-8] + np.float64(MAX_DEVICE_VARIANCE * 2).tobytes()
    with pytest.raises(SecAggRejected, match="DP extension"):
        parse(too_wide)
    for bad_dp in (SkellamParams(clip=0.2, norm_bound=2.5e7, device_variance=1.0),
                   SkellamParams(clip=0.1, norm_bound=0.1 * 2.0**28 - 1, device_variance=1.0)):
        with pytest.raises(SecAggRejected, match="DP clip"):
            parse(Setup(round=3, session=bytes(range(16)), clip=0.1, scale=2.0**28,
                        fraction=0.5, max_devices=14, size=1000, subset_seed=bytes(32),
                        dp=bad_dp).to_bytes())
    with pytest.raises(SecAggRejected, match="setup body size"):
        parse(raw[:-1])
