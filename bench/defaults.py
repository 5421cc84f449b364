"""Choose the aggregator's defaults: rounds to 60/80/90% test accuracy on the reference task.

MNIST-1D (8,000 train / 2,000 test), 100 devices by Dirichlet(0.5) (seed 0), 10 devices
per round, batch 32. Rounds run in-process with ONNX Runtime training directly (no MQTT):
each selected device starts from the global weights, trains locally, and its weighted
delta goes through the same server optimizer the aggregator uses. Plain FedAvg (1 local
epoch, SGD lr 0.05, server lr 1) is the baseline; each candidate changes local epochs
and/or the server optimizer. ``AggregatorConfig``'s defaults are the winner.

    python bench/defaults.py [--rounds 150] [--models mlp,cnn] [--candidates all]

Human lines go to stderr as it runs; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from cloud_aggregator._artifacts import build_artifacts, initial_parameters
from cloud_aggregator._models import build_reference_model
from cloud_aggregator._server_opt import make_server_optimizer
from edge_runtime._datasets import load_mnist1d, partition_dirichlet
from edge_runtime._training import Trainer, open_trainer

THRESHOLDS = (0.6, 0.8, 0.9)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    name: str
    epochs: int = 1
    lr: float = 0.05
    server_opt: str = "fedavg"
    server_options: dict[str, float] = field(default_factory=dict)


CANDIDATES = (
    Candidate(name="fedavg_e1"),  # the DESIGN baseline
    Candidate(name="fedavg_e5", epochs=5),
    Candidate(name="fedavgm_e1", epochs=1, server_opt="fedavgm",
              server_options={"lr": 1.0, "momentum": 0.9}),
    Candidate(name="fedavgm_e5", epochs=5, server_opt="fedavgm",
              server_options={"lr": 1.0, "momentum": 0.9}),
    Candidate(name="fedavgm_e3_m07", epochs=3, server_opt="fedavgm",
              server_options={"lr": 1.0, "momentum": 0.7}),
    Candidate(name="fedadam_e5", epochs=5, server_opt="fedadam", server_options={"lr": 0.01}),
)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(
    candidate: Candidate, trainer: Trainer, init: np.ndarray, data: Any,
    parts: list[np.ndarray], *, rounds: int, per_round: int, seed: int,
) -> dict[str, Any]:
    params = init.copy()
    opt = make_server_optimizer(candidate.server_opt, **candidate.server_options)
    rng = np.random.default_rng(seed)
    reached: dict[str, int | None] = {f"{int(t * 100)}": None for t in THRESHOLDS}
    best = 0.0
    start = time.perf_counter()
    history = []
    for r in range(1, rounds + 1):
        chosen = rng.choice(len(parts), size=per_round, replace=False)
        total = np.zeros(params.size, dtype=np.float64)
        weight = 0.0
        for d in chosen:
            idx = parts[int(d)]
            trainer.set_parameters(params)
            res = trainer.train(data.x_train[idx], data.y_train[idx], epochs=candidate.epochs,
                                batch_size=32, lr=candidate.lr, seed=int(r * 1000 + d))
            delta = trainer.get_parameters() - params
            total += len(idx) * delta.astype(np.float64)
            weight += len(idx)
            del res
        params = opt.step(params, (total / weight).astype(np.float32))
        if not np.isfinite(params).all():
            say(f"  {candidate.name}: diverged at round {r}")
            break
        trainer.set_parameters(params)
        acc = float(trainer.evaluate(data.x_test, data.y_test).accuracy)
        history.append(acc)
        best = max(best, acc)
        for t in THRESHOLDS:
            key = f"{int(t * 100)}"
            if reached[key] is None and acc >= t:
                reached[key] = r
        if r % 25 == 0:
            say(f"  {candidate.name}: round {r} accuracy {acc:.3f}")
        if reached["90"] is not None:
            break
    return {
        "rounds_to_60": reached["60"], "rounds_to_80": reached["80"],
        "rounds_to_90": reached["90"], "best_accuracy": round(best, 4),
        "final_accuracy": round(history[-1], 4) if history else None,
        "rounds_run": len(history), "seconds": round(time.perf_counter() - start, 1),
        "epochs": candidate.epochs, "client_lr": candidate.lr,
        "server_opt": candidate.server_opt, "server_options": candidate.server_options,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--candidates", default="all", help="comma-separated names or 'all'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    wanted = [c for c in CANDIDATES
              if args.candidates == "all" or c.name in args.candidates.split(",")]
    data = load_mnist1d()
    parts = partition_dirichlet(data.y_train, 100, alpha=0.5, seed=0)
    out: dict[str, Any] = {"rounds_max": args.rounds, "devices": 100, "per_round": 10,
                           "baseline": "fedavg_e1", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            directory = Path(tmp) / model
            build_artifacts(build_reference_model(model, 0), directory)
            trainer = open_trainer(directory)
            init = initial_parameters(directory)
            results = {}
            for cand in wanted:
                say(f"{model} / {cand.name}")
                results[cand.name] = run(cand, trainer, init, data, parts, rounds=args.rounds,
                                         per_round=10, seed=args.seed)
                say(f"  -> {results[cand.name]}")
            out["models"][model] = results
    # Which candidate reaches 80% soonest on cnn (then 90%, then mlp), ties by best accuracy.
    def score(name: str) -> tuple[float, ...]:
        keys = []
        for model in ("cnn", "mlp"):
            res = out["models"].get(model, {}).get(name)
            if res is None:
                continue
            for k in ("rounds_to_80", "rounds_to_90", "rounds_to_60"):
                keys.append(res[k] if res[k] is not None else math.inf)
        return tuple(keys)

    out["fastest"] = min((c.name for c in wanted), key=score) if wanted else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
