"""The cost model against real ONNX Runtime training on this machine.

This machine is profiled the way ``fleetlearn profile`` does it (the agent's probe
times single steps at batch 32 through ``OrtTrainer``), then the cost model predicts
other task shapes, which are run for real. Only the training part is compared: on
loopback, download and upload take nothing. A shared 2-core machine has fast and slow
phases, so each model is probed right before its runs, three times over, and medians
are compared; the bound is generous on purpose (``bench/costmodel.py`` reports the
error itself). Step counts, which do not depend on timing, must match exactly.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import numpy as np
import pytest

from device_profiles import Task, get_profile, measure_machine, predict
from edge_runtime._cli import PROBE_BATCH, measure_step_times
from edge_runtime._trainer import OrtTrainer
from fleetlearn._probe import PROBE_MODELS, ensure_reference_artifacts

SHAPES = ((1, 80), (3, 80), (1, 400), (3, 400), (1, 1000), (3, 1000))  # (epochs, samples)
REPEATS = 3
BOUND = 0.5  # per model, over all its shapes
SHAPE_BOUND = 1.0  # any one shape: within a factor of two


@pytest.fixture(scope="module")
def artifact_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference-artifacts")
    refs = ensure_reference_artifacts(root)
    assert not refs.missing, refs.reason
    return {m: root / m for m in PROBE_MODELS}


def _data(trainer: OrtTrainer, n: int) -> tuple[np.ndarray, np.ndarray]:
    shape = trainer.input_shape or ("batch", 40)
    dims = [d if isinstance(d, int) else 1 for d in shape[1:]]
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *dims)).astype(np.float32), rng.integers(0, 10, n)


@pytest.mark.slow  # about 15 s on a 2-core machine, more when it is busy
def test_predicted_training_time_is_close_to_measured(artifact_dirs: dict[str, Path]) -> None:
    probes: dict[str, list[float]] = {m: [] for m in PROBE_MODELS}
    runs: dict[tuple[str, int, int], list[float]] = {}
    trainers = {m: OrtTrainer(artifacts_dir=d, intra_op_threads=1)
                for m, d in artifact_dirs.items()}
    data = {m: _data(t, max(n for _, n in SHAPES)) for m, t in trainers.items()}
    for m, t in trainers.items():
        t.train(*data[m], batch_size=PROBE_BATCH)  # warm up
    for _ in range(REPEATS):
        for m, directory in artifact_dirs.items():
            probes[m].append(measure_step_times({m: directory}, steps=15)[m])
            x, y = data[m]
            for e, n in SHAPES:
                res = trainers[m].train(x[:n], y[:n], epochs=e, batch_size=PROBE_BATCH, seed=0)
                runs.setdefault((m, e, n), []).append(res.seconds)
    profile = measure_machine(step_times_ms={m: statistics.median(v) for m, v in probes.items()},
                              use_probes=False, gemm_seconds=0.05, batch_size=PROBE_BATCH)
    report = []
    for m in PROBE_MODELS:
        predicted_total = measured_total = 0.0
        for e, n in SHAPES:
            predicted = predict(profile, Task.for_model(m, n_samples=n, epochs=e)).train_s
            measured = statistics.median(runs[(m, e, n)])
            report.append(f"{m} e={e} n={n}: predicted {predicted * 1e3:.2f} ms, "
                          f"measured {measured * 1e3:.2f} ms")
            assert abs(predicted - measured) <= SHAPE_BOUND * measured, report[-1]
            predicted_total += predicted
            measured_total += measured
        error = (predicted_total - measured_total) / measured_total
        assert abs(error) <= BOUND, f"{m}: {error:+.0%}\n" + "\n".join(report)


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlp-artifacts")
    refs = ensure_reference_artifacts(root, models=("mlp",))
    assert not refs.missing, refs.reason
    return root / "mlp"


@pytest.mark.parametrize("max_steps", [None, 1, 7])
def test_the_cost_model_counts_the_steps_the_trainer_takes(
    mlp_dir: Path, max_steps: int | None
) -> None:
    trainer = OrtTrainer(artifacts_dir=mlp_dir, intra_op_threads=1)
    x, y = _data(trainer, 1000)
    for e, n in SHAPES:
        res = trainer.train(x[:n], y[:n], epochs=e, batch_size=PROBE_BATCH, max_steps=max_steps)
        task = Task.for_model("mlp", n_samples=n, epochs=e, max_steps=max_steps)
        assert predict(get_profile("pi4"), task).steps == task.steps == res.steps


def test_a_step_measured_below_the_estimated_overhead_is_predicted_as_measured() -> None:
    """A fast machine's measured step (0.2 ms) can undercut the estimated overhead
    (pi4: 0.7 ms); the measurement wins, and a smaller batch is never slower."""
    fast = dataclasses.replace(get_profile("pi4"), measured_step_ms=(("mlp", 0.2),))
    at_32 = predict(fast, Task.for_model("mlp", n_samples=320, batch_size=32))
    assert at_32.step_s == pytest.approx(0.0002)
    assert at_32.train_s == pytest.approx(10 * 0.0002)
    at_16 = predict(fast, Task.for_model("mlp", n_samples=320, batch_size=16))
    assert at_16.step_s <= at_32.step_s
