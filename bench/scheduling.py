"""Benchmark compute-aware scheduling: time-to-accuracy of each selection policy vs random.

One simulated heterogeneous fleet (the catalogue's default profile mix, 100 devices,
MNIST-1D split Dirichlet(0.5), seed 0), trained once per run with the same seed,
model, codec and local epochs, through ``fleetlearn.run_simulation`` (real agents,
real ONNX Runtime training, a real broker, the virtual clock). Each round is charged
the emulated time of its slowest counted device, or the whole deadline if a selected
device missed it.

The baseline, ``random``, is the project's: random selection, plain FedAvg rounds that
wait for every selected device (a deadline that never binds, no adaptive local work),
dense float32 updates. Beside it, every policy runs under one binding deadline
(``--deadline-s``, emulated seconds; the default 0.15 s is below all but the fastest
class's predicted time for the whole task in the default setting, so most devices get
fewer local steps and those whose fixed costs alone exceed it cannot make it)
with adaptive local work (a device too slow for the whole task is asked for the steps
that fit): ``random_deadline`` (random selection under that deadline, to show what the
deadline alone buys), ``deadline`` (FedCS), ``tiered`` (TiFL) and ``oort``.

For each run it reports the emulated time and rounds to the target test accuracy,
final and best accuracy, total emulated time, bytes uploaded and participation per
device profile (tasks per device, so a reader sees whether a policy starves slow
devices), and ratios against the baseline measured in the same run.

The setting: the ``cnn`` with dense float32 updates and 10 local epochs on 40,000
generated MNIST-1D samples (32,000 for training, about 320 per device), so that local
compute, where the fleet's devices differ about 14x, and slow links (not only
per-message latency) set a device's time (predicted 0.13 to 0.7 emulated seconds per
task across the fleet for a device of average data size). With the 10,000-sample
default of ``fleetlearn simulate`` (about 80 per device) per-message latency sets a
floor under every device's round time and caps the round-time gain of any policy near
2.9x. The target is 90% test accuracy, which random selection reaches around round 28
of 60. Availability patterns are off so every device class of the mix takes part for
the whole run.

    python bench/scheduling.py [--rounds 60] [--target 0.9] [--deadline-s 0.15]
                               [--num-samples 40000]
                               [--policies random_deadline,deadline,tiered,oort]

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
from fleetlearn._report import time_to_accuracy
from fleetlearn._simulate import SimConfig, run_simulation

POLICIES = ("random_deadline", "deadline", "tiered", "oort")
BASELINE = "random"
SELECTION = {"random_deadline": "random"}
"""Runs named apart from their selection policy."""


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
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every round (stderr)")
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip() and p != BASELINE]
    policies.insert(0, BASELINE)

    setting = {
        "model": args.model, "codec": args.codec, "local_epochs": args.local_epochs,
        "deadline_s": args.deadline_s, "baseline_deadline_s": args.baseline_deadline_s,
        "baseline": "random selection, rounds wait for every selected device, no adaptive "
                    "local work",
        "adaptive_local_work": "off" if args.no_adaptive_work else "policies only",
        "devices": args.devices, "per_round": args.per_round,
        "num_samples": args.num_samples,
        "rounds": args.rounds, "target_accuracy": args.target, "seed": args.seed,
        "profile_mix": DEFAULT_MIX, "partition": "dirichlet:0.5", "availability": False,
        "clock": "virtual", "mode": "sync",
    }
    say(f"scheduling bench: {args.devices} devices ({args.per_round} per round), "
        f"{args.model}, codec {args.codec}, {args.local_epochs} local epochs, deadline "
        f"{args.deadline_s} s emulated (baseline {args.baseline_deadline_s} s, no adaptive "
        f"work), {args.rounds} rounds, target {args.target:.0%}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fleetlearn-sched-") as tmp:
        for policy in policies:
            baseline = policy == BASELINE
            cfg = SimConfig(
                devices=args.devices, per_round=args.per_round, model=args.model,
                rounds=args.rounds, codec=args.codec, selection=SELECTION.get(policy, policy),
                deadline_s=args.baseline_deadline_s if baseline else args.deadline_s,
                availability=False, seed=args.seed, out_dir=Path(tmp) / policy,
                max_wall_s=900.0, num_samples=args.num_samples,
                aggregator={"local_epochs": args.local_epochs,
                            "adaptive_local_work": not (baseline or args.no_adaptive_work)},
            )
            started = time.monotonic()
            sim = run_simulation(cfg, out=sys.stderr, quiet=not args.verbose)
            row = _summarise(sim.report, target=args.target,
                             wall_s=time.monotonic() - started)
            results[policy] = row
            tt = row["time_to_target_s"]
            say(f"{policy:>15}: target {'not reached' if tt is None else f'{tt:.2f} s'}"
                f" (round {row['rounds_to_target']}), final {row['final_accuracy']}, best "
                f"{row['best_accuracy']}, {row['emulated_time_s']:.2f} s emulated over "
                f"{row['rounds']} rounds ({row['rounds_charged_deadline']} charged the "
                f"deadline), {row['mb_up']} MB up, wall {row['wall_s']} s")

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
    ranked = [p for p in results if p != BASELINE and results[p]["speedup_vs_random"]]
    best = max(ranked, key=lambda p: results[p]["speedup_vs_random"], default=None)
    out = {
        "setting": setting,
        BASELINE: base,
        "policies": {p: r for p, r in results.items() if p != BASELINE},
        "best_policy": best,
        "best_speedup_vs_random": results[best]["speedup_vs_random"] if best else None,
    }
    for policy, row in results.items():
        s = row["speedup_vs_random"]
        say(f"{policy:>15}: speedup vs random {s if s is not None else 'n/a'}x, final "
            f"accuracy (mean of last 5) {row['final_accuracy_mean_last5']} "
            f"({row['final_accuracy_delta_vs_random']:+} vs random)"
            if row["final_accuracy_delta_vs_random"] is not None else
            f"{policy:>15}: speedup vs random {s}")
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
