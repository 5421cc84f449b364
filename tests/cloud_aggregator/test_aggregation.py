"""Streaming aggregation, validation, FedBuff and server optimizers vs plain numpy."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_aggregator._aggregation import (
    AccumulatorSnapshot,
    FedBuffBuffer,
    Reason,
    StalenessPolicy,
    StreamingAccumulator,
    UpdateRules,
    check_staleness,
    fedavg,
    fedbuff_aggregate,
    staleness_discount,
    validate_update,
)
from cloud_aggregator._errors import AggregatorError, UpdateRejected
from cloud_aggregator._server_opt import (
    SERVER_OPTIMIZERS,
    make_server_optimizer,
)
from device_profiles._errors import ConfigError

D = 257


def _updates(n: int, seed: int = 0, d: int = D) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    ups = [rng.normal(0, 1, d).astype(np.float32) for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 500, n)]
    return ups, weights


# --------------------------------------------------------------------------- streaming


def test_streaming_equals_collect_all_then_average() -> None:
    ups, weights = _updates(40)
    acc = StreamingAccumulator(size=D)
    for u, w in zip(ups, weights, strict=True):
        acc.add(u, w)
    ref = np.average(np.stack(ups).astype(np.float64), axis=0, weights=weights)
    assert acc.count == 40
    assert acc.total_weight == pytest.approx(sum(weights))
    np.testing.assert_allclose(acc.result(), ref, rtol=1e-6, atol=1e-7)
    assert acc.result().dtype == np.float32


def test_fedavg_matches_loop_reference() -> None:
    ups, weights = _updates(12, seed=3)
    ref = np.zeros(D)
    for u, w in zip(ups, weights, strict=True):
        ref += w * u.astype(np.float64)
    ref /= sum(weights)
    np.testing.assert_allclose(fedavg(ups, weights), ref, rtol=1e-6, atol=1e-7)


def test_fedavg_equal_weights_is_plain_mean() -> None:
    ups, _ = _updates(7, seed=4)
    np.testing.assert_allclose(
        fedavg(ups, [1.0] * 7), np.mean(np.stack(ups), axis=0), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    cut=st.integers(0, 12),
)
def test_snapshot_resume_is_exact(n: int, seed: int, cut: int) -> None:
    ups, weights = _updates(n, seed=seed % 1000, d=33)
    cut = min(cut, n)
    straight = StreamingAccumulator(size=33)
    for u, w in zip(ups, weights, strict=True):
        straight.add(u, w)
    first = StreamingAccumulator(size=33)
    for u, w in zip(ups[:cut], weights[:cut], strict=True):
        first.add(u, w)
    resumed = StreamingAccumulator.from_bytes(first.to_bytes())
    for u, w in zip(ups[cut:], weights[cut:], strict=True):
        resumed.add(u, w)
    assert resumed.count == straight.count
    np.testing.assert_array_equal(resumed.result(), straight.result())  # bit for bit
    assert resumed.snapshot().weighted_sum.tobytes() == straight.snapshot().weighted_sum.tobytes()


def test_merge_equals_single_stream() -> None:
    ups, weights = _updates(10, seed=5)
    a, b, whole = (StreamingAccumulator(size=D) for _ in range(3))
    for i, (u, w) in enumerate(zip(ups, weights, strict=True)):
        (a if i % 2 else b).add(u, w)
        whole.add(u, w)
    a.merge(b)
    np.testing.assert_allclose(a.result(), whole.result(), rtol=1e-7)


def test_snapshot_rejects_corruption_and_truncation() -> None:
    acc = StreamingAccumulator(size=8)
    acc.add(np.ones(8, np.float32), 2.0)
    data = bytearray(acc.to_bytes())
    with pytest.raises(AggregatorError, match="checksum"):
        flipped = bytearray(data)
        flipped[30] ^= 0xFF
        AccumulatorSnapshot.from_bytes(bytes(flipped))
    with pytest.raises(AggregatorError, match="length"):
        AccumulatorSnapshot.from_bytes(bytes(data[:-9]))
    with pytest.raises(AggregatorError, match="magic"):
        AccumulatorSnapshot.from_bytes(b"X" * len(data))


def test_accumulator_refuses_misuse() -> None:
    acc = StreamingAccumulator(size=4)
    with pytest.raises(AggregatorError):
        acc.result()
    with pytest.raises(AggregatorError):
        acc.add(np.zeros(5, np.float32), 1.0)
    with pytest.raises(AggregatorError):
        acc.add(np.zeros(4, np.float32), 0.0)


# --------------------------------------------------------------------------- validation


def test_validation_verdicts() -> None:
    rules = UpdateRules(size=4, max_norm=10.0, median_multiple=3.0, min_history=3)
    ok = validate_update(np.array([3, 4, 0, 0], np.float32), rules=rules)
    assert ok.ok and ok.reason is Reason.OK and ok.norm == pytest.approx(5.0)
    cases = {
        Reason.WRONG_SIZE: np.zeros(5, np.float32),
        Reason.WRONG_SHAPE: np.zeros((2, 2), np.float32),
        Reason.WRONG_DTYPE: np.zeros(4, np.int32),
        Reason.NON_FINITE: np.array([0, np.nan, 0, 0], np.float32),
        Reason.NORM_ABOVE_CAP: np.array([0, 11, 0, 0], np.float32),
    }
    for reason, update in cases.items():
        verdict = validate_update(update, rules=rules)
        assert verdict.reason is reason and not verdict.ok, reason
    inf = validate_update(np.array([np.inf, 0, 0, 0], np.float32), rules=rules)
    assert inf.reason is Reason.NON_FINITE


def test_median_rule_waits_for_history_then_applies() -> None:
    rules = UpdateRules(size=2, median_multiple=3.0, min_history=3)
    big = np.array([7.0, 0.0], np.float32)  # norm 7 > 3 x median 2
    assert validate_update(big, rules=rules, accepted_norms=[2.0, 2.0]).ok
    verdict = validate_update(big, rules=rules, accepted_norms=[1.0, 2.0, 3.0])
    assert verdict.reason is Reason.NORM_ABOVE_MEDIAN
    assert validate_update(big, rules=rules, accepted_norms=[2.0, 2.5, 3.0]).ok  # 7 <= 7.5


def test_verdict_converts_to_typed_error() -> None:
    rules = UpdateRules(size=3)
    err = validate_update(np.zeros(2, np.float32), rules=rules).to_error(device_id="d1")
    assert isinstance(err, UpdateRejected)
    assert err.reason == "wrong_size" and err.device_id == "d1"


def test_rules_reject_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        UpdateRules(size=0)
    with pytest.raises(ConfigError):
        UpdateRules(size=3, max_norm=-1.0)


# --------------------------------------------------------------------------- FedBuff


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (StalenessPolicy(kind="sqrt"), lambda t: 1 / math.sqrt(1 + t)),
        (StalenessPolicy(kind="constant"), lambda t: 1.0),
        (StalenessPolicy(kind="polynomial", exponent=2.0), lambda t: (1 + t) ** -2.0),
    ],
)
def test_staleness_discount(policy: StalenessPolicy, expected: Callable[[int], float]) -> None:
    for tau in range(0, 12):
        assert staleness_discount(tau, policy) == pytest.approx(expected(tau), rel=1e-12)


def test_staleness_rule_as_data() -> None:
    policy = StalenessPolicy(max_staleness=3)
    assert check_staleness(trained_from=5, current_version=8, policy=policy).ok
    assert (
        check_staleness(trained_from=4, current_version=8, policy=policy).reason is Reason.TOO_STALE
    )
    assert (
        check_staleness(trained_from=9, current_version=8, policy=policy).reason
        is Reason.FROM_FUTURE
    )


def test_fedbuff_buffer_releases_every_k_with_staleness_weights() -> None:
    k = 4
    policy = StalenessPolicy(kind="sqrt", max_staleness=5)
    buf = FedBuffBuffer(size=D, buffer_size=k, policy=policy)
    ups, samples = _updates(9, seed=8)
    trained = [10, 9, 7, 10, 2, 8, 6, 10, 9]  # index 4 (staleness 8) is refused
    version = 10
    released: list[np.ndarray] = []
    taken: list[tuple[np.ndarray, float, int]] = []
    for u, n, v in zip(ups, samples, trained, strict=True):
        out = buf.add(u, samples=n, trained_from=v, current_version=version)
        if v == 2:
            assert out.verdict.reason is Reason.TOO_STALE and out.aggregate is None
            continue
        assert out.verdict.ok
        assert out.discount == pytest.approx(1 / math.sqrt(1 + version - v))
        taken.append((u, n, version - v))
        if out.aggregate is not None:
            released.append(out.aggregate)
    assert len(released) == 2 and buf.pending == 0
    for i, agg in enumerate(released):
        batch = taken[i * k : (i + 1) * k]
        num = sum(n / math.sqrt(1 + t) * u.astype(np.float64) for u, n, t in batch)
        ref = num / sum(n for _, n, _ in batch)
        np.testing.assert_allclose(agg, ref, rtol=1e-6, atol=1e-7)
        pure = fedbuff_aggregate(
            [u for u, _, _ in batch], [n for _, n, _ in batch], [t for _, _, t in batch], policy
        )
        np.testing.assert_allclose(agg, pure, rtol=1e-7)


def test_fedbuff_equal_samples_matches_paper_form() -> None:
    ups, _ = _updates(5, seed=9)
    tau = [0, 1, 2, 3, 4]
    policy = StalenessPolicy(kind="polynomial", exponent=0.75)
    ref = sum((1 + t) ** -0.75 * u.astype(np.float64) for u, t in zip(ups, tau, strict=True)) / 5
    got = fedbuff_aggregate(ups, [7.0] * 5, tau, policy)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_fedbuff_snapshot_restores_partial_buffer() -> None:
    ups, samples = _updates(3, seed=10)
    a = FedBuffBuffer(size=D, buffer_size=3)
    a.add(ups[0], samples=samples[0], trained_from=0, current_version=1)
    a.add(ups[1], samples=samples[1], trained_from=1, current_version=1)
    b = FedBuffBuffer(size=D, buffer_size=3)
    b.restore(AccumulatorSnapshot.from_bytes(a.snapshot().to_bytes()))
    out_a = a.add(ups[2], samples=samples[2], trained_from=1, current_version=1)
    out_b = b.add(ups[2], samples=samples[2], trained_from=1, current_version=1)
    assert out_a.aggregate is not None and out_b.aggregate is not None
    np.testing.assert_array_equal(out_a.aggregate, out_b.aggregate)


# --------------------------------------------------------------------------- server optimizers


def _reference_server(name: str, x0: np.ndarray, deltas: list[np.ndarray]) -> np.ndarray:
    """Reddi et al. Algorithm 2, written as plain loops in float64."""
    x = x0.astype(np.float64)
    lr = {"fedavg": 1.0, "fedavgm": 1.0}.get(name, 0.01)
    b1, b2, tau, mom = 0.9, 0.99, 1e-3, 0.9
    m = np.zeros_like(x)
    v = np.full_like(x, tau * tau)
    vel = np.zeros_like(x)
    for delta32 in deltas:
        d = delta32.astype(np.float64)
        if name == "fedavg":
            x = x + lr * d
            continue
        if name == "fedavgm":
            vel = mom * vel + d
            x = x + lr * vel
            continue
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_server_optimizers_match_reference(name: str) -> None:
    rng = np.random.default_rng(11)
    x0 = rng.normal(0, 1, 64).astype(np.float32)
    deltas = [rng.normal(0, 0.05, 64).astype(np.float32) for _ in range(6)]
    opt = make_server_optimizer(name)
    x = x0
    for d in deltas:
        x = opt.step(x, d)
    assert x.dtype == np.float32 and opt.steps == 6
    np.testing.assert_allclose(x, _reference_server(name, x0, deltas), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_server_optimizer_state_round_trips_exactly(name: str) -> None:
    rng = np.random.default_rng(12)
    x = rng.normal(0, 1, 32).astype(np.float32)
    deltas = [rng.normal(0, 0.1, 32).astype(np.float32) for _ in range(5)]
    straight = make_server_optimizer(name)
    xs = x
    for d in deltas:
        xs = straight.step(xs, d)
    first = make_server_optimizer(name)
    xr = x
    for d in deltas[:3]:
        xr = first.step(xr, d)
    resumed = make_server_optimizer(name)
    resumed.load_bytes(first.to_bytes())
    again = make_server_optimizer(name)
    again.load_state_dict(first.state_dict())
    xa = xr
    for d in deltas[3:]:
        xr = resumed.step(xr, d)
        xa = again.step(xa, d)
    np.testing.assert_array_equal(xr, xs)
    np.testing.assert_array_equal(xa, xs)
    assert resumed.steps == 5


def test_server_optimizer_options_and_errors() -> None:
    opt = make_server_optimizer("FedAdam", lr=0.1, tau=1e-2)
    assert opt.name == "fedadam" and opt.config.lr == 0.1
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        make_server_optimizer("sgd-with-vibes")
    with pytest.raises(ConfigError, match="bad option"):
        make_server_optimizer("fedavg", momentum=0.9)
    with pytest.raises(ConfigError):
        make_server_optimizer("fedyogi", beta2=1.5)
    with pytest.raises(AggregatorError, match="not 'fedyogi'"):
        make_server_optimizer("fedyogi").load_bytes(make_server_optimizer("fedadam").to_bytes())
    with pytest.raises(AggregatorError, match="unreadable"):
        make_server_optimizer("fedadam").load_bytes(b"not an npz")


def test_fedavgm_momentum_by_hand() -> None:
    opt = make_server_optimizer("fedavgm", lr=0.5, momentum=0.5)
    x = np.zeros(2, np.float32)
    d = np.array([1.0, -2.0], np.float32)
    x = opt.step(x, d)  # v = d; x = 0.5 d
    np.testing.assert_allclose(x, [0.5, -1.0])
    x = opt.step(x, d)  # v = 1.5 d; x += 0.75 d
    np.testing.assert_allclose(x, [1.25, -2.5])
