"""Validate the cost model against real ONNX Runtime training on this machine.

Method, per reference model (``mlp``, ``cnn``, ``mlp-xl``):

1. Profile this machine the way ``fleetlearn profile`` does: the agent's probe times
   single training steps at batch 32 through the real trainer (``open_trainer``) and
   ``measure_machine`` stores them as ``measured_step_ms``.
2. Predict *other* task shapes with ``device_profiles.predict`` (1 and 3 epochs over
   80, 400 and 1,000 samples, batch 32, so short last batches included).
3. Run those shapes with ``Trainer.train`` (one ONNX Runtime thread) and compare
   the training part: ``CostBreakdown.train_s`` against ``TrainResult.seconds``.
   Download and upload are not compared: on loopback they are zero, and the profile's
   network figures are stated defaults, not measurements.

A 2-core shared machine drifts between fast and slow phases of a few seconds, so
each model is probed right before its runs, ``--repeats`` times over, and medians
are compared.
The baseline beside ours is the uncalibrated FLOP model (the GEMM-measured GFLOP/s,
no step-time probe). A third column calibrates from a multi-step probe instead (30
steps in one ``train`` call, divided by 30): the profile command's probe times one
step per call, so its figure also carries ``train``'s per-call setup (~0.1 ms), which
a many-step task pays once. Inputs are random float32 of the reference shape: training
cost does not depend on the values.

    python bench/costmodel.py [--repeats 5] [--models mlp,cnn,mlp-xl]

Human lines go to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from device_profiles import Task, measure_machine, predict
from edge_runtime._cli import PROBE_BATCH, measure_step_times
from edge_runtime._training import Trainer, open_trainer
from fleetlearn._probe import PROBE_MODELS, ensure_reference_artifacts

EPOCHS = (1, 3)
SAMPLES = (80, 400, 1000)
TARGET_PCT = 25.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _data(trainer: Trainer, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    shape = trainer.input_shape or ("batch", 40)
    dims = [d if isinstance(d, int) else 1 for d in shape[1:]]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *dims)).astype(np.float32)
    return x, rng.integers(0, 10, n).astype(np.int64)


def _steady_step_ms(trainer: Trainer, x: np.ndarray, y: np.ndarray, steps: int = 30) -> float:
    """Milliseconds per step of one ``train`` call over ``steps`` full batches."""
    n = steps * PROBE_BATCH
    res = trainer.train(x[:n], y[:n], batch_size=PROBE_BATCH, seed=0)
    return res.seconds / res.steps * 1000.0


def _pct(predicted: float, measured: float) -> float:
    return round(100.0 * (predicted - measured) / measured, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(PROBE_MODELS))
    parser.add_argument("--artifacts", type=Path,
                        help="reference artifacts root to reuse (default: built in a temp dir)")
    args = parser.parse_args()
    models = args.models.split(",")
    shapes = [(e, n) for n in SAMPLES for e in EPOCHS]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fleetlearn-costmodel-") as tmp:
        root = args.artifacts or Path(tmp)
        refs = ensure_reference_artifacts(root, models=models)
        if refs.missing:
            raise SystemExit(f"cannot build reference artifacts: {refs.reason}")
        dirs = {m: root / m for m in models}
        trainers = {m: open_trainer(dirs[m], intra_op_threads=1) for m in models}
        data = {m: _data(trainers[m], max(SAMPLES), seed=1) for m in models}
        steady: dict[str, list[float]] = {m: [] for m in models}
        for m in models:  # warm up every session once
            x, y = data[m]
            trainers[m].train(x[:96], y[:96], batch_size=PROBE_BATCH)
        probes: dict[str, list[float]] = {m: [] for m in models}
        runs: dict[tuple[str, int, int], list[float]] = {}
        for r in range(args.repeats):
            for m in models:  # a model's probe right before its runs: same machine phase
                probes[m].append(measure_step_times({m: dirs[m]}, batch_size=PROBE_BATCH)[m])
                x, y = data[m]
                steady[m].append(_steady_step_ms(trainers[m], x, y))
                for e, n in shapes:
                    res = trainers[m].train(x[:n], y[:n], epochs=e, batch_size=PROBE_BATCH,
                                            seed=r)
                    runs.setdefault((m, e, n), []).append(res.seconds)
            say(f"repeat {r + 1}/{args.repeats}: probe ms/step "
                + ", ".join(f"{m} {probes[m][-1]:.3f}" for m in models))
    step_ms = {m: statistics.median(v) for m, v in probes.items()}
    profile = measure_machine(name="this-machine", step_times_ms=step_ms, use_probes=False,
                              batch_size=PROBE_BATCH)
    flops_only = replace(profile, measured_step_ms=())
    steady_ms = {m: statistics.median(v) for m, v in steady.items()}
    steady_profile = replace(profile, measured_step_ms=tuple(steady_ms.items()))
    say(f"profile: gemm {profile.gflops:.1f} GFLOP/s, step ms at batch {PROBE_BATCH}: "
        + ", ".join(f"{m} {v:.3f}" for m, v in step_ms.items()))
    results: list[dict[str, Any]] = []
    say(f"{'model':7s} {'epochs':>6s} {'samples':>7s} {'steps':>5s} {'predicted ms':>12s} "
        f"{'measured ms':>11s} {'error':>7s} {'flops-only':>10s} {'multi-step probe':>16s}")
    for m in models:
        for e, n in shapes:
            task = Task.for_model(m, n_samples=n, epochs=e, batch_size=PROBE_BATCH)
            cost = predict(profile, task)
            base = predict(flops_only, task)
            alt = predict(steady_profile, task)
            measured = statistics.median(runs[(m, e, n)])
            row = {
                "model": m, "epochs": e, "n_samples": n, "batch_size": PROBE_BATCH,
                "steps": cost.steps, "predicted_s": round(cost.train_s, 6),
                "measured_s": round(measured, 6), "error_pct": _pct(cost.train_s, measured),
                "flops_only_predicted_s": round(base.train_s, 6),
                "flops_only_error_pct": _pct(base.train_s, measured),
                "multi_step_probe_predicted_s": round(alt.train_s, 6),
                "multi_step_probe_error_pct": _pct(alt.train_s, measured),
            }
            results.append(row)
            say(f"{m:7s} {e:6d} {n:7d} {cost.steps:5d} {cost.train_s * 1e3:12.2f} "
                f"{measured * 1e3:11.2f} {row['error_pct']:+6.1f}% "
                f"{row['flops_only_error_pct']:+9.1f}% {row['multi_step_probe_error_pct']:+15.1f}%")
    errors = [abs(r["error_pct"]) for r in results]
    base_errors = [abs(r["flops_only_error_pct"]) for r in results]
    alt_errors = [abs(r["multi_step_probe_error_pct"]) for r in results]
    out = {
        "machine": {"platform": platform.platform(), "cores": profile.cores,
                    "gemm_gflops": profile.gflops},
        "compared": "CostBreakdown.train_s vs TrainResult.seconds (download/upload are zero "
                    "on loopback and not compared)",
        "repeats": args.repeats,
        "probe_step_ms": {m: [round(v, 4) for v in probes[m]] for m in models},
        "profile_step_ms": {m: round(v, 4) for m, v in step_ms.items()},
        "results": results,
        "target_error_pct": TARGET_PCT,
        "max_abs_error_pct": max(errors),
        "mean_abs_error_pct": round(statistics.fmean(errors), 1),
        "within_target": sum(e <= TARGET_PCT for e in errors),
        "shapes": len(results),
        "flops_only": {"max_abs_error_pct": max(base_errors),
                       "mean_abs_error_pct": round(statistics.fmean(base_errors), 1)},
        "multi_step_probe": {"step_ms": {m: round(v, 4) for m, v in steady_ms.items()},
                             "max_abs_error_pct": max(alt_errors),
                             "mean_abs_error_pct": round(statistics.fmean(alt_errors), 1)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
