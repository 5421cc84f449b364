"""Benchmark compute-aware scheduling: time-to-accuracy of each selection policy vs random.

One simulated heterogeneous fleet (the catalogue's default profile mix, 100 devices,
MNIST-1D split Dirichlet(0.5)), trained once per run with the same seed, model, codec
and local epochs, through ``fleetlearn.run_simulation`` (real agents, real ONNX
Runtime training, a real broker, the virtual clock), for each of several seeds (the
seed sets the data split, the fleet's order and every random choice; each policy is
compared with the baseline of the same seed). Each round is charged the emulated time
of its slowest counted device, or the whole deadline if a selected device missed it.

The baseline, ``random``, is the project's: random selection, plain FedAvg rounds that
wait for every selected device (a deadline that never binds, no adaptive local work),
dense float32 updates. Beside it, every policy runs under one binding deadline
(``--deadline-s``, emulated seconds; the default 0.15 s is below all but the fastest
class's predicted time for the whole task, so most devices get fewer local steps and
those whose fixed costs alone exceed it cannot make it) with adaptive local work (a
device too slow for the whole task is asked for the steps that fit):

- ``random_deadline``: random selection under that deadline (what the deadline and
  adaptive work alone buy);
- ``deadline``: FedCS, every device predicted to finish, up to ``--max-selected``
  (default 3 x ``--per-round``; FedCS takes as many devices as will finish, since one
  that fits adds data to a round without making it longer);
- ``deadline_k``: FedCS capped at the count random selection uses (what the choice of
  devices alone buys);
- ``tiered`` (TiFL) and ``oort``, with the same count as random.

For each run it reports the emulated time and rounds to the target test accuracy,
final (mean of the last 5 rounds) and best accuracy, total emulated time, bytes
uploaded and participation per device profile (tasks per device, so a reader sees
whether a policy starves slow devices), and ratios against the baseline of the same
seed; then, per policy across the seeds, the speedups (minimum and mean), the final
accuracy differences (and their mean) and ``meets_target``: at least 3x sooner on
every seed with a final accuracy not lower than random's on average.

The setting: the ``cnn`` with dense float32 updates and 10 local epochs on 40,000
generated MNIST-1D samples (32,000 for training, about 320 per device), so that local
compute, where the fleet's devices differ about 14x, and slow links (not only
per-message latency) set a device's time (predicted 0.13 to 0.7 emulated seconds per
task across the fleet for a device of average data size). With the 10,000-sample
default of ``fleetlearn simulate`` (about 80 per device) per-message latency sets a
floor under every device's round time and caps the round-time gain of any policy near
2.9x. The target is 90% test accuracy, which random selection reaches around round 30
of 60. Availability patterns are off so every device class of the mix takes part for
the whole run. Three seeds and six runs each take about 20 minutes here.

``--slow-fraction`` makes that share of devices slower than their profile says (by
``--slow-factor``), in every run: the aggregator predicts them from the profile and
must learn from their observed durations.

    python bench/scheduling.py [--seeds 0,1,2] [--rounds 60] [--target 0.9]
                               [--deadline-s 0.15] [--num-samples 40000]
                               [--max-selected 30]
                               [--policies random_deadline,deadline,deadline_k,tiered,oort]

Human lines go to stderr as it runs; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_profiles import DEFAULT_MIX
from edge_runtime._fleet import FaultSpec
from fleetlearn._report import time_to_accuracy
from fleetlearn._simulate import SimConfig, run_simulation

POLICIES = ("random_deadline", "deadline", "deadline_k", "tiered", "oort")
BASELINE = "random"
SELECTION = {"random_deadline": "random", "deadline_k": "deadline"}
"""Runs named apart from their selection policy."""
TARGET_SPEEDUP = 3.0
"""A policy meets the target when it is this much faster on every seed and its final
accuracy is not lower than random's on average."""
FEDCS_WIDTH = 3
"""FedCS (``deadline``) takes up to this many times ``--per-round`` devices that fit."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 3)


def _summarise(report: dict[str, Any], *, target: float, wall_s: float) -> dict[str, Any]:
    rounds = [r for r in report["rounds"] if r["outcome"] != "abandoned"]
    reached = time_to_accuracy(rounds, target)
    accs = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
    tail = accs[-5:]
    round_s = [r["emulated_round_s"] for r in rounds]
    participation = {
        name: {
            "devices": row["devices"],
            "tasks": row["tasks"],
            "completed": row["completed"],
            "missed_or_dropped": row["dropped"],
            "tasks_per_device": round(row["tasks"] / row["devices"], 2) if row["devices"] else 0,
        }
        for name, row in sorted(report["participation"].items())
    }
    return {
        "time_to_target_s": reached["emulated_time_s"] if reached else None,
        "rounds_to_target": reached["round"] if reached else None,
        "final_accuracy": report["final_accuracy"],
        "final_accuracy_mean_last5": round(sum(tail) / len(tail), 4) if tail else None,
        "best_accuracy": report["best_accuracy"],
        "rounds": len(rounds),
        "abandoned_rounds": report["abandoned_rounds"],
        "emulated_time_s": round(report["emulated_time_s"], 4),
        "mean_round_s": round(sum(round_s) / len(round_s), 4) if round_s else None,
        "rounds_charged_deadline": sum(1 for r in rounds if r["dropped"] > 0),
        "updates_counted": sum(r["reported"] for r in rounds),
        "updates_missed": sum(r["dropped"] for r in rounds),
        "bytes_up": report["bytes_up"],
        "mb_up": round(report["bytes_up"] / 1e6, 3),
        "participation": participation,
        "wall_s": round(wall_s, 1),
    }


def _run(policy: str, args: argparse.Namespace, seed: int, tmp: Path) -> dict[str, Any]:
    baseline = policy == BASELINE
    options: dict[str, Any] = {"local_epochs": args.local_epochs,
                               "adaptive_local_work": not (baseline or args.no_adaptive_work)}
    if policy == "deadline":
        options["max_selected"] = args.max_selected or FEDCS_WIDTH * args.per_round
    cfg = SimConfig(
        devices=args.devices, per_round=args.per_round, model=args.model,
        rounds=args.rounds, codec=args.codec, selection=SELECTION.get(policy, policy),
        deadline_s=args.baseline_deadline_s if baseline else args.deadline_s,
        availability=False, seed=seed, out_dir=tmp / f"{policy}-{seed}",
        max_wall_s=900.0, num_samples=args.num_samples, aggregator=options,
        faults=FaultSpec(slow_fraction=args.slow_fraction, slow_factor=args.slow_factor),
    )
    started = time.monotonic()
    sim = run_simulation(cfg, out=sys.stderr, quiet=not args.verbose)
    row = _summarise(sim.report, target=args.target, wall_s=time.monotonic() - started)
    tt = row["time_to_target_s"]
    say(f"seed {seed} {policy:>15}: target {'not reached' if tt is None else f'{tt:.2f} s'}"
        f" (round {row['rounds_to_target']}), final {row['final_accuracy']}, best "
        f"{row['best_accuracy']}, {row['emulated_time_s']:.2f} s emulated over "
        f"{row['rounds']} rounds ({row['rounds_charged_deadline']} charged the "
        f"deadline), {row['mb_up']} MB up, wall {row['wall_s']} s")
    return row


def _compare(results: dict[str, dict[str, Any]]) -> None:
    """Ratios of every run against the baseline of the same seed, in place."""
    base = results[BASELINE]
    for row in results.values():
        row["speedup_vs_random"] = _ratio(base["time_to_target_s"], row["time_to_target_s"])
        row["rounds_ratio_vs_random"] = _ratio(row["rounds_to_target"],
                                               base["rounds_to_target"])
        row["mean_round_speedup_vs_random"] = _ratio(base["mean_round_s"],
                                                     row["mean_round_s"])
        fa, fb = row["final_accuracy_mean_last5"], base["final_accuracy_mean_last5"]
        row["final_accuracy_delta_vs_random"] = (
            round(fa - fb, 4) if fa is not None and fb is not None else None)


def _across_seeds(per_seed: dict[int, dict[str, dict[str, Any]]], policy: str) -> dict[str, Any]:
    rows = [results[policy] for results in per_seed.values()]
    speedups = [r["speedup_vs_random"] for r in rows]
    deltas = [r["final_accuracy_delta_vs_random"] for r in rows]
    reached = [s for s in speedups if s is not None]
    known = [d for d in deltas if d is not None]
    return {
        "speedup_vs_random": speedups,
        "speedup_min": min(reached) if len(reached) == len(rows) else None,
        "speedup_mean": round(sum(reached) / len(reached), 3) if reached else None,
        "final_accuracy_delta_vs_random": deltas,
        "final_accuracy_delta_mean": round(sum(known) / len(known), 4) if known else None,
        "mb_up_mean": round(sum(r["mb_up"] for r in rows) / len(rows), 3),
        "meets_target": bool(len(reached) == len(rows) and min(reached) >= TARGET_SPEEDUP
                             and known and sum(known) / len(known) >= 0.0),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--target", type=float, default=0.9, help="target test accuracy")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--deadline-s", type=float, default=0.15,
                    help="round deadline of the policies, in emulated seconds")
    ap.add_argument("--baseline-deadline-s", type=float, default=30.0,
                    help="deadline of the random baseline (emulated seconds; never binds)")
    ap.add_argument("--no-adaptive-work", action="store_true",
                    help="policies too send every device the whole task (slow ones miss)")
    ap.add_argument("--num-samples", type=int, default=40_000,
                    help="MNIST-1D samples generated (80%% train, split over the devices)")
    ap.add_argument("--max-selected", type=int, default=None,
                    help=f"FedCS (deadline) takes up to this many devices that fit "
                         f"(default {FEDCS_WIDTH} x --per-round)")
    ap.add_argument("--slow-fraction", type=float, default=0.0,
                    help="share of devices slower than their profile says (every run)")
    ap.add_argument("--slow-factor", type=float, default=3.0)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each")
    ap.add_argument("--verbose", action="store_true", help="print every round (stderr)")
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip() and p != BASELINE]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        ap.error(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    policies.insert(0, BASELINE)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]

    setting = {
        "model": args.model, "codec": args.codec, "local_epochs": args.local_epochs,
        "deadline_s": args.deadline_s, "baseline_deadline_s": args.baseline_deadline_s,
        "baseline": "random selection, rounds wait for every selected device, no adaptive "
                    "local work",
        "adaptive_local_work": "off" if args.no_adaptive_work else "policies only",
        "devices": args.devices, "per_round": args.per_round,
        "fedcs_max_selected": args.max_selected or FEDCS_WIDTH * args.per_round,
        "num_samples": args.num_samples,
        "slow_devices": {"fraction": args.slow_fraction, "factor": args.slow_factor},
        "rounds": args.rounds, "target_accuracy": args.target, "seeds": seeds,
        "profile_mix": DEFAULT_MIX, "partition": "dirichlet:0.5", "availability": False,
        "clock": "virtual", "mode": "sync",
    }
    say(f"scheduling bench: {args.devices} devices ({args.per_round} per round), "
        f"{args.model}, codec {args.codec}, {args.local_epochs} local epochs, deadline "
        f"{args.deadline_s} s emulated (baseline {args.baseline_deadline_s} s, no adaptive "
        f"work), {args.rounds} rounds, target {args.target:.0%}, seeds {seeds}")
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fleetlearn-sched-") as tmp:
        for seed in seeds:
            results = {policy: _run(policy, args, seed, Path(tmp)) for policy in policies}
            _compare(results)
            per_seed[seed] = results

    summary = {p: _across_seeds(per_seed, p) for p in policies if p != BASELINE}
    ranked = [p for p in summary if summary[p]["speedup_min"] is not None]
    best = max(ranked, key=lambda p: summary[p]["speedup_min"], default=None)
    out = {
        "setting": setting,
        "summary": summary,
        "best_policy": best,
        "best_speedup_min": summary[best]["speedup_min"] if best else None,
        "target_met": [p for p in summary if summary[p]["meets_target"]],
        "runs": {str(seed): results for seed, results in per_seed.items()},
    }
    for policy, row in summary.items():
        say(f"{policy:>15}: speedup vs random {row['speedup_vs_random']} (min "
            f"{row['speedup_min']}, mean {row['speedup_mean']}), final accuracy vs random "
            f"{row['final_accuracy_delta_vs_random']} (mean "
            f"{row['final_accuracy_delta_mean']}), {row['mb_up_mean']} MB up")
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
