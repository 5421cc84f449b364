"""``EdgeRounds`` and ``Aggregator.adopt``: an edge opens rounds only for its parent's job,
starts them from the adopted model, counts them (and their samples) toward the job, and
keeps the job across a restart. Fake devices on an in-memory broker; the aggregate is
checked against a plain numpy weighted mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import devices, fake_update, make

from broker_bridge import MemoryBroker
from cloud_aggregator import AggregatorError, EdgeRounds, ParentJob


def _begin(agg: object, strategy: EdgeRounds, key: str, rounds: int) -> None:
    def begin() -> None:
        strategy.job = ParentJob(key=key, base_version=agg.model_version,  # type: ignore[attr-defined]
                                 rounds=rounds)

    agg.adopt(np.full(agg.layout.size, 0.5, np.float32), before_save=begin)  # type: ignore[attr-defined]


def test_rounds_open_only_for_the_parents_job(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    strategy = EdgeRounds()
    agg = make(tmp_path, artifacts, broker, strategy=strategy, rounds=100,
               devices_per_round=2, quorum=2, min_devices=2)
    fleet = devices(broker, 2)
    fleet["d0"].num_samples, fleet["d1"].num_samples = 30, 90
    for d in fleet.values():
        d.hello()
    assert agg.tick() is False and agg.current_round is None  # no job: no round
    assert "waiting for a task from the parent" in agg.status_line()
    _begin(agg, strategy, "run:1:n1", rounds=2)
    assert agg.model_version == 1 and np.all(agg.params == 0.5)
    assert all(1 in d.models for d in fleet.values())  # the adopted model was broadcast
    for expected_round in (1, 2):
        assert agg.tick() is True
        rnd = agg.current_round
        assert rnd is not None and rnd.spec.model_version == agg.model_version
        before = agg.params.copy()
        for d in fleet.values():
            d.send_update(layout=agg.layout, num_samples=d.num_samples)
        agg.tick()
        assert agg.current_round is None
        deltas = [fake_update(d, expected_round, agg.layout.size) for d in ("d0", "d1")]
        mean = (30 * deltas[0] + 90 * deltas[1]) / 120  # plain FedAvg
        np.testing.assert_allclose(agg.params, before + mean, atol=1e-6)
    job = strategy.job
    assert job is not None and job.finished and job.rounds_done == 2
    assert job.samples == 2 * 120 and job.train_loss == pytest.approx(1.0)
    assert agg.tick() is False and agg.current_round is None  # the job is done
    # The job is saved with the checkpoint: a restarted edge finds it as it was.
    agg.close()
    again = make(tmp_path, artifacts, MemoryBroker(), strategy=EdgeRounds(), rounds=100,
                 devices_per_round=2, quorum=2, min_devices=2)
    resumed = again.strategy
    assert isinstance(resumed, EdgeRounds) and resumed.job == job
    assert again.model_version == 3


def test_adopt_is_refused_while_a_round_is_open_or_for_bad_parameters(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    strategy = EdgeRounds()
    agg = make(tmp_path, artifacts, broker, strategy=strategy, rounds=100,
               devices_per_round=1, quorum=1, min_devices=1)
    devices(broker, 1)
    with pytest.raises(AggregatorError):
        agg.adopt(np.zeros(3, np.float32))
    bad = np.zeros(agg.layout.size, np.float32)
    bad[0] = np.nan
    with pytest.raises(AggregatorError):
        agg.adopt(bad)
    assert agg.model_version == 0
    _begin(agg, strategy, "run:1:n1", rounds=1)
    assert agg.tick() is True and agg.current_round is not None
    with pytest.raises(AggregatorError, match="round is open"):
        agg.adopt(np.zeros(agg.layout.size, np.float32))
    assert agg.model_version == 1
