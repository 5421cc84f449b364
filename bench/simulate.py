"""Simulation benchmark: fleet scale, and dense vs compressed updates end to end.

Run from the repo root: ``python bench/simulate.py`` (a few minutes on 2 cores), or one
part: ``--part scale`` / ``--part codec``. Prints human lines, then one JSON object:

- ``scale``: for 100, 1,000 and 10,000 connected virtual devices (each a real agent with
  its own MQTT session, through Mosquitto), devices per round, seconds per round and the
  simulation process's peak RSS. Each size runs in its own process so peaks do not mix.
- ``codec``: the reference task (MNIST-1D, 100 devices, Dirichlet 0.5, 10 per round,
  ``cnn``) trained with dense float32 updates (the baseline) and with the default
  compressed codec, same seed: final and best accuracy, rounds to 60/80%, and total
  bytes uploaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetlearn._simulate import DEFAULT_CODEC, SimConfig, run_simulation

SCALES = ((100, 10, 3), (1000, 100, 3), (10000, 100, 2))  # devices, per round, rounds
CODEC_ROUNDS = int(os.environ.get("BENCH_SIM_ROUNDS", "100"))


def _one_scale(devices: int, per_round: int, rounds: int) -> dict[str, Any]:
    """Runs in a child process: one fleet size; prints its JSON line."""
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-") as tmp:
        started = time.monotonic()
        result = run_simulation(SimConfig(
            devices=devices, per_round=per_round, model="cnn", rounds=rounds,
            partition="iid", availability=False, out_dir=Path(tmp),
            num_samples=max(10_000, 10 * devices), max_wall_s=1500.0,
        ), quiet=True)
        total = time.monotonic() - started
    recs = result.rounds
    wall_rounds = [r["wall_s"] for r in recs]
    return {
        "connected_devices": devices,
        "devices_per_round": per_round,
        "rounds": len(recs),
        "seconds_per_round": round(sum(wall_rounds) / max(len(wall_rounds), 1), 3),
        "setup_and_run_seconds": round(total, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "reported_per_round": [r["reported"] for r in recs],
    }


def scale() -> list[dict[str, Any]]:
    out = []
    for devices, per_round, rounds in SCALES:
        print(f"scale: {devices} devices, {per_round} per round ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(devices), str(per_round), str(rounds)],
            capture_output=True, text=True, timeout=1800,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            row: dict[str, Any] = {"connected_devices": devices, "devices_per_round": per_round,
                                   "error": (proc.stderr or proc.stdout)[-800:]}
        else:
            row = json.loads(lines[-1])
        print(f"  {row}", file=sys.stderr, flush=True)
        out.append(row)
    return out


def codec() -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for name, spec in (("dense_fp32", "fp32"), ("default_compressed", DEFAULT_CODEC)):
        print(f"codec: {name} ({spec}), {CODEC_ROUNDS} rounds ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-") as tmp:
            r = run_simulation(SimConfig(rounds=CODEC_ROUNDS, codec=spec, seed=0,
                                         out_dir=Path(tmp)), quiet=True).report
        tta = r["time_to_accuracy"]
        runs[name] = {
            "codec": spec,
            "final_accuracy": r["final_accuracy"],
            "best_accuracy": r["best_accuracy"],
            "rounds_to_60": (tta.get("0.6") or {}).get("round"),
            "rounds_to_80": (tta.get("0.8") or {}).get("round"),
            "bytes_uploaded": r["bytes_up"],
            "wall_seconds": round(r["wall_time_s"], 1),
        }
        print(f"  {runs[name]}", file=sys.stderr, flush=True)
    dense, comp = runs["dense_fp32"], runs["default_compressed"]
    runs["accuracy_points_vs_dense"] = round(
        100 * ((comp["final_accuracy"] or 0) - (dense["final_accuracy"] or 0)), 2)
    runs["upload_ratio_vs_dense"] = round(dense["bytes_uploaded"] / max(comp["bytes_uploaded"], 1),
                                          1)
    runs["task"] = "MNIST-1D, 100 devices, Dirichlet(0.5), 10 per round, cnn, seed 0"
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["all", "scale", "codec"], default="all")
    parser.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one_scale(*args.one)))
        return
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if args.part in ("all", "scale"):
        result["scale"] = scale()
    if args.part in ("all", "codec"):
        result["codec"] = codec()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
