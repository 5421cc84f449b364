"""Benchmark the device agent: peak memory, cold start, training throughput; torch beside it.

Run from the repo root: ``python bench/agent.py``. For each reference model (``mlp``,
``cnn``) a fresh child process runs a real ``edge_runtime.Agent`` (in-memory
transport, artifacts and model already cached) through one task over the MNIST-1D
training set (8,000 samples, batch 32, SGD lr 0.05, one ONNX Runtime thread), and
reports its peak RSS (``VmHWM``; torch and onnx are made unimportable in that child,
as on a device that installs neither), the time from process start to the first training
step, and training samples/s. A second child trains the same model with PyTorch
(CPU, one thread) for comparison; torch is a benchmark-only dependency
(``pip install torch==2.13.0``), and without it the torch figures are null.

Prints human lines, then one JSON object (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn")
EPOCHS = {"mlp": 5, "cnn": 3}
BATCH = 32
LR = 0.05
DEVICE_ABSENT = ("torch", "onnx")


def _vm_hwm_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- child: the agent ---------------------------------------------------------------------


def child_agent(args: argparse.Namespace) -> dict[str, Any]:
    # Run as on a device, which installs neither torch nor onnx (this machine has both
    # for the benchmark and the cloud side): make them unimportable in this process.
    # Without this, ``import onnxruntime`` probes ORTModule and drags torch in.
    for name in DEVICE_ABSENT:
        sys.modules[name] = None  # type: ignore[assignment]
    import numpy as np

    from broker_bridge import (
        Channel,
        Kind,
        Layout,
        MemoryBroker,
        MemoryTransport,
        Message,
        TaskSpec,
        unpack_update_body,
    )
    from edge_runtime import (
        Agent,
        ArtifactCache,
        DeviceStatus,
        LocalData,
        ModelCache,
        OrtTrainer,
        load_mnist1d,
    )

    data = load_mnist1d(cache_dir=args.cache)
    cache = ArtifactCache(root=args.artifacts)
    (artifacts_hash,) = cache.hashes()
    folder = cache.path(artifacts_hash)
    assert folder is not None
    # Cold start: process start to the end of the first training step.
    trainer = OrtTrainer(artifacts_dir=folder, intra_op_threads=1)
    trainer.train(data.x_train[:BATCH], data.y_train[:BATCH], batch_size=BATCH, lr=LR)
    cold_start_s = time.time() - args.start
    layout = Layout(tensors=trainer.parameter_shapes())
    models = ModelCache()
    model_hash = models.put(np.load(args.weights), layout, version=0)
    del trainer

    broker = MemoryBroker()
    fleet = "bench"
    agg = Channel(transport=MemoryTransport(broker=broker, client_id="agg"), fleet=fleet)
    agg.transport.connect()
    updates: list[Message] = []
    agg.subscribe(agg.topics.all_up, lambda _t, m: updates.append(m)
                  if m.kind == Kind.UPDATE else None)
    agent = Agent(
        device_id="bench-dev",
        channel=Channel(transport=MemoryTransport(broker=broker, client_id="bench-dev"),
                        fleet=fleet),
        data=LocalData(x=data.x_train, y=data.y_train),
        state_dir=Path(args.state), artifacts=cache, models=models,
        status_probe=lambda: DeviceStatus(),
    )
    agent.start(timer=False)
    task = TaskSpec(round=1, model_version=0, artifacts_hash=artifacts_hash,
                    model_hash=model_hash, nonce="bench-task-1", codec="fp32",
                    epochs=EPOCHS[args.model], batch_size=BATCH, lr=LR, seed=0)
    agg.send(agg.topics.down("bench-dev", "task"),
             task.to_message(fleet=fleet, device="bench-dev", round=1))
    deadline = time.monotonic() + 600
    while not updates and time.monotonic() < deadline:
        time.sleep(0.01)
    agent.stop()
    meta, _ = unpack_update_body(updates[0].body)
    return {
        "peak_rss_mb": round(_vm_hwm_mb(), 1),
        "cold_start_s": round(cold_start_s, 3),
        "samples_per_s": round(meta.num_samples / meta.duration_s, 1),
        "train_seconds": round(meta.duration_s, 3),
        "samples": meta.num_samples,
        "torch_and_onnx_blocked": True,
    }


# -- child: torch -------------------------------------------------------------------------


def child_torch(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(1)
    with np.load(Path(args.cache) / "mnist1d-n10000-seed42.npz") as f:
        x = torch.from_numpy(np.ascontiguousarray(f["x_train"], dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(f["y_train"], dtype=np.int64))
    model: nn.Module
    if args.model == "mlp":
        model = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                              nn.Linear(128, 10))
    else:
        model = nn.Sequential(
            nn.Unflatten(1, (1, 40)),
            nn.Conv1d(1, 25, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(25, 25, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(25, 25, 5, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(100, 10),
        )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()

    def step(bx: torch.Tensor, by: torch.Tensor) -> None:
        opt.zero_grad()
        loss_fn(model(bx), by).backward()
        opt.step()

    step(x[:BATCH], y[:BATCH])
    cold_start_s = time.time() - args.start
    gen = torch.Generator().manual_seed(0)
    samples = 0
    t0 = time.perf_counter()
    for _ in range(EPOCHS[args.model]):
        order = torch.randperm(len(x), generator=gen)
        for first in range(0, len(x), BATCH):
            idx = order[first:first + BATCH]
            step(x[idx], y[idx])
            samples += len(idx)
    seconds = time.perf_counter() - t0
    return {
        "peak_rss_mb": round(_vm_hwm_mb(), 1),
        "cold_start_s": round(cold_start_s, 3),
        "samples_per_s": round(samples / seconds, 1),
        "train_seconds": round(seconds, 3),
        "samples": samples,
        "version": torch.__version__,
    }


# -- parent ---------------------------------------------------------------------------------


def _run_child(kind: str, model: str, extra: list[str]) -> dict[str, Any] | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--child", kind, "--model", model,
           "--start", repr(time.time()), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"  {kind} child for {model} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _torch_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


def main() -> int:
    import numpy as np

    from cloud_aggregator._artifacts import build_artifacts, initial_parameters
    from cloud_aggregator._models import build_reference_model
    from edge_runtime._datasets import default_cache_dir, load_mnist1d

    cache_dir = default_cache_dir()
    print(f"MNIST-1D from {cache_dir} (generated once if missing)", flush=True)
    load_mnist1d(cache_dir=cache_dir)
    has_torch = _torch_available()
    if not has_torch:
        print("NOTE: torch is not installed; torch figures will be null "
              "(pip install torch==2.13.0 for the comparison)", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-agent-") as tmp:
        root = Path(tmp)
        for model in MODELS:
            built = root / f"build-{model}"
            info = build_artifacts(build_reference_model(model, 0), built)
            cache = root / f"cache-{model}" / info.content_hash
            cache.mkdir(parents=True)
            for name in (*info.files, "artifacts.json"):
                shutil.copy(built / name, cache / name)
            weights = root / f"{model}-w0.npy"
            np.save(weights, initial_parameters(built))
            print(f"{model}: {info.num_parameters} parameters; agent child running "
                  f"{EPOCHS[model]} epochs x 8000 samples", flush=True)
            agent = _run_child("agent", model, [
                "--artifacts", str(root / f"cache-{model}"), "--weights", str(weights),
                "--cache", str(cache_dir), "--state", str(root / f"state-{model}"),
            ])
            if agent is not None:
                print(f"  agent: peak RSS {agent['peak_rss_mb']} MB, cold start "
                      f"{agent['cold_start_s']} s, {agent['samples_per_s']} samples/s", flush=True)
            torch_res = None
            if has_torch:
                torch_res = _run_child("torch", model, ["--cache", str(cache_dir)])
                if torch_res is not None:
                    print(f"  torch: peak RSS {torch_res['peak_rss_mb']} MB, cold start "
                          f"{torch_res['cold_start_s']} s, {torch_res['samples_per_s']} "
                          "samples/s", flush=True)
            entry: dict[str, Any] = {"parameters": info.num_parameters, "agent": agent,
                                     "torch": torch_res}
            if agent and torch_res:
                entry["samples_per_s_ratio_vs_torch"] = round(
                    agent["samples_per_s"] / torch_res["samples_per_s"], 3)
                entry["peak_rss_ratio_vs_torch"] = round(
                    agent["peak_rss_mb"] / torch_res["peak_rss_mb"], 3)
            results[model] = entry
    summary = {
        "batch_size": BATCH,
        "ort_threads": 1,
        "rss_target_mb": 100,
        "models": results,
        "agent_under_rss_target": all(
            (r["agent"] or {}).get("peak_rss_mb", 1e9) < 100 for r in results.values()),
        "torch_available": has_torch,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", choices=["agent", "torch"])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--artifacts")
    parser.add_argument("--weights")
    parser.add_argument("--cache")
    parser.add_argument("--state")
    ns = parser.parse_args()
    if ns.child == "agent":
        print(json.dumps(child_agent(ns)))
    elif ns.child == "torch":
        print(json.dumps(child_torch(ns)))
    else:
        raise SystemExit(main())
