"""The portable backend against the onnxruntime-training backend, step for step.

From the same initial weights, data and seed (so the same batches), N steps of the
portable graph on plain onnxruntime and N steps of onnxruntime-training 1.19.2 (in its
own environment, see ``ort_training``) must give the same parameters within float32
tolerance: rtol 1e-4, atol 2e-5 after 30 steps of SGD (the two runtimes sum in
different orders, so bit equality is not expected), for mlp, cnn and transformer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ort_training import run

from cloud_aggregator._artifacts import build_artifacts, initial_parameters
from cloud_aggregator._models import build_reference_model
from edge_runtime import PortableTrainer
from edge_runtime._datasets import load_mnist1d


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mnist = load_mnist1d(cache_dir=tmp_path_factory.getbasetemp().parent / "fleetlearn-cache")
    path = tmp_path_factory.mktemp("data") / "train.npz"
    np.savez(path, x=mnist.x_train[:600], y=mnist.y_train[:600])
    return path


@pytest.mark.parametrize(("model", "optimizer", "lr"), [
    ("mlp", "sgd", 0.05), ("cnn", "sgd", 0.05), ("transformer", "sgd", 0.05),
    ("mlp", "adamw:eps=1e-6,weight_decay=0,mode=hf", 1e-3),
])
def test_same_parameters_as_onnxruntime_training(
    model: str, optimizer: str, lr: float, data: Path, tmp_path: Path
) -> None:
    ort_dir, portable_dir = tmp_path / "ort", tmp_path / "portable"
    run({"do": "build", "model": model, "out": str(ort_dir), "optimizer": optimizer})
    build_artifacts(build_reference_model(model, 0), portable_dir, optimizer=optimizer)
    start = initial_parameters(portable_dir)
    np.testing.assert_array_equal(start, initial_parameters(ort_dir))
    weights = tmp_path / "start.npy"
    np.save(weights, start)
    common = {"epochs": 2, "batch_size": 32, "lr": lr, "seed": 11, "max_steps": 30}
    done = run({"do": "train", "artifacts": str(ort_dir), "data": str(data),
                "weights": str(weights), "out": str(tmp_path / "ort.npy"), **common})
    assert done["backend"] == "ort-training" and done["steps"] == 30
    trainer = PortableTrainer(artifacts_dir=portable_dir)
    trainer.set_parameters(start)
    arrays = np.load(data)
    result = trainer.train(arrays["x"], arrays["y"], **common)  # type: ignore[arg-type]
    assert result.steps == 30
    theirs, ours = np.load(tmp_path / "ort.npy"), trainer.get_parameters()
    assert np.abs(ours - start).max() > 1e-3  # they did train
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5)
    assert result.mean_loss == pytest.approx(done["mean_loss"], rel=1e-4)


def test_old_format_artifacts_still_train_on_onnxruntime_training(
    data: Path, tmp_path: Path
) -> None:
    # Format-1 artifacts (what fleetlearn built before the portable backend) keep
    # working through the same front door where the training wheel is installed.
    run({"do": "build", "model": "mlp", "out": str(tmp_path / "old")})
    np.save(tmp_path / "w.npy", initial_parameters(tmp_path / "old"))
    done = run({"do": "train", "artifacts": str(tmp_path / "old"), "data": str(data),
                "weights": str(tmp_path / "w.npy"), "out": str(tmp_path / "after.npy"),
                "epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 0})
    assert done["backend"] == "ort-training" and done["ort"] == "1.19.2"
    assert done["steps"] == 19


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two whole demos (each capped at 900 s): slower on a busy machine
def test_the_demo_reaches_the_same_accuracy_on_both_backends(tmp_path: Path) -> None:
    """``scripts/demo.sh``'s simulation (defaults: 100 devices, cnn, 100 rounds, seed 0)
    on each backend: where each ends (the mean test accuracy of its last 10 rounds, which
    a single round's noise does not move) within 1 point of the other."""
    import json
    import subprocess
    import sys

    from ort_training import REPO, python

    def simulate(interpreter: str, out: Path, *extra: str) -> dict[str, object]:
        result = subprocess.run(
            [interpreter, "-m", "fleetlearn", "simulate", "--out", str(out), "--quiet", "--json",
             *extra], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    ort_python = str(python())
    portable = simulate(sys.executable, tmp_path / "portable")
    ort = simulate(ort_python, tmp_path / "ort", "--backend", "ort-training")
    assert portable["training_backend"] == "portable"
    assert ort["training_backend"] == "ort-training" and ort["onnxruntime"] == "1.19.2"

    def ends(report: dict[str, object]) -> float:
        accuracy = [r["accuracy"] for r in report["rounds"] if r["accuracy"] is not None]  # type: ignore[attr-defined]
        return sum(accuracy[-10:]) / 10

    assert len(portable["rounds"]) == len(ort["rounds"]) == 100  # type: ignore[arg-type]
    assert ends(portable) > 0.8
    assert abs(ends(portable) - ends(ort)) <= 0.01, (ends(portable), ends(ort))
