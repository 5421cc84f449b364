"""Robust aggregation vs plain numpy, and under a 20% sign-flip-x10 attack."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_aggregator._aggregation import Reason, StreamingAccumulator
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._robust import (
    RobustBuffer,
    RobustConfig,
    clip_by_norm,
    coordinate_median,
    krum,
    krum_scores,
    krum_select,
    multi_krum,
    pairwise_sq_distances,
    robust_aggregate,
    robust_memory_bytes,
    trimmed_mean,
)
from device_profiles._errors import ConfigError


def _matrix(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, d)).astype(np.float32)


# --------------------------------------------------------------------------- references


def test_clip_by_norm() -> None:
    u = np.array([3.0, 4.0], np.float32)
    np.testing.assert_allclose(clip_by_norm(u, 1.0), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clip_by_norm(u, 10.0), u)
    assert clip_by_norm(u, 1.0) is not u


def test_clipping_in_streaming_matches_reference() -> None:
    x = _matrix(20, 50, seed=1) * np.arange(1, 21, dtype=np.float32)[:, None]
    acc = StreamingAccumulator(size=50)
    for row in x:
        acc.add(clip_by_norm(row, 5.0), 1.0)
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    ref = (x * np.minimum(1.0, 5.0 / norms)).mean(axis=0)
    np.testing.assert_allclose(acc.result(), ref, rtol=1e-5, atol=1e-6)


def test_median_matches_numpy_with_small_blocks() -> None:
    x = _matrix(9, 101, seed=2)
    np.testing.assert_allclose(coordinate_median(x, block=16), np.median(x, axis=0), rtol=1e-6)
    x = _matrix(10, 33, seed=3)  # even n: mean of the two middle values
    np.testing.assert_allclose(coordinate_median(x, block=7), np.median(x, axis=0), rtol=1e-6)


@pytest.mark.parametrize(("n", "beta"), [(10, 0.2), (11, 0.1), (7, 0.0), (20, 0.45)])
def test_trimmed_mean_matches_sorted_reference(n: int, beta: float) -> None:
    x = _matrix(n, 77, seed=n)
    k = int(np.floor(beta * n))
    ref = np.sort(x.astype(np.float64), axis=0)[k : n - k].mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(x, beta, block=10), ref, rtol=1e-5, atol=1e-6)


def test_gram_distances_match_direct_loops() -> None:
    x = _matrix(12, 300, seed=4)
    ref = np.array([[np.sum((a.astype(np.float64) - b) ** 2) for b in x] for a in x])
    np.testing.assert_allclose(pairwise_sq_distances(x, block=64), ref, rtol=1e-9, atol=1e-8)


def test_krum_matches_reference_scores() -> None:
    x = _matrix(11, 40, seed=5)
    f = 3
    n = len(x)
    ref_scores = []
    for i in range(n):
        dists = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        ref_scores.append(sum(dists[: n - f - 2]))
    got = krum_scores(pairwise_sq_distances(x), f)
    np.testing.assert_allclose(got, ref_scores, rtol=1e-6)
    best = int(np.argmin(ref_scores))
    np.testing.assert_array_equal(krum(x, f=f), x[best])
    order = np.argsort(ref_scores)[:4]
    assert krum_select(x, f=f, m=4) == tuple(int(i) for i in order)
    ref_mean = x[order].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(multi_krum(x, f=f, m=4), ref_mean, rtol=1e-6, atol=1e-7)


def test_krum_needs_enough_updates() -> None:
    with pytest.raises(AggregatorError, match="at least 9"):
        krum(_matrix(8, 5), f=3)


# --------------------------------------------------------------------------- attack


def _attacked(seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """50 updates around a common direction; the first 20% are sign-flipped and x10."""
    rng = np.random.default_rng(seed)
    n, d, n_bad = 50, 400, 10
    direction = rng.normal(0, 1, d)
    honest = (direction + rng.normal(0, 0.5, (n, d))).astype(np.float32)
    attacked = honest.copy()
    attacked[:n_bad] *= -10.0
    clean_mean = honest[n_bad:].astype(np.float64).mean(axis=0)
    return attacked, clean_mean, n_bad


@pytest.mark.parametrize(
    "config",
    [
        RobustConfig(method="median"),
        RobustConfig(method="trimmed_mean", trim_fraction=0.2),
        RobustConfig(method="krum", byzantine=10),
        RobustConfig(method="multi_krum", byzantine=10),
        RobustConfig(method="mean", clip_norm=25.0),
    ],
    ids=lambda c: f"{c.method}{'-clip' if c.clip_norm else ''}",
)
def test_robust_rules_resist_sign_flip_attack(config: RobustConfig) -> None:
    attacked, clean, n_bad = _attacked()
    scale = float(np.linalg.norm(clean))
    plain = attacked.astype(np.float64).mean(axis=0)
    assert np.linalg.norm(plain - clean) > 1.5 * scale  # the attack works on a plain mean
    buf = RobustBuffer(size=attacked.shape[1], max_updates=64, max_bytes=1 << 22, config=config)
    for row in attacked:
        assert buf.add(row).ok
    agg = buf.aggregate()
    # Krum picks one honest update (noise 0.5 x sqrt(d)); clipping bounds but does not
    # remove the attackers' pull. Each margin is far below the plain mean's error.
    margin = {"krum": 0.6, "mean": 0.8}.get(config.method, 0.25)
    assert np.linalg.norm(agg - clean) < margin * scale, config.method
    if config.uses_krum:
        chosen = krum_select(attacked, f=10, m=40 if config.method == "multi_krum" else 1)
        assert min(chosen) >= n_bad  # no attacker selected


def test_robust_mean_is_weighted_fedavg() -> None:
    x = _matrix(6, 20, seed=7)
    w = np.arange(1, 7, dtype=np.float64)
    got = robust_aggregate(x, RobustConfig(method="mean"), weights=w)
    np.testing.assert_allclose(got, np.average(x, axis=0, weights=w), rtol=1e-6)


# --------------------------------------------------------------------------- bounds


def test_buffer_refuses_past_max_updates_as_data() -> None:
    buf = RobustBuffer(size=10, max_updates=4, max_bytes=10_000, config=RobustConfig())
    for i in range(4):
        assert buf.add(np.full(10, i, np.float32)).ok
    verdict = buf.add(np.zeros(10, np.float32))
    assert verdict.reason is Reason.BUFFER_FULL and buf.count == 4
    assert buf.add(np.zeros(3, np.float32)).reason is Reason.BUFFER_FULL
    buf.reset()
    assert buf.add(np.zeros(3, np.float32)).reason is Reason.WRONG_SIZE
    assert buf.add(np.zeros(10, np.float32), weight=-1).reason is Reason.BAD_WEIGHT


def test_buffer_construction_enforces_max_bytes() -> None:
    assert robust_memory_bytes(size=1000, max_updates=100, krum=False) == 400_000
    assert robust_memory_bytes(size=1000, max_updates=100, krum=True) == 560_000
    RobustBuffer(size=1000, max_updates=100, max_bytes=400_000, config=RobustConfig())
    with pytest.raises(AggregatorError, match="max_bytes"):
        RobustBuffer(
            size=1000,
            max_updates=100,
            max_bytes=400_000,
            config=RobustConfig(method="krum", byzantine=1),
        )


def test_buffer_aggregate_needs_min_updates() -> None:
    buf = RobustBuffer(
        size=4, max_updates=10, max_bytes=10_000, config=RobustConfig(method="krum", byzantine=2)
    )
    for _ in range(6):
        buf.add(np.zeros(4, np.float32))
    with pytest.raises(AggregatorError, match="needs 7"):
        buf.aggregate()


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        RobustConfig(method="average")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RobustConfig(trim_fraction=0.5)
    with pytest.raises(ConfigError):
        trimmed_mean(_matrix(4, 3), 0.6)
