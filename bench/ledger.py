"""Training-ledger benchmark: what the ledger costs a round, and what verifying costs.

A real ``Aggregator`` (its own SQLite store, synchronous FULL) over an in-memory broker
runs sync rounds of N fake devices (``bench/aggregator.py``'s ``Swarm``), each answering
with a signed ``mlp`` update (random values, ``topk:0.1+q8+zstd:3``); the clock runs over the
``tick`` that closes each round: aggregate, checkpoint and, with the ledger, the entry,
its kept bodies, its signed tree head and N inclusion proofs. The baseline is the same
run in the same process with the ledger's entry switched off (the round closes as it did
before the ledger). Then ``verify_ledger`` re-derives every model of the ledger run.

    python bench/ledger.py [--devices 10] [--rounds 20]
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
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

import numpy as np  # noqa: E402
from aggregator import FLEET, Swarm, say  # noqa: E402

CODEC = "topk:0.1+q8+zstd:3"


def run(*, ledger: bool, devices: int, rounds: int, state: Path) -> dict[str, Any]:
    from broker_bridge import Channel, CodecSpec, MemoryBroker, MemoryTransport, encode_update
    from cloud_aggregator import Aggregator, AggregatorConfig
    from cloud_aggregator._rounds import ManualClock

    broker = MemoryBroker()
    swarm = Swarm.in_memory(broker, devices)
    cfg = AggregatorConfig(fleet=FLEET, model="mlp", rounds=rounds, devices_per_round=devices,
                           over_selection=1.0, deadline_s=3600.0, codec=CODEC, state_dir=state,
                           progress=False, seed=0, server_opt="fedadam")
    agg = Aggregator(config=cfg, clock=ManualClock(), channel=Channel(
        transport=MemoryTransport(broker=broker, client_id="aggregator"), fleet=FLEET),
        enrolment=swarm.enrolment)  # the swarm signs every update, as devices do
    if not ledger:
        agg.trail.pending = lambda **_: None  # type: ignore[method-assign,assignment,return-value]
    agg.start()
    for dev in swarm.channels:
        swarm.hello(dev)
    rng = np.random.default_rng(0)
    spec = CodecSpec.parse(CODEC)
    bodies = [encode_update((rng.standard_normal(agg.layout.size) * 0.01).astype(np.float32),
                            agg.layout, spec, rng=0).body for _ in range(devices)]
    close_s = []
    for _ in range(rounds):
        if not agg.tick():
            raise SystemExit("no round opened")
        swarm.collect()
        swarm.prepare(bodies, [80] * devices, CODEC)
        swarm.send_updates()
        t0 = time.perf_counter()
        if not agg.tick():
            raise SystemExit("the round did not close")
        close_s.append(time.perf_counter() - t0)
    swarm.collect()
    agg.close()
    if swarm.rejected:
        raise SystemExit(f"rejected: {swarm.rejected[:3]}")
    return {"round_close_ms_median": round(1000 * float(np.median(close_s)), 2),
            "round_close_ms_p90": round(1000 * float(np.percentile(close_s, 90)), 2),
            "model_version": agg.model_version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    from cloud_aggregator import verify_ledger
    from cloud_aggregator._store import Store

    result: dict[str, Any] = {"model": "mlp", "codec": CODEC, "devices": args.devices,
                              "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-ledger-") as tmp:
        say("baseline: rounds without the ledger's entry")
        result["no_ledger"] = run(ledger=False, devices=args.devices, rounds=args.rounds,
                                  state=Path(tmp) / "base")
        say("ours: rounds with the ledger")
        result["ledger"] = run(ledger=True, devices=args.devices, rounds=args.rounds,
                               state=Path(tmp) / "ours")
        t0 = time.perf_counter()
        (report,) = verify_ledger(Path(tmp) / "ours")
        result["verify_seconds"] = round(time.perf_counter() - t0, 3)
        result["verify_ok"] = report.ok
        result["models_rederived"] = report.models_rederived
        with Store(Path(tmp) / "ours" / "aggregator.sqlite") as store:
            entry = store.ledger_entries(FLEET)[-1]
            kept = sum(len(store.ledger_body(json.loads(line)["digest"]) or b"")
                       for line in entry.accepted)
        result["kept_body_bytes_per_round"] = kept
        result["entry_bytes"] = (len(entry.header) + sum(len(x) for x in entry.accepted)
                                 + len(entry.details))
    base = result["no_ledger"]["round_close_ms_median"]
    result["round_close_ratio_vs_no_ledger"] = round(
        result["ledger"]["round_close_ms_median"] / base, 2) if base else None
    say(f"round close: {result['ledger']['round_close_ms_median']} ms with the ledger, "
        f"{base} ms without; verify {result['verify_seconds']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
