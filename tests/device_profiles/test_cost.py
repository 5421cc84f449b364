"""The cost model: FLOP counts, a hand-computed prediction, calibration, EWMA correction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_profiles import (
    REFERENCE_MODELS,
    ConfigError,
    CorrectionEstimator,
    DeviceProfile,
    ProfileError,
    Task,
    calibrate,
    conv1d_out_len,
    dense_macs,
    get_profile,
    predict,
    train_flops_per_sample,
    transfer_time_s,
)


def _profile(**overrides: object) -> DeviceProfile:
    data: dict[str, object] = {
        "name": "hand",
        "display_name": "Hand-computed device",
        "device_class": "test",
        "cores": 4,
        "memory_mb": 1024,
        "storage_gb": 8.0,
        "gflops": 10.0,
        "step_overhead_ms": 1.0,
        "downlink_mbps": 8.0,
        "uplink_mbps": 4.0,
        "latency_ms": 50.0,
        "power": "mains",
    }
    data.update(overrides)
    return DeviceProfile.from_dict(data)


# -- FLOP counts -------------------------------------------------------------------------------


def test_mlp_flops_by_hand() -> None:
    # 40*128 + 128*128 + 128*10 = 22784 MACs; forward = 2x, training = 3x forward.
    assert dense_macs([40, 128, 128, 10]) == 22784
    mlp = REFERENCE_MODELS["mlp"]
    assert mlp.forward_macs == 22784
    assert mlp.params == 22784 + 128 + 128 + 10
    assert train_flops_per_sample("mlp") == 3 * 2 * 22784 == 136704


def test_cnn_flops_by_hand() -> None:
    # Length 40 -> 19 -> 9 -> 4 with kernel 5, stride 2, padding 1.
    assert conv1d_out_len(40, kernel=5, stride=2, padding=1) == 19
    assert conv1d_out_len(19, kernel=5, stride=2, padding=1) == 9
    assert conv1d_out_len(9, kernel=5, stride=2, padding=1) == 4
    macs = 25 * 1 * 5 * 19 + 25 * 25 * 5 * 9 + 25 * 25 * 5 * 4 + 25 * 4 * 10
    assert macs == 44000
    cnn = REFERENCE_MODELS["cnn"]
    assert cnn.forward_macs == macs
    assert cnn.params == (125 + 25) + 2 * (3125 + 25) + (1000 + 10)
    assert train_flops_per_sample("cnn") == 6 * macs


def test_mlp_xl_is_about_a_million_parameters() -> None:
    xl = REFERENCE_MODELS["mlp-xl"]
    assert xl.forward_macs == 40 * 1024 + 1024 * 1024 + 1024 * 10
    assert 1.09e6 < xl.params < 1.11e6
    assert xl.dense_bytes == 4 * xl.params


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="known"):
        train_flops_per_sample("resnet")


# -- the prediction ------------------------------------------------------------------------


def test_prediction_matches_hand_computation() -> None:
    task = Task(
        model_bytes=1_000_000,
        update_bytes=250_000,
        dense_update_bytes=1_000_000,
        n_samples=100,
        epochs=2,
        batch_size=32,
        train_flops_per_sample=1e6,
        encode_ops_per_byte=20.0,
    )
    cost = predict(_profile(), task)
    assert cost.download_s == pytest.approx(0.05 + 8e6 / 8e6)  # 1.05 s
    assert cost.steps == 2 * math.ceil(100 / 32) == 8
    assert cost.step_s == pytest.approx(0.001 + 32 * 1e6 / 10e9)  # 4.2 ms
    assert cost.train_s == pytest.approx(8 * 0.0042)
    assert cost.encode_s == pytest.approx(1e6 * 20 / 10e9)  # 2 ms
    assert cost.upload_s == pytest.approx(0.05 + 2e6 / 4e6)  # 0.55 s
    assert cost.total_s == pytest.approx(1.05 + 0.0336 + 0.002 + 0.55)
    assert cost.fixed_s == pytest.approx(1.05 + 0.002 + 0.55)


def test_measured_step_time_wins_and_scales_with_batch() -> None:
    profile = _profile(measured_step_ms={"mlp": 3.0}, measured_batch_size=32)
    task = Task.for_model("mlp", n_samples=64, batch_size=32)
    assert predict(profile, task).step_s == pytest.approx(0.003)
    # Overhead 1 ms stays, the 2 ms of compute doubles at batch 64.
    task64 = Task.for_model("mlp", n_samples=64, batch_size=64)
    assert predict(profile, task64).step_s == pytest.approx(0.001 + 0.004)
    # An explicit step time in the task wins over everything.
    explicit = Task(model_bytes=0, update_bytes=0, n_samples=10, batch_size=10, step_time_s=0.5)
    assert predict(profile, explicit).train_s == pytest.approx(0.5)


def test_calibrate_refits_throughput_from_a_measured_step() -> None:
    profile = _profile()
    flops_per_step = 32 * train_flops_per_sample("mlp")
    calibrated = calibrate(profile, model="mlp", step_time_s=0.001 + flops_per_step / 2e9)
    assert calibrated.gflops == pytest.approx(2.0)
    assert calibrated.step_ms("mlp") == pytest.approx(1.0 + flops_per_step / 2e6)
    # Other models are now predicted from the refitted throughput.
    cnn = predict(calibrated, Task.for_model("cnn", n_samples=32))
    assert cnn.step_s == pytest.approx(0.001 + 32 * train_flops_per_sample("cnn") / 2e9)
    with pytest.raises(ProfileError):
        calibrate(profile, model="mlp", step_time_s=0.0)


def test_compression_shrinks_upload_only() -> None:
    pi4 = get_profile("pi4")
    dense = predict(pi4, Task.for_model("mlp-xl", n_samples=80))
    small = predict(pi4, Task.for_model("mlp-xl", n_samples=80, compression_ratio=10.0))
    assert small.upload_s < dense.upload_s
    assert small.download_s == dense.download_s
    assert small.encode_s == dense.encode_s


def test_faster_devices_are_predicted_faster() -> None:
    task = Task.for_model("cnn", n_samples=80, epochs=1)
    zero = predict(get_profile("pi-zero-2w"), task).train_s
    pi5 = predict(get_profile("pi5"), task).train_s
    assert zero > pi5


def test_max_steps_caps_training() -> None:
    task = Task.for_model("mlp", n_samples=3200, batch_size=32, max_steps=10)
    assert task.steps == 10


def test_bad_tasks_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Task(model_bytes=1, update_bytes=1, n_samples=1)
    with pytest.raises(ConfigError):
        Task(model_bytes=1, update_bytes=1, n_samples=1, batch_size=0, step_time_s=1.0)
    with pytest.raises(ConfigError):
        Task(model_bytes=-1, update_bytes=1, n_samples=1, step_time_s=1.0)
    with pytest.raises(ConfigError):
        Task.for_model("mlp", n_samples=1, compression_ratio=0.0)
    assert transfer_time_s(0, mbps=1.0, latency_ms=10.0) == pytest.approx(0.01)


# -- learning a per-device correction -----------------------------------------------------------


def test_ewma_converges_to_a_device_twice_as_slow() -> None:
    est = CorrectionEstimator(alpha=0.3)
    for _ in range(30):
        est.observe("slow", predicted_s=10.0, measured_s=20.0)
    assert est.factor("slow") == pytest.approx(2.0, rel=1e-3)
    assert est.corrected("slow", 5.0) == pytest.approx(10.0, rel=1e-3)
    assert est.factor("never-seen") == 1.0


def test_ewma_converges_under_noise() -> None:
    rng = np.random.default_rng(0)
    est = CorrectionEstimator(alpha=0.2)
    for _ in range(200):
        predicted = float(rng.uniform(1.0, 10.0))
        measured = predicted * 2.0 * float(rng.lognormal(0.0, 0.1))
        est.observe("dev", predicted, measured)
    assert est.factor("dev") == pytest.approx(2.0, rel=0.1)


def test_missed_deadlines_push_the_factor_up() -> None:
    est = CorrectionEstimator(alpha=0.5)
    for _ in range(5):
        est.observe("late", predicted_s=10.0, measured_s=None, deadline_s=30.0)
    assert est.factor("late") > 3.0  # at least deadline / predicted
    # A dropout without a deadline says nothing about speed.
    assert est.observe("gone", predicted_s=10.0, measured_s=None) == 1.0
    assert est.observations("gone") == 0


def test_factors_are_clamped_and_persist() -> None:
    est = CorrectionEstimator(alpha=1.0, max_factor=5.0)
    est.observe("wild", predicted_s=1.0, measured_s=1000.0)
    assert est.factor("wild") == 5.0
    other = CorrectionEstimator()
    other.load(est.to_dict())
    assert other.factor("wild") == 5.0
    with pytest.raises(ConfigError):
        CorrectionEstimator(alpha=0.0)
    with pytest.raises(ConfigError):
        est.observe("x", predicted_s=0.0, measured_s=1.0)
