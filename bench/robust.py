"""Robust aggregation under attack, end to end on the reference task.

Two parts, on the same fleet, seed and rounds:

- *defaults*: the default configuration (nothing set) with one device in ten sending
  (a) updates of L2 norm 9,000 (honest ones are ~0.3) or (b) its true update claiming
  10^12 samples, beside the clean run of the same configuration; and the same two
  attacks against the old defaults (an absolute cap of 1e4, no relative screen, no
  weight bound), which they broke.
- *robust options*: 20% of the devices send their true update sign-flipped and scaled
  by 10; plain FedAvg (``mean`` with every screen off) against each robust option
  alone (screens off as well).
- *reputation*: the same 20% attack (``--byzantine-fraction 0.2``) against the clean
  run, no defence (plain FedAvg), the defaults without reputation
  (``reputation_floor = none``: the norm screen and the weight bound) and the
  defaults (with reputation); and a sign flip at the honest updates' own norm
  (``byzantine_scale = 1``), which no norm screen can see, with and without it.

Prints human lines, then one JSON object with final and best test accuracy per run
(``defaults`` holds the first part's comparison). ``BENCH_ROBUST_RUNS=a,b`` runs only
those runs; ``BENCH_ROBUST_ROUNDS`` sets the rounds (40), ``BENCH_ROBUST_SEED`` the seed
(0: the fleet, its data, the attackers and the selections).

Run from the repo root: ``python bench/robust.py`` (about fifteen minutes on 2 idle cores;
``BENCH_ROBUST_RUNS=clean_defaults,attacked_mean,attacked_defaults_without_reputation,
attacked_defaults`` runs the reputation comparison alone).
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
SEED = int(os.environ.get("BENCH_ROBUST_SEED", "0"))
ATTACK = FaultSpec(byzantine_fraction=0.2, byzantine_scale=10.0)
HUGE_NORM = FaultSpec(byzantine_fraction=0.1, byzantine_kind="norm", byzantine_scale=9000.0)
INFLATED = FaultSpec(byzantine_fraction=0.1, byzantine_kind="samples")
FLIP_SAME_NORM = FaultSpec(byzantine_fraction=0.2, byzantine_scale=1.0)
OLD_DEFAULTS: dict[str, Any] = {"max_update_norm": 1e4, "norm_median_multiple": None,
                                "max_weight_multiple": None}
NO_REPUTATION: dict[str, Any] = {"reputation_floor": None}
PLAIN: dict[str, Any] = {"robust": "mean", "norm_median_multiple": None,
                         "max_weight_multiple": None, "reputation_floor": None}
"""Plain FedAvg: every screen off (the baseline of the robust options)."""
RUNS: tuple[tuple[str, FaultSpec, dict[str, Any]], ...] = (
    ("clean_defaults", FaultSpec(), {}),
    ("defaults_norm_9000", HUGE_NORM, {}),
    ("defaults_inflated_samples", INFLATED, {}),
    ("defaults_norm_9000_without_reputation", HUGE_NORM, NO_REPUTATION),
    ("defaults_inflated_samples_without_reputation", INFLATED, NO_REPUTATION),
    ("old_defaults_norm_9000", HUGE_NORM, OLD_DEFAULTS),
    ("old_defaults_inflated_samples", INFLATED, OLD_DEFAULTS),
    ("attacked_defaults_without_reputation", ATTACK, NO_REPUTATION),
    ("attacked_defaults", ATTACK, {}),
    ("flip_same_norm_defaults_without_reputation", FLIP_SAME_NORM, NO_REPUTATION),
    ("flip_same_norm_defaults", FLIP_SAME_NORM, {}),
    ("clean_mean", FaultSpec(), PLAIN),
    ("attacked_mean", ATTACK, PLAIN),
    ("attacked_median", ATTACK, {**PLAIN, "robust": "median"}),
    ("attacked_trimmed_mean", ATTACK, {**PLAIN, "robust": "trimmed_mean", "trim_fraction": 0.25}),
    ("attacked_multi_krum", ATTACK, {**PLAIN, "robust": "multi_krum", "byzantine": 4}),
    ("attacked_clipped_mean", ATTACK, {**PLAIN, "clip_norm": 1.0}),
    ("attacked_mean_norm_screen", ATTACK, {**PLAIN, "norm_median_multiple": 4.0}),
    # Coordinate-wise statistics suffer with sparsified updates (most coordinates of most
    # updates are zero, so their median is too): the same two with dense updates.
    ("attacked_median_dense", ATTACK, {**PLAIN, "robust": "median", "codec": "fp32"}),
    ("attacked_trimmed_mean_dense", ATTACK, {**PLAIN, "robust": "trimmed_mean",
                                             "trim_fraction": 0.25, "codec": "fp32"}),
)


def main() -> None:
    wanted = os.environ.get("BENCH_ROBUST_RUNS")
    runs = [r for r in RUNS if not wanted or r[0] in wanted.split(",")]
    results: dict[str, Any] = {}
    for name, faults, agg in runs:
        print(f"{name}: {agg} ...", file=sys.stderr, flush=True)
        # The codec is the simulation's own setting (it reports it); the rest go to its
        # aggregator.
        own = {k: v for k, v in agg.items() if k == "codec"}
        rest = {k: v for k, v in agg.items() if k != "codec"}
        with tempfile.TemporaryDirectory(prefix="fleetlearn-robust-") as tmp:
            r = run_simulation(SimConfig(rounds=ROUNDS, seed=SEED, faults=faults, aggregator=rest,
                                         availability=False, out_dir=Path(tmp), **own),
                               quiet=True).report
        results[name] = {
            "aggregation": agg,
            "byzantine_fraction": faults.byzantine_fraction,
            "attack": faults.byzantine_kind if faults.byzantine_fraction else None,
            "byzantine_scale": faults.byzantine_scale if faults.byzantine_fraction else None,
            "final_accuracy": r["final_accuracy"],
            "best_accuracy": r["best_accuracy"],
            "mean_last_5_accuracy": _mean_last(r["rounds"], 5),
            "rejected_updates": sum(x["rejected"] for x in r["rounds"]),
            "reputation": r["reputation_summary"],
        }
        print(f"  {results[name]}", file=sys.stderr, flush=True)
    for name, row in results.items():
        ref = results.get("clean_defaults" if "defaults" in name or "flip" in name
                          else "clean_mean")
        if ref is not None:
            row["points_vs_clean"] = round(
                100 * ((row["final_accuracy"] or 0.0) - (ref["final_accuracy"] or 0.0)), 2)
    defaults = {k: results[k]["final_accuracy"] for k in
                ("clean_defaults", "defaults_norm_9000", "defaults_inflated_samples",
                 "old_defaults_norm_9000", "old_defaults_inflated_samples") if k in results}
    if "clean_defaults" in defaults:
        clean = defaults["clean_defaults"] or 0.0
        print("default configuration, 1 device in 10 attacking (final test accuracy):",
              file=sys.stderr)
        for k, acc in defaults.items():
            print(f"  {k:32s} {100 * (acc or 0.0):5.1f}%  ({100 * ((acc or 0.0) - clean):+.1f} "
                  "points vs clean)", file=sys.stderr)
    reputation = _reputation_table(results)
    print(json.dumps({
        "task": f"MNIST-1D, 100 devices, Dirichlet(0.5), 10 per round, cnn, {ROUNDS} rounds, "
                f"seed {SEED}",
        "attack": "defaults: 10% of devices send norm-9,000 updates or claim 10^12 samples; "
                  "robust options: 20% of devices send -10 x their update",
        "defaults": {**{f"{k}_accuracy": v for k, v in defaults.items()},
                     "within_2_points_of_clean": (
                         all(abs((defaults[k] or 0.0) - (defaults["clean_defaults"] or 0.0))
                             <= 0.02 for k in ("defaults_norm_9000",
                                               "defaults_inflated_samples") if k in defaults)
                         if "clean_defaults" in defaults else None)},
        "reputation": reputation,
        "runs": results,
    }))


def _mean_last(rounds: list[dict[str, Any]], n: int) -> float | None:
    accs = [r["accuracy"] for r in rounds if r["accuracy"] is not None][-n:]
    return round(sum(accs) / len(accs), 4) if accs else None


def _reputation_table(results: dict[str, Any]) -> dict[str, Any]:
    """The reputation part: final accuracy of each run, points against the clean run,
    and whether reputation is within 2 points of it."""
    names = {"clean": "clean_defaults", "no_defence": "attacked_mean",
             "existing_defaults": "attacked_defaults_without_reputation",
             "reputation": "attacked_defaults",
             "same_norm_flip_existing_defaults": "flip_same_norm_defaults_without_reputation",
             "same_norm_flip_reputation": "flip_same_norm_defaults"}
    out: dict[str, Any] = {}
    clean = results.get("clean_defaults", {}).get("final_accuracy")
    for key, run in names.items():
        if run not in results:
            continue
        acc = results[run]["final_accuracy"]
        out[f"{key}_accuracy"] = acc
        if clean is not None and acc is not None:
            out[f"{key}_points_vs_clean"] = round(100 * (acc - clean), 2)
    if "reputation_points_vs_clean" in out:  # the attack of --byzantine-fraction 0.2
        out["reputation_within_2_points_of_clean"] = abs(out["reputation_points_vs_clean"]) <= 2
    for key, run in names.items():  # the last rounds' mean: less noisy than the last one
        if run in results:
            out[f"{key}_mean_last_5_accuracy"] = results[run]["mean_last_5_accuracy"]
    if clean is not None:
        print("20% Byzantine devices (final test accuracy):", file=sys.stderr)
        for key in names:
            if f"{key}_accuracy" in out:
                acc = out[f"{key}_accuracy"] or 0.0
                print(f"  {key:36s} {100 * acc:5.1f}%  ({100 * (acc - clean):+.1f} points vs "
                      "clean)", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
