"""Server-side evaluation matches the device's ONNX Runtime evaluation of the same weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from broker_bridge import Layout
from cloud_aggregator._artifacts import build_artifacts, initial_parameters, read_manifest
from cloud_aggregator._evaluate import ServerEvaluator, federated_eval, load_eval_data
from cloud_aggregator._models import build_reference_model
from device_profiles import ConfigError
from edge_runtime._training import open_trainer


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cnn")
    build_artifacts(build_reference_model("cnn", 0), out)
    return out


def test_server_eval_matches_ort_training_eval(cnn_dir: Path, tmp_path: Path) -> None:
    info = read_manifest(cnn_dir)
    layout = Layout(tensors=tuple((n, tuple(s)) for n, s in info.parameters))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 40)).astype(np.float32)
    y = rng.integers(0, 10, 300)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    x2, y2 = load_eval_data(tmp_path / "eval.npz")
    trainer = open_trainer(cnn_dir)
    trainer.train(x, y, epochs=2, lr=0.1, seed=0)  # weights that differ from the file's
    params = trainer.get_parameters()
    assert not np.allclose(params, initial_parameters(cnn_dir))
    ours = ServerEvaluator(model_path=cnn_dir / "model.onnx", layout=layout, x=x2, y=y2)
    result = ours.evaluate(params)
    ref = trainer.evaluate(x, y)
    assert result.samples == 300
    assert result.accuracy == pytest.approx(ref.accuracy, abs=1e-9)
    assert result.loss == pytest.approx(ref.loss, rel=1e-4)


def test_bad_eval_data_is_a_config_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 40)), labels=np.zeros(3))
    with pytest.raises(ConfigError):
        load_eval_data(tmp_path / "bad.npz")


def test_federated_eval_is_sample_weighted() -> None:
    out = federated_eval([(1.0, 0.5, 10), (2.0, 1.0, 30), (None, None, 0), (math.nan, 0.2, 5)])
    assert out is not None
    assert out.loss == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert out.accuracy == pytest.approx((5 + 30 + 1) / 45)
    assert federated_eval([]) is None
