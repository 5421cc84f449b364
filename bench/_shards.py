"""``bench/aggregator.py --processes P``: P aggregator processes side by side.

What this machine ingests when the work is split over P processes (each a whole
aggregator with its own store, its own in-memory broker and N/P fake devices, the
in-memory scenario's own code), their timed windows started together: every process
trains its warm-up round, then waits at one barrier, then sends. The combined rate is the
N updates over the time from the first window's start to the last one's end; the CPU
figure adds up every process's CPU over its own window.

It is the ceiling of a sharded aggregator on this machine, not a feature: one model
needs the shards' partial sums merged at each release, which nothing here does. It says
what splitting the interpreter-bound ingest over the cores could gain, measured beside
the one-process rows of the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any


def _one(conn: Connection, barrier: Barrier, mode: str, codec: str, n: int, buffer: int,
         devices: int, cache: str, slow_disk_ms: float) -> None:
    """One process's share (in a spawned child): its row, sent back through ``conn``."""
    import aggregator as bench  # bench/ is on the path the parent gave its children

    if slow_disk_ms:
        bench.slow_disk(slow_disk_ms)
    bodies, samples, _ = bench.workload(codec, devices, Path(cache))
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-shard-") as tmp:
        row = bench.run_service(mode, codec, bodies, samples, n, buffer, Path(tmp),
                                before_timed=lambda: barrier.wait(timeout=600))
    conn.send(row)
    conn.close()


def run_processes(mode: str, codec: str, n: int, buffer: int, processes: int, *,
                  devices: int, cache: str, slow_disk_ms: float = 0.0) -> dict[str, Any]:
    """``n`` updates over ``processes`` aggregator processes side by side (module doc)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    shares = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    pipes = [ctx.Pipe(duplex=False) for _ in shares]
    children = [ctx.Process(target=_one, args=(send, barrier, mode, codec, share, buffer,
                                               devices, cache, slow_disk_ms), daemon=True)
                for (_, send), share in zip(pipes, shares, strict=True)]
    for child in children:
        child.start()
    rows = []
    for (recv, _), child in zip(pipes, children, strict=True):
        deadline = time.monotonic() + 900
        while not recv.poll(1.0):  # a child that died says so at once
            if not child.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"a side-by-side aggregator process ({mode}) sent no result "
                                 f"(exit code {child.exitcode}; it has 900 s)")
        rows.append(recv.recv())
        child.join(timeout=60)
    start = min(r["wall_window"][0] for r in rows)
    end = max(r["wall_window"][1] for r in rows)
    overlap = min(r["wall_window"][1] for r in rows) - max(r["wall_window"][0] for r in rows)
    cpu = sum(r["cpu_ms_per_update"] * r["updates"] for r in rows)
    return {"mode": mode, "codec": codec, "updates": n, "processes": processes,
            "acked": sum(r["acked"] for r in rows), "rejected": sum(r["rejected"] for r in rows),
            "seconds": round(end - start, 3), "updates_per_s": round(n / (end - start), 1),
            "cpu_ms_per_update": round(cpu / n, 3),
            "per_process_updates_per_s": [r["updates_per_s"] for r in rows],
            "windows_overlap": round(max(0.0, overlap) / (end - start), 2),
            "broker": f"memory x{processes} processes"}
