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

- agglo (with ``--tier-models``, same run): the tree again, agglomerative: devices train
  the device model (``--model``, as in the two runs above: same devices, data split,
  device compute and device upload bytes), edges the edge model, the cloud the cloud
  model, knowledge moved by distillation on a public bridge set (``fleetlearn._agglo``).
  Its cloud-tier accuracy is the cloud model's on the same test set.

Each run also reports its tiers' training work per cloud round (``tier_compute``): the
devices' tasks and, for the agglomerative run, the edges' and the cloud's distillations
(wall seconds measured on this machine, and the cost model's training time for the
same samples on each tier's catalogue profile, ``--tier-profiles``).

Both tiers aggregate with plain FedAvg (server lr 1). Reported: bytes the cloud's
broker delivered to the cloud aggregator per cloud round (its updates' bytes,
``bytes_up``), updates per cloud round, test accuracy at the cloud after equal device
compute, and the ratios.

    python bench/hierarchy.py [--edges 3] [--devices-per-edge 10] [--rounds 15]
                              [--rounds-per-task 1] [--codec fp32] [--model mlp]
                              [--tier-models device:mlp,edge:cnn,cloud:cnn-wide | none]
                              [--runs tree,flat,agglo] [--tier-profiles device:pi4,...]

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

from dataclasses import replace

import numpy as np

from device_profiles import Task, get_profile, predict
from fleetlearn._agglo import DistillSettings
from fleetlearn._tree import LocalTree, TreeSpec

DEFAULT_PROFILES = {"device": "pi4", "edge": "x86-gateway", "cloud": "x86-gateway"}
"""Catalogue profiles of the tiers (the catalogue has no server class: the cloud is
priced as a gateway, an upper bound on its time)."""


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def tier_compute(tree: LocalTree, rounds: int, profiles: dict[str, str]) -> dict[str, Any]:
    """Each tier's training work per cloud round: measured here (the distillations'
    wall seconds on this machine) and predicted on the tier's device profile (the cost
    model's training time for those samples on that hardware)."""
    spec, tiers = tree.spec, tree.tier_models
    per_device = float(np.mean([len(p) for p in tree.parts]))
    device_task = Task(model_bytes=0, update_bytes=0, n_samples=round(per_device),
                       epochs=spec.local_epochs, batch_size=spec.batch_size, model=tiers.device)
    tasks = spec.edges * (spec.edge_devices_per_round or spec.devices_per_edge)
    if not tree.flat:
        tasks *= spec.rounds_per_task  # flat: rounds_per_task times as many cloud rounds
    out: dict[str, Any] = {"device": {
        "model": tiers.device, "profile": profiles["device"],
        "predicted_s_per_device_task": predict(get_profile(profiles["device"]),
                                               device_task).train_s,
        "device_tasks_per_cloud_round": tasks}}
    models: dict[str, list[Any]] = {"edge": [], "cloud": []}
    for edge in tree.edges:
        if edge is not None and edge.tier is not None:
            models["edge"] += [edge.tier.own, edge.tier.child]
    if tree.cloud_strategy is not None:
        models["cloud"] += [tree.cloud_strategy.own, tree.cloud_strategy.child]
    for tier, used in models.items():
        if tier == "edge" and tree.flat:
            continue
        entry: dict[str, Any] = {"model": getattr(tiers, tier), "profile": profiles[tier],
                                 "measured_s_per_round": 0.0, "predicted_s_per_round": 0.0,
                                 "distilled_samples_per_round": 0.0}
        profile = get_profile(profiles[tier])
        for m in used:
            samples = m.samples_distilled / rounds
            entry["measured_s_per_round"] += m.seconds / rounds
            entry["distilled_samples_per_round"] += samples
            if samples:
                task = Task(model_bytes=0, update_bytes=0, n_samples=round(samples),
                            batch_size=m.settings.batch_size, model=m.name)
                entry["predicted_s_per_round"] += predict(profile, task).train_s
        if tier == "edge" and used:
            entry["measured_s_per_round"] /= spec.edges  # per edge
            entry["predicted_s_per_round"] /= spec.edges
            entry["distilled_samples_per_round"] /= spec.edges
        out[tier] = entry
    return out


def run(spec: TreeSpec, *, flat: bool, workdir: Path, timeout_s: float,
        label: str | None = None, profiles: dict[str, str] | None = None) -> dict[str, Any]:
    profiles = profiles or dict(DEFAULT_PROFILES)
    label = label or ("flat" if flat else "tree")
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
        device_bytes_up = (sum(m.bytes_up for m in closed) if flat else
                           sum(m.bytes_up for e in tree.edges if e is not None
                               for m in e.aggregator.history if m.outcome == "closed"))
        agglo: dict[str, Any] = {}
        if tree.cloud_strategy is not None:
            accuracy = [a for _, a in tree.cloud_strategy.tier_accuracy]
            for v, a in tree.cloud_strategy.tier_accuracy:
                say(f"  {label} cloud model after version {v:3d}: accuracy {a:.3f}")
            device_model = tree._tier_model(tree.tier_models.device)
            x_test, y_test = tree.data.x_test, tree.data.y_test
            agglo = {"tier_models": tree.tier_models.text(),
                     "edges_device_model_accuracy": [
                         device_model.accuracy(e.aggregator.params, x_test, y_test)
                         for e in tree.edges if e is not None],
                     "exchange_model_final_accuracy": closed[-1].accuracy if closed else None,
                     "cloud_model_accuracy_by_round": accuracy,
                     "distill_kl_by_round": tree.cloud_strategy.distil_kl}
        compute = tier_compute(tree, rounds, profiles) if rounds else None
        edge_rounds = sum(len([m for m in e.aggregator.history if m.outcome == "closed"])
                          for e in tree.edges if e is not None)
        final = closed[-1].accuracy if closed else None
        if agglo:
            final = agglo["cloud_model_accuracy_by_round"][-1] if closed else None
        by_round = (agglo["cloud_model_accuracy_by_round"] if agglo
                    else [m.accuracy for m in closed])
        tail = [a for a in by_round[-5:] if a is not None]
        return {
            "cloud_rounds": rounds,
            "final_accuracy": final,
            "accuracy_mean_last5": sum(tail) / len(tail) if tail else None,
            "accuracy_by_round": [m.accuracy for m in closed],
            "cloud_ingress_bytes_per_round": sum(ingress) / rounds if rounds else None,
            "cloud_ingress_bytes_total": sum(ingress),
            "cloud_updates_per_round": (sum(m.devices_reported for m in closed) / rounds
                                        if rounds else None),
            "edge_rounds": edge_rounds,
            "device_tasks": (sum(m.devices_reported for m in closed) if flat else
                             sum(m.devices_reported for e in tree.edges if e is not None
                                 for m in e.aggregator.history if m.outcome == "closed")),
            "device_upload_bytes": device_bytes_up,
            "tier_compute": compute,
            "cloud_distrusted_per_round": ([m.devices_distrusted for m in closed]),
            "seconds": round(time.monotonic() - started, 1),
            **agglo,
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
    parser.add_argument("--tier-models", default="device:mlp,edge:cnn,cloud:cnn-wide",
                        help="the agglomerative run's models ('none': no such run); the "
                        "device tier must be --model")
    parser.add_argument("--runs", default="tree,flat,agglo",
                        help="which runs (comma-separated): tree, flat, agglo")
    parser.add_argument("--agglo-cloud-reputation-floor", default="0.3",
                        help="the agglomerative run's cloud reputation_floor ('none': off)")
    parser.add_argument("--tier-profiles", default="device:pi4,edge:x86-gateway,"
                        "cloud:x86-gateway", help="catalogue profile of each tier, for the "
                        "predicted compute per tier")
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--feedback-epochs", type=int, default=0,
                        help="parent -> child distillation epochs at the edges (measured "
                        "on this task: it costs the cloud model points, see README)")
    parser.add_argument("--cloud-feedback-epochs", type=int, default=None,
                        help="... at the cloud (default: --feedback-epochs)")
    parser.add_argument("--distill-temperature", type=float, default=2.0)
    parser.add_argument("--no-ensemble", action="store_true",
                        help="distil from the children's FedAvg, not their models' ensemble")
    parser.add_argument("--bridge-samples", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    spec = TreeSpec(edges=args.edges, devices_per_edge=args.devices_per_edge,
                    cloud_rounds=args.rounds, rounds_per_task=args.rounds_per_task,
                    codec=args.codec, model=args.model, local_epochs=args.local_epochs)
    agglo_spec = None
    if args.tier_models != "none":
        floor = args.agglo_cloud_reputation_floor
        agglo_spec = replace(spec, tier_models=args.tier_models,
                             cloud_reputation_floor=None if floor == "none" else float(floor),
                             bridge_samples=args.bridge_samples,
                             distill=DistillSettings(epochs=args.distill_epochs,
                                                     feedback_epochs=args.feedback_epochs,
                                                     temperature=args.distill_temperature,
                                                     ensemble=not args.no_ensemble))
        if args.cloud_feedback_epochs is not None:
            agglo_spec = replace(agglo_spec, cloud_distill=replace(
                agglo_spec.distill, feedback_epochs=args.cloud_feedback_epochs))
        if agglo_spec.tiers().device != spec.model:
            parser.error(f"--tier-models: the device tier must train --model {spec.model}")
    profiles = dict(DEFAULT_PROFILES)
    for part in filter(None, (p.strip() for p in args.tier_profiles.split(","))):
        tier, _, name = part.partition(":")
        if tier not in profiles:
            parser.error(f"--tier-profiles: unknown tier {tier!r} (device, edge, cloud)")
        get_profile(name)  # an unknown profile lists the known ones
        profiles[tier] = name
    runs = {r.strip() for r in args.runs.split(",") if r.strip()}
    if not runs or runs - {"tree", "flat", "agglo"}:
        parser.error(f"--runs: choose among tree, flat, agglo, got {args.runs!r}")
    if agglo_spec is None:
        runs.discard("agglo")
    tree = flat = agglo = None
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-hierarchy-") as tmp:
        if "tree" in runs:
            say(f"tree: 1 cloud, {spec.edges} edges, {spec.devices_per_edge} devices each, "
                f"{spec.cloud_rounds} cloud rounds x {spec.rounds_per_task} edge rounds")
            tree = run(spec, flat=False, workdir=Path(tmp), timeout_s=args.timeout_s,
                       profiles=profiles)
        if "flat" in runs:
            say(f"flat: {spec.edges * spec.devices_per_edge} devices on the cloud, "
                f"{spec.cloud_rounds * spec.rounds_per_task} cloud rounds")
            flat = run(spec, flat=True, workdir=Path(tmp), timeout_s=args.timeout_s,
                       profiles=profiles)
        if agglo_spec is not None and "agglo" in runs:
            say(f"agglo: the tree again, models {agglo_spec.tiers().text()}")
            agglo = run(agglo_spec, flat=False, workdir=Path(tmp), timeout_s=args.timeout_s,
                        label="agglo", profiles=profiles)
    tree_in = tree["cloud_ingress_bytes_per_round"] if tree else None
    flat_in = flat["cloud_ingress_bytes_per_round"] if flat else None
    result: dict[str, Any] = {
        "benchmark": "hierarchy",
        "model": spec.model,
        "codec": spec.codec,
        "edges": spec.edges,
        "devices_per_edge": spec.devices_per_edge,
        "rounds_per_task": spec.rounds_per_task,
        "distill": None if agglo_spec is None else vars(agglo_spec.distill),
        "cloud_distill": (None if agglo_spec is None or agglo_spec.cloud_distill is None
                          else vars(agglo_spec.cloud_distill)),
        "bridge_samples": None if agglo_spec is None else agglo_spec.bridge_samples,
        "tier_profiles": profiles,
        "tree": tree,
        "flat": flat,
        "cloud_ingress_ratio_flat_vs_tree": (flat_in / tree_in if tree_in and flat_in
                                             else None),
        "cloud_ingress_total_ratio_flat_vs_tree": (
            flat["cloud_ingress_bytes_total"] / tree["cloud_ingress_bytes_total"]
            if tree and flat and tree["cloud_ingress_bytes_total"] else None),
        "accuracy_tree_minus_flat": _minus(tree, flat),
        "agglo": agglo,
        "accuracy_agglo_minus_flat": _minus(agglo, flat),
        "accuracy_agglo_minus_tree": _minus(agglo, tree),
        "accuracy_mean_last5_agglo_minus_flat": _minus(agglo, flat, "accuracy_mean_last5"),
    }
    if tree and flat:
        say(f"cloud ingress per round: tree {tree_in or 0:.0f} B, flat {flat_in or 0:.0f} B "
            f"({result['cloud_ingress_ratio_flat_vs_tree'] or 0:.1f}x); final accuracy tree "
            f"{tree['final_accuracy'] or 0:.3f}, flat {flat['final_accuracy'] or 0:.3f}")
    if agglo is not None:
        say(f"agglomerative cloud model: {agglo['final_accuracy'] or 0:.3f} "
            f"({(result['accuracy_agglo_minus_flat'] or 0) * 100:+.1f} points over flat)")
    print(json.dumps(result))


def _minus(a: dict[str, Any] | None, b: dict[str, Any] | None,
           key: str = "final_accuracy") -> float | None:
    if a is None or b is None or a[key] is None or b[key] is None:
        return None
    return float(a[key] - b[key])


if __name__ == "__main__":
    main()
