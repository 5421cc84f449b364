"""The default training callable (``train_locally``) on models other than the classifier
the reference tasks use: regression (float32 targets), distillation; and its budget."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_rig import Rig, linear_regression_artifacts
from waiting import wait_for

from broker_bridge import TaskSpec, decode_update, unpack_update_body
from cloud_aggregator._artifacts import build_artifacts
from cloud_aggregator._models import build_reference_model
from edge_runtime import ArtifactError, LocalData, TaskStatus, TrainingBudget, train_locally
from edge_runtime._training import open_trainer

TRUE_W = np.array([[1.0], [-2.0], [0.5], [0.0], [3.0]], np.float32)


def _regression_data(n: int = 128, seed: int = 0) -> LocalData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    y = (x @ TRUE_W).astype(np.float32)
    return LocalData(x=x, y=y, x_eval=x[:32], y_eval=y[:32])


def _task(**kw: object) -> TaskSpec:
    fields: dict[str, object] = {"round": 1, "model_version": 0, "artifacts_hash": "a" * 64,
                                 "model_hash": "b" * 64, "nonce": "nonce-of-a-test",
                                 "epochs": 10, "batch_size": 16, "lr": 0.05, "seed": 0}
    fields.update(kw)
    return TaskSpec(**fields)  # type: ignore[arg-type]


def _budget(seconds: float = 60.0) -> TrainingBudget:
    return TrainingBudget(seconds=seconds, should_stop=lambda: False)


@pytest.fixture(scope="module")
def mse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return linear_regression_artifacts(tmp_path_factory.mktemp("mse"))


def test_train_locally_trains_a_regression_model(mse_dir: Path) -> None:
    trainer = open_trainer(mse_dir)
    assert trainer.label_dtype == "float32"
    data = _regression_data()
    start = np.zeros(trainer.num_parameters, np.float32)
    result = train_locally(_task(evaluate=True), start, data, trainer, _budget())
    assert result.samples == 10 * 128 and result.steps == 10 * 8
    assert result.eval_samples == 32 and result.eval_accuracy is None
    assert result.eval_loss is not None and result.eval_loss > 0
    trained = open_trainer(mse_dir)
    trained.set_parameters(result.parameters)
    assert trained.evaluate(data.x, data.y).loss < 0.05 * result.eval_loss


def test_regression_targets_must_still_be_finite(mse_dir: Path) -> None:
    from edge_runtime import DataError

    data = _regression_data()
    bad = LocalData(x=data.x, y=np.where(np.arange(len(data.y))[:, None] == 3, np.nan, data.y)
                    .astype(np.float32))
    trainer = open_trainer(mse_dir)
    with pytest.raises(DataError, match="NaN"):
        train_locally(_task(), np.zeros(trainer.num_parameters, np.float32), bad, trainer,
                      _budget())


def test_an_agent_answers_a_regression_task_with_an_update(tmp_path: Path, mse_dir: Path
                                                           ) -> None:
    rig = Rig(tmp_path, mse_dir)
    try:
        data = _regression_data()
        agent = rig.agent(data=data)
        rig.agg.send_task("dev-1", rig.agg.task(round_=1, epochs=2, batch_size=16))
        assert wait_for(lambda: rig.agg.errors or (
            agent.state.record is not None and agent.state.record.status == TaskStatus.ACKED))
        assert rig.agg.errors == []
        (m,) = rig.agg.updates
        meta, body = unpack_update_body(m.body)
        assert meta.num_samples == 2 * 128 and meta.steps == 2 * 8
        assert np.abs(decode_update(body, rig.agg.layout)).max() > 0
    finally:
        rig.close()


def test_distillation_artifacts_need_a_callable_that_passes_soft_targets(
        tmp_path: Path) -> None:
    build_artifacts(build_reference_model("mlp", 0), tmp_path,
                    loss="cross_entropy+distillation:weight=0.5")
    trainer = open_trainer(tmp_path)
    assert trainer.needs_soft_targets
    rng = np.random.default_rng(0)
    data = LocalData(x=rng.standard_normal((64, 40)).astype(np.float32),
                     y=rng.integers(0, 10, 64).astype(np.int64))
    with pytest.raises(ArtifactError, match="soft_targets"):
        train_locally(_task(), trainer.get_parameters(), data, trainer, _budget())
    # The trainer itself trains them when given the teacher's logits.
    soft = rng.standard_normal((64, 10)).astype(np.float32)
    assert trainer.train(data.x, data.y, soft_targets=soft).samples_seen == 64
    assert not math.isnan(trainer.evaluate(data.x, data.y).loss)


# -- the budget ------------------------------------------------------------------------------


class _Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _SlowEvaluation:
    """A real trainer whose evaluation takes ``eval_s`` seconds of ``clock``; it records
    the deadline ``train`` is given."""

    def __init__(self, trainer: Any, clock: _Clock, eval_s: float) -> None:
        self._trainer, self._clock, self._eval_s = trainer, clock, eval_s
        self.deadlines: list[float | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def evaluate(self, x: np.ndarray, y: np.ndarray, **kw: Any) -> Any:
        self._clock.now += self._eval_s
        return self._trainer.evaluate(x, y, **kw)

    def train(self, x: np.ndarray, y: np.ndarray, **kw: Any) -> Any:
        self.deadlines.append(kw.get("deadline_s"))
        return self._trainer.train(x, y, **kw)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    from edge_runtime import _local_training

    fake = _Clock()
    monkeypatch.setattr(_local_training, "monotonic", fake, raising=False)
    return fake


def test_training_gets_the_budget_left_after_evaluation(mse_dir: Path, clock: _Clock) -> None:
    trainer = _SlowEvaluation(open_trainer(mse_dir), clock, eval_s=5.0)
    start = np.zeros(trainer.num_parameters, np.float32)
    result = train_locally(_task(evaluate=True), start, _regression_data(), trainer,
                           _budget(8.0))
    assert trainer.deadlines == [pytest.approx(3.0)]
    assert result.samples > 0 and result.eval_samples == 32


def test_an_evaluation_that_spends_the_budget_leaves_nothing_to_train(
        mse_dir: Path, clock: _Clock) -> None:
    trainer = _SlowEvaluation(open_trainer(mse_dir), clock, eval_s=9.0)
    start = np.zeros(trainer.num_parameters, np.float32)
    result = train_locally(_task(evaluate=True), start, _regression_data(), trainer,
                           _budget(8.0))
    assert trainer.deadlines == []
    assert result.samples == 0 and result.stopped_early and result.eval_samples == 32
