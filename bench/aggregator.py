"""Aggregator ingestion benchmark on genuine ``mlp-xl`` updates.

Updates come from real local training: the 40-1024-1024-10 MLP (1.1M parameters, the
reference artifacts) is trained with ONNX Runtime for one epoch on each of a few
MNIST-1D device partitions (Dirichlet(0.5), seed 0), and update = trained - global.
Each is encoded as dense fp32 and as ``topk:0.01+q8+zstd``. Ingestion is what the
service does per update: unpack the update body, decode with the layout, validate
(finite, norm rules), accumulate into the streaming sum. Peak memory (tracemalloc,
numpy allocations included) is measured as the number of updates grows, beside a
naive "decode all, then average" baseline in the same run.

    python bench/aggregator.py [--counts 10,50,200] [--devices 6]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from broker_bridge import (
    CodecSpec,
    Layout,
    UpdateMeta,
    decode_update,
    encode_update,
    pack_update_body,
    unpack_update_body,
)
from cloud_aggregator._aggregation import StreamingAccumulator, UpdateRules, validate_update
from cloud_aggregator._artifacts import build_artifacts, initial_parameters, read_manifest
from cloud_aggregator._models import build_reference_model
from edge_runtime._datasets import load_mnist1d, partition_dirichlet
from edge_runtime._training import open_trainer

SPECS = ("fp32", "topk:0.01+q8+zstd")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def genuine_updates(devices: int) -> tuple[Layout, list[np.ndarray], list[int]]:
    data = load_mnist1d()
    parts = partition_dirichlet(data.y_train, 100, alpha=0.5, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        build_artifacts(build_reference_model("mlp-xl", 0), tmp)
        info = read_manifest(tmp)
        layout = Layout(tensors=tuple((n, tuple(s)) for n, s in info.parameters))
        init = initial_parameters(tmp)
        trainer = open_trainer(tmp)
        updates, samples = [], []
        for d in range(devices):
            idx = parts[d]
            trainer.set_parameters(init)
            trainer.train(data.x_train[idx], data.y_train[idx], epochs=1, lr=0.05, seed=d)
            updates.append(trainer.get_parameters() - init)
            samples.append(len(idx))
    return layout, updates, samples


def ingest_ours(bodies: list[bytes], layout: Layout, count: int) -> tuple[float, np.ndarray]:
    rules = UpdateRules(size=layout.size, max_norm=1e4)
    acc = StreamingAccumulator(size=layout.size)
    norms: list[float] = []
    start = time.perf_counter()
    for i in range(count):
        meta, body = unpack_update_body(bodies[i % len(bodies)])
        update = decode_update(body, layout)
        verdict = validate_update(update, rules=rules, accepted_norms=norms)
        if verdict.ok:
            acc.add(update, float(meta.num_samples))
            norms.append(verdict.norm)
        del update
    return time.perf_counter() - start, acc.result()


def ingest_naive(bodies: list[bytes], layout: Layout, count: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    kept, weights = [], []
    for i in range(count):
        meta, body = unpack_update_body(bodies[i % len(bodies)])
        kept.append(decode_update(body, layout))
        weights.append(float(meta.num_samples))
    result = np.average(np.stack(kept), axis=0, weights=np.asarray(weights)).astype(np.float32)
    return time.perf_counter() - start, result


def peak_mb(fn: Any, *args: Any) -> tuple[float, float, np.ndarray]:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    seconds, result = fn(*args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak / 2**20, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,50,200")
    parser.add_argument("--devices", type=int, default=6)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    say(f"training {args.devices} genuine mlp-xl updates with ONNX Runtime...")
    layout, updates, samples = genuine_updates(args.devices)
    model_mb = layout.size * 4 / 2**20
    say(f"  {layout.size} parameters ({model_mb:.1f} MB fp32); update norms "
        f"{[round(float(np.linalg.norm(u)), 3) for u in updates]}")
    out: dict[str, Any] = {
        "model": "mlp-xl", "parameters": layout.size, "model_mb": round(model_mb, 2),
        "updates_source": f"ONNX Runtime training, 1 epoch on {args.devices} MNIST-1D "
                          "Dirichlet(0.5) device partitions (bodies reused cyclically)",
        "codecs": {},
    }
    for text in SPECS:
        spec = CodecSpec.parse(text)
        bodies = []
        for u, n in zip(updates, samples, strict=True):
            meta = UpdateMeta(num_samples=n, steps=3, nonce="bench", train_loss=1.0,
                              duration_s=0.1)
            bodies.append(pack_update_body(meta, encode_update(u, layout, spec, rng=0).body))
        body_kb = float(np.mean([len(b) for b in bodies])) / 1024
        rows = []
        for count in counts:
            s_ours, mb_ours, r_ours = peak_mb(ingest_ours, bodies, layout, count)
            s_naive, mb_naive, r_naive = peak_mb(ingest_naive, bodies, layout, count)
            max_diff = float(np.abs(r_ours - r_naive).max())
            row = {
                "updates": count,
                "updates_per_s": round(count / s_ours, 1),
                "naive_updates_per_s": round(count / s_naive, 1),
                "peak_mb": round(mb_ours, 1),
                "naive_peak_mb": round(mb_naive, 1),
                "ratio_peak_vs_naive": round(mb_ours / mb_naive, 3),
                "max_abs_diff_vs_naive": max_diff,
            }
            say(f"{text:20s} n={count:4d}: {row['updates_per_s']:8.1f} upd/s "
                f"(naive {row['naive_updates_per_s']:.1f}), peak {row['peak_mb']:.1f} MB "
                f"(naive {row['naive_peak_mb']:.1f} MB)")
            rows.append(row)
        out["codecs"][text] = {"body_kb": round(body_kb, 1), "runs": rows}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
