"""Training-ledger benchmark: what the ledger costs a round, and what verifying costs.

A real ``Aggregator`` (its own SQLite store, synchronous FULL) over an in-memory broker
runs sync rounds of N fake devices (``bench/aggregator.py``'s ``Swarm``), each answering
with a signed ``mlp`` update (random values, ``topk:0.1+q8+zstd:3``); the clock runs over the
``tick`` that closes each round: aggregate, checkpoint and, with the ledger, the entry,
its kept bodies, its signed tree head and N inclusion proofs. The baseline is the same
run in the same process with the ledger's entry switched off (the round closes as it did
before the ledger). Then ``verify_ledger`` re-derives every model of the ledger run.

``growth``: what the ledger's tree costs one release as the ledger grows (``--entries``
rows already in a real store): the frontier the store keeps (``Frontiers``: the new root
and the entry's inclusion path in O(log n) hashes) beside what every release did before
it, in the same run: read every leaf back and hash the whole tree, once for the root
and once more for the path it publishes.

    python bench/ledger.py [--devices 10] [--rounds 20] [--entries 1000,10000,50000]
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


def growth(sizes: list[int], tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        row = growth_row(n, tmp / f"growth-{n}.sqlite")
        say(f"  {n:7d} entries: a release's tree work {row['frontier_ms']} ms "
            f"(before: {row['rescan_ms']} ms)")
        rows.append(row)
    return rows


def growth_row(n: int, path: Path) -> dict[str, Any]:
    import sqlite3
    import statistics

    from broker_bridge import inclusion_path, leaf_hash, root_hash
    from cloud_aggregator._store import Store
    from cloud_aggregator._store_ledger import Frontiers

    Store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    leaves = [leaf_hash(b"entry %d" % i) for i in range(n)]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO ledger_entries (fleet, idx, round, header, accepted, details, leaf,"
        " tree_size, root, timestamp_ms, signature) VALUES"
        " (?, ?, ?, x'', x'', x'', ?, ?, x'', 0, x'')",
        [(FLEET, i, i, leaf, i + 1) for i, leaf in enumerate(leaves)])
    conn.execute("COMMIT")
    new_leaf = leaf_hash(b"the next entry")

    def rescan() -> None:  # before: at the append, then again at the publish
        for _ in range(2):
            stored = [bytes(r[0]) for r in conn.execute(
                "SELECT leaf FROM ledger_entries WHERE fleet = ? ORDER BY idx", (FLEET,))]
            stored.append(new_leaf)
            root_hash(stored)
            inclusion_path(len(stored) - 1, stored)

    frontiers = Frontiers()
    frontiers.tree(conn, FLEET, n, leaves[-1])  # built once, at the first append

    def frontier() -> None:
        tree = frontiers.tree(conn, FLEET, n, leaves[-1])
        tree.append(new_leaf)
        tree.root()

    def median_ms(fn: Any, reps: int) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        return round(statistics.median(times), 3)

    try:
        return {"entries": n, "frontier_ms": median_ms(frontier, 50),
                "rescan_ms": median_ms(rescan, 5)}
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--entries", default="1000,10000,50000",
                        help="ledger sizes for the growth measurement ('' skips)")
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
        sizes = [int(n) for n in args.entries.split(",") if n.strip()]
        if sizes:
            say("growth: one release's tree work with the ledger already this long")
            result["growth"] = growth(sizes, Path(tmp))
    base = result["no_ledger"]["round_close_ms_median"]
    result["round_close_ratio_vs_no_ledger"] = round(
        result["ledger"]["round_close_ms_median"] / base, 2) if base else None
    say(f"round close: {result['ledger']['round_close_ms_median']} ms with the ledger, "
        f"{base} ms without; verify {result['verify_seconds']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
