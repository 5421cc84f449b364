"""Central DP end to end: ``fleetlearn simulate --dp-epsilon 8 --dp-delta 1e-5`` over a
real Mosquitto with real agents (their own MQTT sessions, real ONNX Runtime training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker_bridge import MosquittoProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_simulate_with_a_privacy_budget_over_mosquitto(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLEARN_")}
    done = subprocess.run(
        [sys.executable, "-m", "fleetlearn", "simulate", "--dp-epsilon", "8",
         "--dp-delta", "1e-5", "--broker", mosquitto.url, "--devices", "20",
         "--per-round", "5", "--rounds", "4", "--model", "mlp", "--no-availability",
         "--out", str(out), "--max-wall-s", "240"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "device-level (8.0, 1e-05)-DP plan" in done.stdout
    assert "differential privacy: epsilon" in done.stdout
    report = json.loads((out / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["amplified"] and privacy["planned_sampling_rate"] == pytest.approx(7 / 20)
    assert "add-or-remove-one-device" in privacy["guarantee"]
    rounds = [r for r in report["rounds"] if r["outcome"] == "closed"]
    assert len(rounds) == privacy["rounds_charged"] >= 1
    eps = [r["dp_epsilon"] for r in rounds]
    assert eps == sorted(eps) and 0 < eps[-1] <= 8.0
    assert privacy["epsilon_spent"] == pytest.approx(eps[-1], rel=1e-5)
    if len(rounds) < 4:  # the budget stopped it, and it said so
        assert privacy["stopped"] and "privacy budget reached" in done.stdout
    assert all(r["dp_clip_norm"] > 0 and r["dp_noise_std"] > 0 for r in rounds)
    # The aggregator's own metrics log carries epsilon too, and the plot exists.
    lines = [json.loads(x) for x in
             (out / "aggregator" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["dp_epsilon"] for x in lines if x["outcome"] == "closed"] == pytest.approx(eps,
                                                                                         rel=1e-5)
    assert (out / "privacy.png").stat().st_size > 1000


@pytest.mark.slow
def test_simulate_with_distributed_dp_under_secure_aggregation_over_mosquitto(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """``--secure-aggregation --dp-epsilon 8``: the devices noise their masked updates
    (Skellam), the aggregator charges each round's sum and reports epsilon."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLEARN_")}
    done = subprocess.run(
        [sys.executable, "-m", "fleetlearn", "simulate", "--secure-aggregation",
         "--dp-epsilon", "8", "--dp-delta", "1e-5", "--broker", mosquitto.url,
         "--devices", "20", "--per-round", "5", "--rounds", "4", "--model", "mlp",
         "--no-availability", "--out", str(out), "--max-wall-s", "240"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "distributed Skellam noise from the devices" in done.stdout
    assert "differential privacy (distributed" in done.stdout
    report = json.loads((out / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["mechanism"] == "skellam" and not privacy["amplified"]
    assert "zero-out" in privacy["guarantee"]
    rounds = [r for r in report["rounds"] if r["outcome"] == "closed"]
    assert len(rounds) == privacy["rounds_charged"] >= 1
    assert sum(n for _, n in privacy["charged_by_summed"]) == len(rounds)
    eps = [r["dp_epsilon"] for r in rounds]
    assert eps == sorted(eps) and 0 < eps[-1] <= 8.0
    assert privacy["epsilon_spent"] == pytest.approx(eps[-1], rel=1e-5)
    assert all(r["dp_noise_std"] > 0 for r in rounds)
    lines = [json.loads(x) for x in
             (out / "aggregator" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["dp_epsilon"] for x in lines if x["outcome"] == "closed"] == pytest.approx(
        eps, rel=1e-5)
    assert (out / "privacy.png").stat().st_size > 1000
