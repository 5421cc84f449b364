"""``fleetlearn simulate --topology cloud:1,edge:E,device:N``: a tree instead of a flat fleet.

Runs a ``LocalTree`` (``_tree``: one Mosquitto for the cloud and one per edge site,
the cloud aggregator, ``EdgeAggregator``s, real device agents that know every edge as
a candidate parent), from the simulation's settings: its model, codec, rounds (cloud
rounds), seed, Dirichlet split, clock and aggregator overrides (local epochs, learning
rate, batch size and the cloud's server optimizer; edges aggregate with plain FedAvg).
``edge_crash_fraction`` of the sites fail when the cloud's middle round opens: the edge
crashes and its broker is killed, its devices move to the next edge.

Devices get catalogue classes as a flat simulation's do (``profile_mix``, same mix and
seed), edges ``edge_profile``, and ``link_bandwidth`` sets each link's bandwidth in its
senders' profiles (``_tier_emulation``); on the virtual clock every tier's deadlines are
judged in those emulated seconds.

The report (``report.json`` in ``out_dir``) is per tier: the cloud's rounds (accuracy,
updates, ingress bytes), each edge's rounds and children, the devices that moved, and
``tiers``: each tier's emulated seconds and each link's bytes and transfer time.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any

import numpy as np

from device_profiles import profile_mix
from fleetlearn._report import write_report
from fleetlearn._sim_config import SimConfig
from fleetlearn._tier_emulation import edge_profile, on_link, parse_links, tier_lines, tier_report
from fleetlearn._tree import LocalTree, TreeSpec


def tree_spec(cfg: SimConfig) -> TreeSpec:
    """The tree a simulation's settings describe."""
    edges, devices = cfg.tiers()
    agg = cfg.aggregator_config()
    crashed = crashes(cfg, edges)
    return TreeSpec(
        edges=edges, devices_per_edge=devices // edges, cloud_rounds=cfg.rounds,
        rounds_per_task=cfg.edge_rounds_per_task, model=cfg.model,
        local_epochs=agg.local_epochs, batch_size=agg.batch_size, lr=agg.lr,
        cloud_quorum=max(1, edges - crashed - (1 if edges - crashed > 2 else 0)),
        cloud_deadline_s=cfg.deadline_s,
        edge_deadline_s=cfg.deadline_s / (cfg.edge_rounds_per_task + 1),
        codec=cfg.codec, server_opt=agg.server_opt, seed=cfg.seed, partition_seed=cfg.seed,
        alpha=float(cfg.partition.split(":", 1)[1]), num_samples=cfg.num_samples,
        failover_after_s=1.0, tier_models=cfg.tier_models, faults=cfg.faults,
        clock="virtual" if cfg.clock == "virtual" else "real",
        safety_timeout_s=max(60.0, cfg.deadline_s * 4), **tier_profiles(cfg, devices))


def tier_profiles(cfg: SimConfig, devices: int) -> dict[str, Any]:
    """The devices' profiles (the flat simulator's: ``profile_mix`` of the fleet's size
    and seed) and the edges', each behind its link's bandwidth."""
    links = parse_links(cfg.link_bandwidth)
    return {"device_profiles": tuple(
                on_link(p, links.get("device-edge"))
                for p in profile_mix(cfg.profile_mix, devices, seed=cfg.seed)),
            "edge_profile": on_link(edge_profile(cfg.edge_profile), links.get("edge-cloud"))}


def crashes(cfg: SimConfig, edges: int) -> int:
    """Edge sites that fail: the fraction of the edges, rounded, one always left."""
    return min(edges - 1, math.floor(cfg.edge_crash_fraction * edges + 0.5))


def run_tree_simulation(cfg: SimConfig, *, out: Any = None, quiet: bool = False) -> Any:
    from fleetlearn._simulate import SimResult

    stream = out or sys.stdout

    def say(text: str) -> None:
        if not quiet:
            print(text, file=stream, flush=True)

    started = time.monotonic()
    spec = tree_spec(cfg)
    n_crash = crashes(cfg, spec.edges)
    rng = np.random.default_rng([cfg.seed, 7])
    doomed = sorted(int(i) for i in rng.choice(spec.edges, size=n_crash, replace=False))
    crash_round = max(1, cfg.rounds // 2 + 1)
    out_dir = cfg.out_dir
    work = out_dir / "tree"
    if work.exists():
        shutil.rmtree(work)
    say(f"fleetlearn simulate: a tree of 1 cloud, {spec.edges} edges and "
        f"{spec.edges * spec.devices_per_edge} devices ({spec.devices_per_edge} per edge), "
        f"model {spec.model}, codec {spec.codec}, {spec.rounds_per_task} edge round(s) per "
        f"cloud task, seed {cfg.seed}")
    if cfg.availability:
        say("availability: every device stays online (a tree does not follow the "
            "profiles' availability patterns yet)")
    if doomed:
        say(f"faults: edge site(s) {', '.join(f'edge-{i}' for i in doomed)} fail when cloud "
            f"round {crash_round} opens")
    tree = LocalTree(spec, workdir=work)
    if tree.byzantine:
        say(f"faults: {len(tree.byzantine)} Byzantine device(s) "
            f"({cfg.faults.byzantine_kind}, scale {cfg.faults.byzantine_scale:g}): "
            f"{', '.join(tree.byzantine)}")
    crashed_at: dict[int, int] = {}
    try:
        tree.start()
        if not tree.wait_ready(timeout_s=120):
            say("the cloud did not see every edge within 120 s")
        cloud = tree.cloud
        assert cloud is not None
        printed = 0
        thread = tree.run_in_background(timeout_s=cfg.max_wall_s)
        while thread.is_alive():
            thread.join(timeout=0.05)
            if doomed and not crashed_at and (cloud.round_index or 0) >= crash_round:
                for i in doomed:
                    tree.kill_edge(i)
                    crashed_at[i] = crash_round
                say(f"  cloud round {crash_round}: edge site(s) "
                    f"{', '.join(f'edge-{i}' for i in doomed)} failed")
            history = cloud.history
            for m in history[printed:]:
                acc = "-" if m.accuracy is None else f"{m.accuracy:.3f}"
                say(f"  cloud round {m.round:3d} {m.outcome:9s} acc {acc:>5s}  edges "
                    f"{m.devices_reported}/{m.devices_selected}  in {m.bytes_up / 1e3:.1f} kB")
            printed = len(history)
            if cfg.target_accuracy is not None and history and (
                    history[-1].accuracy or 0) >= cfg.target_accuracy:
                cloud.stop()
        report = _report(cfg, spec, tree, crashed_at, time.monotonic() - started)
    finally:
        tree.close()
    path = write_report(out_dir, report)
    for line in tier_lines(report["tiers"]):
        say(line)
    say(f"final accuracy {report['final_accuracy']}; cloud ingress "
        f"{report['cloud']['ingress_bytes_per_round']:.0f} B per round; report {path}")
    return SimResult(report=report, report_path=path, plots=[], rounds=report["rounds"])


def _report(cfg: SimConfig, spec: TreeSpec, tree: LocalTree, crashed_at: dict[int, int],
            wall_s: float) -> dict[str, Any]:
    cloud = tree.cloud
    assert cloud is not None
    rounds = [m.to_json() for m in cloud.history]
    closed = [m for m in cloud.history if m.outcome == "closed"]
    edges = []
    for i in range(spec.edges):
        edge = tree.edges[i]
        entry: dict[str, Any] = {"id": f"edge-{i}", "crashed_at_round": crashed_at.get(i)}
        if edge is not None:
            history = [m for m in edge.aggregator.history if m.outcome == "closed"]
            children = {k.device_id for m in history
                        for k in edge.aggregator.store.accepted_keys(edge.aggregator.fleet,
                                                                     m.round)}
            counted = edge.aggregator.counters.snapshot()["updates"]
            entry.update(rounds_closed=len(history), children_trained=len(children),
                         device_tasks=sum(m.devices_reported for m in history),
                         ingress_bytes=sum(m.bytes_up for m in history),
                         updates_refused={k.split(":", 1)[1]: v for k, v in counted.items()
                                          if k.startswith("rejected:")},
                         updates_cut=counted.get("clipped:norm", 0))
        edges.append(entry)
    moved = [d.device_id for d in tree.devices if len(d.moves) > 1]
    final = closed[-1].accuracy if closed else None
    assert spec.device_profiles is not None and spec.edge_profile is not None
    tiers = tier_report(
        devices=spec.device_profiles, device_log=tree.device_log, edge=spec.edge_profile,
        edges=spec.edges, edge_log=tree.edge_log, links=parse_links(cfg.link_bandwidth),
        cloud={"rounds_closed": len(closed), "accuracy": final, "clock": spec.clock,
               "emulated_s": round(sum(m.emulated_s for m in closed), 6),
               "emulated_round_s": [round(m.emulated_s, 6) for m in closed]},
        wire_bytes_up={"device-edge": sum(e.get("ingress_bytes", 0) for e in edges),
                       "edge-cloud": sum(m.bytes_up for m in cloud.history)})
    return {
        "topology": cfg.topology,
        "model": spec.model,
        "codec": spec.codec,
        "seed": cfg.seed,
        "edge_rounds_per_task": spec.rounds_per_task,
        "final_accuracy": final,
        **_agglo_report(tree),
        "rounds": rounds,
        "cloud": {
            "rounds_closed": len(closed),
            "updates_per_round": (sum(m.devices_reported for m in closed) / len(closed)
                                  if closed else None),
            "ingress_bytes_per_round": (sum(m.bytes_up for m in closed) / len(closed)
                                        if closed else 0.0),
        },
        "edges": edges,
        "tiers": tiers,
        "devices": {"count": len(tree.devices), "moved": moved,
                    "byzantine": tree.byzantine},
        "wall_s": round(wall_s, 1),
    }


def _agglo_report(tree: LocalTree) -> dict[str, Any]:
    """An agglomerative tree's models and its cloud model's accuracy (``final_accuracy``
    is then the edge-sized model the cloud sends its edges)."""
    strategy = tree.cloud_strategy
    if strategy is None:
        return {}
    return {"tier_models": tree.tier_models.text(),
            "cloud_model_accuracy": (strategy.tier_accuracy[-1][1]
                                     if strategy.tier_accuracy else None),
            "cloud_model_accuracy_by_round": [a for _, a in strategy.tier_accuracy]}
