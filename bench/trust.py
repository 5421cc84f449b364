"""Benchmark signed updates: what signing and verifying cost per update, against the
unsigned path and against local training, measured in the same run.

Run from the repo root: ``python bench/trust.py``. For the reference models ``mlp`` and
``mlp-xl`` and two uplink codecs (dense ``fp32`` and ``topk:0.1+q8+zstd:3``), on one core:

- device side: the unsigned path (encode the update, pack its body: what an agent did
  before signing) against signing it (``DeviceKey.sign_update``: SHA-256 of the body and
  one Ed25519 signature);
- aggregator side: the unsigned path (the ``unpack`` and ``decode`` ingest stages)
  against the ``verify`` stage (block parsed, key looked up, SHA-256, one Ed25519
  verification), run as the aggregator runs it;
- one local training step of the model (batch 32, the portable ONNX Runtime trainer, one
  thread), and the cost of signing plus verifying in training steps; signing against a
  reference task (``TASK_STEPS`` steps), which is what a device pays per update.

Everything runs in one process on the same machine, so the ratios hold under whatever
load the machine has (the JSON records the load average at start).

Each figure is the median of ``--repeats`` timed loops. Prints human lines, then one JSON
object (the last line). Benchmarks never fail on a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLEET = "bench"
DEVICE = "dev-1"
CODECS = ("fp32", "topk:0.1+q8+zstd:3")
MODELS = ("mlp", "mlp-xl")
BATCH = 32
TASK_STEPS = 15
"""Steps of a reference task: 5 local epochs (the aggregator's default) over 80 samples
(MNIST-1D's 8,000 training samples over 100 devices) in batches of 32."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def per_call_us(fn: Callable[[], object], *, loops: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``loops`` calls, in microseconds."""
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t0) / loops)
    return statistics.median(times) * 1e6


def train_step_ms(folder: Path, *, steps: int, repeats: int) -> float:
    from edge_runtime._training import open_trainer

    trainer = open_trainer(folder, intra_op_threads=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH * steps, 40)).astype(np.float32)
    y = rng.integers(0, 10, BATCH * steps).astype(np.int64)
    trainer.train(x[:BATCH], y[:BATCH], epochs=1, batch_size=BATCH, lr=0.05, seed=0)  # warm
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        result = trainer.train(x, y, epochs=1, batch_size=BATCH, lr=0.05, seed=r)
        times.append((time.perf_counter() - t0) / max(1, result.steps))
    return statistics.median(times) * 1e3


def measure(model: str, codec: str, folder: Path, store_dir: Path, *, repeats: int
            ) -> dict[str, Any]:
    from broker_bridge import (
        CodecSpec,
        Enrolment,
        Layout,
        UpdateMeta,
        decode_update_sparse,
        encode_update,
        pack_update_body,
        unpack_update_body,
        update_message,
    )
    from cloud_aggregator._artifacts import read_manifest
    from cloud_aggregator._identity import KeyBook, VerifySignature
    from cloud_aggregator._ingest import UpdateItem
    from cloud_aggregator._store import Store
    from edge_runtime import DeviceKey

    info = read_manifest(folder)
    layout = Layout(tensors=tuple((n, tuple(s)) for n, s in info.parameters))
    spec = CodecSpec.parse(codec)
    delta = (np.random.default_rng(1).standard_normal(layout.size) * 0.01).astype(np.float32)
    meta = UpdateMeta(num_samples=80, steps=3, nonce="n" * 32, train_loss=1.0, duration_s=0.1)
    key = DeviceKey.generate()
    loops = 20 if layout.size > 100_000 else 200

    def unsigned_body() -> bytes:
        return pack_update_body(meta, encode_update(delta, layout, spec, rng=0).body)

    body = unsigned_body()
    message = update_message(fleet=FLEET, device=DEVICE, round=1, model_version=0, attempt=0,
                             codec=str(spec), meta=meta,
                             codec_body=encode_update(delta, layout, spec, rng=0).body)
    assert message.body == body
    signed = key.sign_update(message)
    encode_us = per_call_us(unsigned_body, loops=loops, repeats=repeats)
    sign_us = per_call_us(lambda: key.sign_update(message), loops=loops, repeats=repeats)

    def unpack_decode() -> object:
        _, codec_body = unpack_update_body(signed.body)
        return decode_update_sparse(codec_body, layout)

    enrolment = Enrolment(fleet=FLEET)
    enrolment.enrol(DEVICE, key.public_key)
    store = Store(store_dir / f"{model}-{CODECS.index(codec)}.sqlite", synchronous="NORMAL")
    stage = VerifySignature(keys=KeyBook(store=store, fleet=FLEET, enrolment=enrolment))

    def verify() -> object:
        item = UpdateItem(device=DEVICE, message=signed, task_round=1)
        rejection = stage.process(item)
        assert rejection is None, rejection
        return item

    decode_us = per_call_us(unpack_decode, loops=loops, repeats=repeats)
    verify_us = per_call_us(verify, loops=loops, repeats=repeats)
    store.close()
    return {
        "codec": str(spec), "parameters": layout.size, "body_bytes": len(body),
        "signed_body_bytes": len(signed.body),
        "device": {"unsigned_encode_us": round(encode_us, 2), "sign_us": round(sign_us, 2),
                   "ratio_sign_vs_unsigned": round(sign_us / encode_us, 4)},
        "aggregator": {"unsigned_unpack_decode_us": round(decode_us, 2),
                       "verify_us": round(verify_us, 2),
                       "ratio_verify_vs_unsigned": round(verify_us / decode_us, 4)},
        "sign_plus_verify_us": round(sign_us + verify_us, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cloud_aggregator._artifacts import build_artifacts
    from cloud_aggregator._models import build_reference_model

    out: dict[str, Any] = {"repeats": args.repeats, "batch_size": BATCH, "models": {},
                           "reference_task_steps": TASK_STEPS,
                           "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            folder = Path(tmp) / model
            build_artifacts(build_reference_model(model, 0), folder)
            step_ms = train_step_ms(folder, steps=args.train_steps if model == "mlp" else 10,
                                    repeats=args.repeats)
            say(f"{model}: one training step (batch {BATCH}) {step_ms:.3f} ms")
            rows = []
            for codec in CODECS:
                row = measure(model, codec, folder, Path(tmp), repeats=args.repeats)
                row["sign_plus_verify_vs_train_step"] = round(
                    row["sign_plus_verify_us"] / 1e3 / step_ms, 4)
                row["sign_vs_reference_task"] = round(
                    row["device"]["sign_us"] / 1e3 / (TASK_STEPS * step_ms), 4)
                say(f"  {codec:22s} body {row['body_bytes']:>9,} B: sign "
                    f"{row['device']['sign_us']:8.1f} us (unsigned encode "
                    f"{row['device']['unsigned_encode_us']:9.1f} us), verify "
                    f"{row['aggregator']['verify_us']:8.1f} us (unsigned unpack+decode "
                    f"{row['aggregator']['unsigned_unpack_decode_us']:9.1f} us); sign+verify "
                    f"= {row['sign_plus_verify_vs_train_step']:.3f} training steps; signing = "
                    f"{100 * row['sign_vs_reference_task']:.2f}% of a {TASK_STEPS}-step task")
                rows.append(row)
            out["models"][model] = {"train_step_ms": round(step_ms, 4), "codecs": rows}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
