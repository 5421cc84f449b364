"""The cost model against real ONNX Runtime training: what does not depend on timing.

The step counts the cost model predicts must be exactly the steps the trainer takes,
and a measured step time must be used as measured. How close predicted times come to
measured ones is a timing question for a shared, noisy machine: ``bench/costmodel.py``
measures and reports it (tests never assert wall-clock times).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from device_profiles import Task, get_profile, predict
from edge_runtime._cli import PROBE_BATCH
from edge_runtime._training import Trainer, open_trainer
from fleetlearn._probe import ensure_reference_artifacts

SHAPES = ((1, 80), (3, 80), (1, 400), (3, 400), (1, 1000), (3, 1000))  # (epochs, samples)


def _data(trainer: Trainer, n: int) -> tuple[np.ndarray, np.ndarray]:
    shape = trainer.input_shape or ("batch", 40)
    dims = [d if isinstance(d, int) else 1 for d in shape[1:]]
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *dims)).astype(np.float32), rng.integers(0, 10, n)


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
    trainer = open_trainer(mlp_dir, intra_op_threads=1)
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
