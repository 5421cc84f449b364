"""``fleetlearn simulate``: owned by the composition root (it runs both sides)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    from fleetlearn import _trial_data

    _trial_data.register(sub)
    p = sub.add_parser(
        "simulate",
        help="simulate a fleet end to end: broker, aggregator and real device agents",
        description=(
            "Trains a real model across a simulated fleet of real device agents (ONNX "
            "Runtime training, one MQTT session each) on a broker this command starts, "
            "then prints the result and writes a JSON report and PNG plots."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("fleet")
    g.add_argument("--devices", type=int, default=100, help="virtual devices")
    g.add_argument("--per-round", type=int, default=10, help="devices per round (target)")
    g.add_argument("--profile-mix", default=None,
                   help="catalogue mix, e.g. 'pi4:0.5,phone-mid:0.5' (default: a mixed fleet)")
    g.add_argument("--partition", default="dirichlet:0.5",
                   help="data split: iid, dirichlet:ALPHA or shards:N")
    g.add_argument("--samples", type=int, default=10_000,
                   help="MNIST-1D samples to generate (80%% train over the devices, 20%% test)")
    g.add_argument("--no-availability", action="store_true",
                   help="ignore profiles' availability patterns (all devices always on)")
    g.add_argument("--start-hour", type=float, default=23.5,
                   help="emulated local time at start, for availability patterns")
    g = p.add_argument_group("training")
    g.add_argument("--model", default="cnn", help="mlp, cnn or mlp-xl")
    g.add_argument("--rounds", type=int, default=100, help="rounds (model versions) at most")
    g.add_argument("--target-accuracy", type=float, default=None,
                   help="stop once test accuracy reaches this fraction, e.g. 0.8")
    g.add_argument("--codec", default=None, help="uplink codec spec (default: compressed)")
    g.add_argument("--selection", default="random",
                   help="device selection: random, deadline, tiered or oort")
    g.add_argument("--max-selected", type=int, default=None,
                   help="deadline (FedCS): select up to this many devices predicted to "
                        "finish (default: the same count as other policies)")
    g.add_argument("--mode", choices=["sync", "async"], default="sync")
    g.add_argument("--deadline-s", type=float, default=120.0,
                   help="round deadline in emulated seconds")
    g.add_argument("--local-epochs", type=int, default=None)
    g.add_argument("--backend", choices=["portable", "ort-training"], default=None,
                   help="training artifacts the devices run: portable (default; any "
                        "onnxruntime) or ort-training (needs onnxruntime-training instead)")
    g.add_argument("--server-opt", default=None, help="fedavg, fedavgm, fedadam, fedyogi")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("failures")
    g.add_argument("--crash-fraction", type=float, default=0.0,
                   help="probability a device crashes on a task, before uploading")
    g.add_argument("--restart-after-rounds", type=int, default=2,
                   help="rounds until a crashed device reboots")
    g.add_argument("--slow-fraction", type=float, default=0.0,
                   help="share of devices slower than their profile")
    g.add_argument("--slow-factor", type=float, default=4.0)
    g.add_argument("--byzantine-fraction", type=float, default=0.0,
                   help="share of devices sending sign-flipped, scaled updates (attackers)")
    g.add_argument("--byzantine-scale", type=float, default=10.0)
    g.add_argument("--byzantine-kind", choices=("flip", "norm", "samples"), default="flip",
                   help="flip: -scale x the true update; norm: an update of L2 norm SCALE; "
                        "samples: the true update claiming 10^12 samples")
    g.add_argument("--robust", default=None,
                   help="aggregation: mean, median, trimmed_mean, krum or multi_krum")
    g.add_argument("--clip-norm", type=float, default=None,
                   help="clip each update to this L2 norm before aggregating")
    g = p.add_argument_group("time and infrastructure")
    g.add_argument("--clock", choices=["virtual", "real"], default="virtual",
                   help="virtual: account emulated durations; real: sleep them (scaled)")
    g.add_argument("--time-scale", type=float, default=0.01,
                   help="real clock: wall seconds per emulated second")
    g.add_argument("--broker", default=None,
                   help="external broker URL (default: start one for this run)")
    g.add_argument("--broker-kind", choices=["mosquitto", "embedded"], default="mosquitto",
                   help="local broker to start (mosquitto falls back to embedded if missing)")
    g.add_argument("--credentials", type=Path, default=None,
                   help="credentials.toml from `fleetlearn broker config` (external broker): "
                        "fleet 'sim', users 'aggregator' and the ids --print-device-ids lists")
    g.add_argument("--print-device-ids", action="store_true",
                   help="print the simulated devices' ids, one a line, and exit (to create "
                        "their broker users: fleetlearn broker config --fleet sim "
                        "--devices-file FILE)")
    g.add_argument("--workers", type=int, default=2, help="training threads")
    g.add_argument("--out", type=Path, default=Path("runs/latest"),
                   help="directory for report.json, plots and state")
    g.add_argument("--max-wall-s", type=float, default=3600.0)
    g.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    from device_profiles import DEFAULT_MIX
    from edge_runtime._fleet import FaultSpec, device_ids

    if args.print_device_ids:
        print("\n".join(device_ids(args.devices)))
        return 0
    from fleetlearn._simulate import DEFAULT_CODEC, SimConfig, run_simulation

    extra: dict[str, Any] = {}
    if args.local_epochs is not None:
        extra["local_epochs"] = args.local_epochs
    if args.server_opt is not None:
        extra["server_opt"] = args.server_opt
    if args.robust is not None:
        extra["robust"] = args.robust
    if args.clip_norm is not None:
        extra["clip_norm"] = args.clip_norm
    if args.max_selected is not None:
        extra["max_selected"] = args.max_selected
    if args.backend is not None:
        extra["backend"] = args.backend
    cfg = SimConfig(
        devices=args.devices, per_round=args.per_round, model=args.model, rounds=args.rounds,
        target_accuracy=args.target_accuracy, codec=args.codec or DEFAULT_CODEC,
        selection=args.selection, mode=args.mode, partition=args.partition,
        profile_mix=args.profile_mix or DEFAULT_MIX, deadline_s=args.deadline_s,
        clock=args.clock, time_scale=args.time_scale,
        faults=FaultSpec(crash_fraction=args.crash_fraction,
                         restart_after_rounds=args.restart_after_rounds,
                         slow_fraction=args.slow_fraction, slow_factor=args.slow_factor,
                         byzantine_fraction=args.byzantine_fraction,
                         byzantine_scale=args.byzantine_scale,
                         byzantine_kind=args.byzantine_kind),
        availability=not args.no_availability, start_hour=args.start_hour, seed=args.seed,
        broker=args.broker, broker_kind=args.broker_kind, credentials=args.credentials,
        out_dir=args.out, workers=args.workers, num_samples=args.samples,
        max_wall_s=args.max_wall_s, aggregator=extra,
    )
    result = run_simulation(cfg, quiet=args.quiet)
    if args.json:
        print(json.dumps(result.report, sort_keys=True))
    return 0 if result.report["final_accuracy"] is not None else 1
