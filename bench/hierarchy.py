"""Edge tiers against a flat fleet: cloud ingress per round and cloud-tier accuracy.

Both runs are real: Mosquitto brokers (one for the cloud and, in the tree, one per edge
site), a real cloud ``Aggregator``, real ``EdgeAggregator``s and real device agents
training MNIST-1D (Dirichlet 0.5, seed 0) with ONNX Runtime, over MQTT.

- tree: ``--edges`` edges of ``--devices-per-edge`` devices; each cloud round gives
  each edge one task, the edge runs ``--rounds-per-task`` rounds with all its devices
  and answers with one update;
- flat (the baseline, same run): the same devices attached to the cloud directly; each
  cloud round trains every device once, and there are ``--rounds-per-task`` times as
  many cloud rounds, so both spend the same device compute (device-tasks).

Both tiers aggregate with plain FedAvg (server lr 1). Reported: bytes the cloud's
broker delivered to the cloud aggregator per cloud round (its updates' bytes,
``bytes_up``), updates per cloud round, test accuracy at the cloud after equal device
compute, and the ratios.

    python bench/hierarchy.py [--edges 3] [--devices-per-edge 10] [--rounds 15]
                              [--rounds-per-task 1] [--codec fp32] [--model mlp]

Human lines go to stderr as it runs; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetlearn._tree import LocalTree, TreeSpec


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(spec: TreeSpec, *, flat: bool, workdir: Path, timeout_s: float) -> dict[str, Any]:
    label = "flat" if flat else "tree"
    tree = LocalTree(spec, workdir=workdir / label, flat=flat)
    started = time.monotonic()
    try:
        tree.start()
        if not tree.wait_ready(timeout_s=120):
            raise RuntimeError(f"{label}: the cloud did not see its children in 120 s")
        cloud = tree.cloud
        assert cloud is not None
        history = tree.run(timeout_s=timeout_s)
        closed = [m for m in history if m.outcome == "closed"]
        for m in closed:
            say(f"  {label} round {m.round:3d}: accuracy {m.accuracy or 0:.3f}, "
                f"{m.devices_reported} updates, {m.bytes_up / 1e3:.1f} kB in")
        rounds = len(closed)
        ingress = [m.bytes_up for m in closed]
        edge_rounds = sum(len([m for m in e.aggregator.history if m.outcome == "closed"])
                          for e in tree.edges if e is not None)
        return {
            "cloud_rounds": rounds,
            "final_accuracy": closed[-1].accuracy if closed else None,
            "accuracy_by_round": [m.accuracy for m in closed],
            "cloud_ingress_bytes_per_round": sum(ingress) / rounds if rounds else None,
            "cloud_ingress_bytes_total": sum(ingress),
            "cloud_updates_per_round": (sum(m.devices_reported for m in closed) / rounds
                                        if rounds else None),
            "edge_rounds": edge_rounds,
            "device_tasks": (sum(m.devices_reported for m in closed) if flat else
                             sum(m.devices_reported for e in tree.edges if e is not None
                                 for m in e.aggregator.history if m.outcome == "closed")),
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        tree.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=3)
    parser.add_argument("--devices-per-edge", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15, help="cloud rounds of the tree")
    parser.add_argument("--rounds-per-task", type=int, default=1)
    parser.add_argument("--codec", default="fp32")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    spec = TreeSpec(edges=args.edges, devices_per_edge=args.devices_per_edge,
                    cloud_rounds=args.rounds, rounds_per_task=args.rounds_per_task,
                    codec=args.codec, model=args.model, local_epochs=args.local_epochs)
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-hierarchy-") as tmp:
        say(f"tree: 1 cloud, {spec.edges} edges, {spec.devices_per_edge} devices each, "
            f"{spec.cloud_rounds} cloud rounds x {spec.rounds_per_task} edge rounds")
        tree = run(spec, flat=False, workdir=Path(tmp), timeout_s=args.timeout_s)
        say(f"flat: {spec.edges * spec.devices_per_edge} devices on the cloud, "
            f"{spec.cloud_rounds * spec.rounds_per_task} cloud rounds")
        flat = run(spec, flat=True, workdir=Path(tmp), timeout_s=args.timeout_s)
    tree_in, flat_in = tree["cloud_ingress_bytes_per_round"], flat["cloud_ingress_bytes_per_round"]
    result = {
        "benchmark": "hierarchy",
        "model": spec.model,
        "codec": spec.codec,
        "edges": spec.edges,
        "devices_per_edge": spec.devices_per_edge,
        "rounds_per_task": spec.rounds_per_task,
        "tree": tree,
        "flat": flat,
        "cloud_ingress_ratio_flat_vs_tree": (flat_in / tree_in if tree_in and flat_in
                                             else None),
        "cloud_ingress_total_ratio_flat_vs_tree": (
            flat["cloud_ingress_bytes_total"] / tree["cloud_ingress_bytes_total"]
            if tree["cloud_ingress_bytes_total"] else None),
        "accuracy_tree_minus_flat": (
            tree["final_accuracy"] - flat["final_accuracy"]
            if tree["final_accuracy"] is not None and flat["final_accuracy"] is not None
            else None),
    }
    say(f"cloud ingress per round: tree {tree_in or 0:.0f} B, flat {flat_in or 0:.0f} B "
        f"({result['cloud_ingress_ratio_flat_vs_tree'] or 0:.1f}x); final accuracy tree "
        f"{tree['final_accuracy'] or 0:.3f}, flat {flat['final_accuracy'] or 0:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
