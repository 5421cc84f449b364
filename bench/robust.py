"""Robust aggregation under attack, end to end on the reference task.

20% of the devices send their true update sign-flipped and scaled by 10 (Byzantine
attackers, chosen from the seed). The same fleet, seed and rounds run with plain
FedAvg (the baseline, ``mean``) and with the robust options; a clean run without
attackers is the reference. Prints human lines, then one JSON object with final and
best test accuracy per configuration.

Run from the repo root: ``python bench/robust.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime._fleet import FaultSpec
from fleetlearn._simulate import SimConfig, run_simulation

ROUNDS = int(os.environ.get("BENCH_ROBUST_ROUNDS", "40"))
ATTACK = FaultSpec(byzantine_fraction=0.2, byzantine_scale=10.0)
RUNS: tuple[tuple[str, FaultSpec, dict[str, Any]], ...] = (
    ("clean_mean", FaultSpec(), {"robust": "mean"}),
    ("attacked_mean", ATTACK, {"robust": "mean"}),
    ("attacked_median", ATTACK, {"robust": "median"}),
    ("attacked_trimmed_mean", ATTACK, {"robust": "trimmed_mean", "trim_fraction": 0.25}),
    ("attacked_multi_krum", ATTACK, {"robust": "multi_krum", "byzantine": 4}),
    ("attacked_clipped_mean", ATTACK, {"robust": "mean", "clip_norm": 1.0}),
    ("attacked_mean_norm_screen", ATTACK, {"robust": "mean", "norm_median_multiple": 4.0}),
    # Coordinate-wise statistics suffer with sparsified updates (most coordinates of most
    # updates are zero, so their median is too): the same two with dense updates.
    ("attacked_median_dense", ATTACK, {"robust": "median", "codec": "fp32"}),
    ("attacked_trimmed_mean_dense", ATTACK, {"robust": "trimmed_mean", "trim_fraction": 0.25,
                                             "codec": "fp32"}),
)


def main() -> None:
    results: dict[str, Any] = {}
    for name, faults, agg in RUNS:
        print(f"{name}: {agg} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="fleetlearn-robust-") as tmp:
            r = run_simulation(SimConfig(rounds=ROUNDS, seed=0, faults=faults, aggregator=agg,
                                         availability=False, out_dir=Path(tmp)),
                               quiet=True).report
        results[name] = {
            "aggregation": agg,
            "byzantine_fraction": faults.byzantine_fraction,
            "final_accuracy": r["final_accuracy"],
            "best_accuracy": r["best_accuracy"],
            "rejected_updates": sum(x["rejected"] for x in r["rounds"]),
        }
        print(f"  {results[name]}", file=sys.stderr, flush=True)
    clean = results["clean_mean"]["final_accuracy"] or 0.0
    for row in results.values():
        row["points_vs_clean"] = round(100 * ((row["final_accuracy"] or 0.0) - clean), 2)
    print(json.dumps({
        "task": f"MNIST-1D, 100 devices, Dirichlet(0.5), 10 per round, cnn, {ROUNDS} rounds",
        "attack": "20% of devices send -10 x their update", "runs": results,
    }))


if __name__ == "__main__":
    main()
