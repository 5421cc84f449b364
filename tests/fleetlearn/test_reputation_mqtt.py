"""Reputation end to end over a real Mosquitto: real agents train the real model, and
the simulator's Byzantine hooks make three of ten send their update sign-flipped at its
own norm, which no norm screen can tell from an honest one."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_bridge import MosquittoProcess
from cloud_aggregator._history import FleetHistory
from cloud_aggregator._metrics import RoundMetrics
from edge_runtime._fleet import FaultSpec
from fleetlearn._simulate import SimConfig, run_simulation


@pytest.mark.slow
def test_byzantine_agents_are_down_weighted_and_left_out_and_honest_ones_are_not(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    floor = 0.3
    result = run_simulation(SimConfig(
        devices=10, per_round=5, model="mlp", rounds=8, partition="iid", availability=False,
        codec="ef+topk:0.1+q8+zstd:3", seed=7, broker=mosquitto.url, out_dir=tmp_path,
        faults=FaultSpec(byzantine_fraction=0.3, byzantine_scale=1.0), max_wall_s=300.0,
        aggregator={"reputation_floor": floor}), quiet=True)
    report = result.report
    reputation = report["reputation"]
    byzantine = {d for d, r in reputation.items() if r["byzantine"]}
    assert byzantine == {"dev-1", "dev-5", "dev-8"}  # drawn from seed 7
    # Every update passed the screens: only their direction gives them away.
    assert not any(r["screened"] for r in result.rounds)
    rounds = [RoundMetrics.from_json({"round": r["round"], "model_version": r["model_version"],
                                      "outcome": r["outcome"],
                                      "contributions": r["contributions"]})
              for r in result.rounds]
    # Replay the records: once a Byzantine device is below the floor, it either is not
    # selected again or its update weighs its (tiny) reputation.
    history = FleetHistory()
    for m in rounds:
        for record in m.contributions:
            if record.device in byzantine and history.get(record.device).reputation < floor:
                # it weighs at most floor x its samples: below floor / (others counted)
                assert record.weight < floor / (len(m.contributions) - 1)
        history.apply(history.contributed(m.contributions))
    caught = [d for d in byzantine if reputation[d]["contributions"] >= 1]
    assert len(caught) >= 2, reputation  # they trained, and were counted
    assert all(reputation[d]["reputation"] < floor and reputation[d]["distrusted"]
               and reputation[d]["alignment"] < 0 for d in caught), reputation
    honest = [r for d, r in reputation.items() if d not in byzantine]
    assert all(r["reputation"] >= floor and not r["distrusted"] for r in honest)
    assert sum(1 for r in honest if r["contributions"]) >= 5
    summary = report["reputation_summary"]
    assert summary["byzantine"]["weight_share"] < 0.3 * summary["honest"]["weight_share"]
    assert report["final_accuracy"] is not None
    assert any(p.name == "reputation.png" and p.stat().st_size > 1000 for p in result.plots)
