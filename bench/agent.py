"""Benchmark the device agent: peak memory, cold start, training throughput, per backend.

Run from the repo root: ``python bench/agent.py``. For each reference model (``mlp``,
``cnn``, ``mlp-xl``) and each backend, a fresh child process runs a real
``edge_runtime.Agent`` (in-memory transport, artifacts and model already cached)
through one task over the MNIST-1D training set (8,000 samples, batch 32, SGD lr
0.05, one ONNX Runtime thread) and reports its peak RSS (``VmHWM``; torch and onnx
are made unimportable in that child, as on a device that installs neither), the time
from process start to the end of the first training step, and training samples/s.

Backends, side by side in one run:

- ``portable``: the compiled standard-op graphs on plain onnxruntime (this venv);
- ``ort_training``: onnxruntime-training 1.19.2's own artifacts, in the
  ``.venv-ort-training`` environment that ``scripts/test.sh`` builds (``--ort-training-python``);
- ``torch``: the same model and SGD in PyTorch (CPU, one thread), with the interpreter
  given by ``--torch-python`` (default: this one; ``pip install torch==2.13.0``).

A backend whose environment is missing reports null. ``--aarch64-venv DIR`` adds the
portable agent under qemu's aarch64 emulation (an aarch64 venv with fleetlearn
installed, as ``tests/edge_runtime/test_arm64.py`` leaves it): marked ``emulated``, only its RSS
(which includes the emulator's own) and the fact that it trained mean anything.

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
MODELS = ("mlp", "cnn", "mlp-xl")
EPOCHS = {"mlp": 5, "cnn": 3, "mlp-xl": 1}
BATCH = 32
LR = 0.05
DEVICE_ABSENT = ("torch", "onnx")
RSS_TARGET_MB = 60
COLD_START_TARGET_S = 0.5


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
        ErrorReport,
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
        load_mnist1d,
        open_trainer,
    )

    data = load_mnist1d(cache_dir=args.cache)
    samples = args.samples or len(data.y_train)
    epochs = args.epochs or EPOCHS[args.model]
    cache = ArtifactCache(root=args.artifacts)
    (artifacts_hash,) = cache.hashes()
    folder = cache.path(artifacts_hash)
    assert folder is not None
    # Cold start: process start to the end of the first training step.
    trainer = open_trainer(folder, intra_op_threads=1)
    trainer.train(data.x_train[:BATCH], data.y_train[:BATCH], batch_size=BATCH, lr=LR)
    cold_start_s = time.time() - args.start
    layout = Layout(tensors=trainer.parameter_shapes())
    models = ModelCache()
    model_hash = models.put(np.load(args.weights), layout, version=0)
    backend = trainer.backend
    del trainer

    broker = MemoryBroker()
    fleet = "bench"
    agg = Channel(transport=MemoryTransport(broker=broker, client_id="agg"), fleet=fleet)
    agg.transport.connect()
    updates: list[Message] = []
    errors: list[ErrorReport] = []

    def on_up(_topic: str, m: Message) -> None:
        if m.kind == Kind.UPDATE:
            updates.append(m)
        elif m.kind == Kind.ERROR:
            errors.append(ErrorReport.from_message(m))

    agg.subscribe(agg.topics.all_up, on_up)
    agent = Agent(
        device_id="bench-dev",
        channel=Channel(transport=MemoryTransport(broker=broker, client_id="bench-dev"),
                        fleet=fleet),
        data=LocalData(x=data.x_train[:samples], y=data.y_train[:samples]),
        state_dir=Path(args.state), artifacts=cache, models=models,
        status_probe=lambda: DeviceStatus(),
    )
    agent.start(timer=False)
    task = TaskSpec(round=1, model_version=0, artifacts_hash=artifacts_hash,
                    model_hash=model_hash, nonce="bench-task-1", codec="fp32",
                    epochs=epochs, batch_size=BATCH, lr=LR, seed=0)
    agg.send(agg.topics.down("bench-dev", "task"),
             task.to_message(fleet=fleet, device="bench-dev", round=1))
    wait_s = 600
    print(f"{args.model}: waiting for the agent's update ({samples} samples x {epochs} "
          f"epoch(s); at most {wait_s} s)", file=sys.stderr, flush=True)
    deadline = time.monotonic() + wait_s
    while not updates and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    agent.stop()
    if not updates:
        why = "; ".join(f"{e.code}: {e.message}" for e in errors) or f"nothing in {wait_s} s"
        raise SystemExit(f"the agent sent no update for {args.model}: {why}")
    meta, _ = unpack_update_body(updates[0].body)
    return {
        "peak_rss_mb": round(_vm_hwm_mb(), 1),
        "cold_start_s": round(cold_start_s, 3),
        "samples_per_s": round(meta.num_samples / meta.duration_s, 1),
        "train_seconds": round(meta.duration_s, 3),
        "samples": meta.num_samples,
        "torch_and_onnx_blocked": True,
        "backend": backend,
        "onnxruntime": __import__("onnxruntime").__version__,
        "machine": __import__("platform").machine(),
        "python": __import__("platform").python_version(),
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
    if args.model in ("mlp", "mlp-xl"):
        hidden = 128 if args.model == "mlp" else 1024
        model = nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                              nn.ReLU(), nn.Linear(hidden, 10))
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


def _run_child(kind: str, model: str, extra: list[str], *, python: list[str] | None = None,
               timeout: float = 900) -> dict[str, Any] | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [*(python or [sys.executable]), str(Path(__file__).resolve()), "--child", kind,
           "--model", model, "--start", repr(time.time()), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        print(f"  {kind} child for {model} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _works(python: str, code: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", code], capture_output=True, timeout=120, cwd=REPO)
    except OSError:
        return False
    return probe.returncode == 0


def _stage(built: Path, root: Path, tag: str) -> Path:
    """Copy built artifacts into a cache folder named by their content hash."""
    manifest = json.loads((built / "artifacts.json").read_text())
    cache = root / f"cache-{tag}" / manifest["content_hash"]
    cache.mkdir(parents=True)
    for name in (*manifest["files"], "artifacts.json"):
        shutil.copy(built / name, cache / name)
    return cache.parent


def _line(label: str, res: dict[str, Any] | None) -> None:
    if res is None:
        print(f"  {label}: not measured", flush=True)
        return
    print(f"  {label}: peak RSS {res['peak_rss_mb']} MB, cold start {res['cold_start_s']} s, "
          f"{res['samples_per_s']} samples/s", flush=True)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from cloud_aggregator._artifacts import build_artifacts, initial_parameters
    from cloud_aggregator._models import build_reference_model
    from edge_runtime._datasets import default_cache_dir, load_mnist1d

    cache_dir = default_cache_dir()
    print(f"MNIST-1D from {cache_dir} (generated once if missing)", flush=True)
    load_mnist1d(cache_dir=cache_dir)
    ort_python = args.ort_training_python or str(REPO / ".venv-ort-training" / "bin" / "python")
    has_ort = _works(ort_python, "from edge_runtime._ort import load_training_api; "
                                 "load_training_api()")
    torch_python = args.torch_python or sys.executable
    has_torch = _works(torch_python, "import torch")
    if not has_ort:
        print(f"NOTE: no onnxruntime-training at {ort_python}; its figures will be null "
              "(scripts/test.sh builds .venv-ort-training on x86_64, Python <= 3.12)", flush=True)
    if not has_torch:
        print("NOTE: torch is not installed; torch figures will be null "
              "(pip install torch==2.13.0, or --torch-python)", flush=True)
    arm = _arm_runner(args.aarch64_venv) if args.aarch64_venv else None
    results: dict[str, Any] = {}
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-agent-") as tmp:
        root = Path(tmp)
        for model in models:
            built = root / f"build-{model}"
            info = build_artifacts(build_reference_model(model, 0), built)
            weights = root / f"{model}-w0.npy"
            np.save(weights, initial_parameters(built))
            print(f"{model}: {info.num_parameters} parameters; {EPOCHS[model]} epoch(s) x 8000 "
                  "samples per backend", flush=True)
            common = ["--weights", str(weights), "--cache", str(cache_dir)]
            staged = _stage(built, root, f"p-{model}")
            ort_staged = None
            if has_ort:
                ort_built = root / f"build-ort-{model}"
                subprocess.run([ort_python, "-m", "fleetlearn", "artifacts", "reference", model,
                                "--backend", "ort-training", "--out", str(ort_built)],
                               cwd=REPO, check=True, capture_output=True, timeout=600)
                ort_staged = _stage(ort_built, root, f"o-{model}")
            # The backends take turns, ``--repeat`` times, and each keeps its fastest run:
            # a shared machine's load then hits them alike.
            runs: dict[str, list[dict[str, Any]]] = {"portable": [], "ort": [], "torch": []}
            for turn in range(args.repeat):
                res = _run_child("agent", model, [
                    "--artifacts", str(staged), "--state", str(root / f"state-p{turn}-{model}"),
                    *common])
                runs["portable"] += [res] if res else []
                if ort_staged is not None:
                    res = _run_child("agent", model, [
                        "--artifacts", str(ort_staged),
                        "--state", str(root / f"state-o{turn}-{model}"), *common],
                        python=[ort_python])
                    runs["ort"] += [res] if res else []
                if has_torch:
                    res = _run_child("torch", model, ["--cache", str(cache_dir)],
                                     python=[torch_python])
                    runs["torch"] += [res] if res else []
            portable, ort_res, torch_res = (
                max(runs[k], key=lambda r: r["samples_per_s"]) if runs[k] else None
                for k in ("portable", "ort", "torch"))
            _line("portable (onnxruntime)", portable)
            if has_ort:
                _line("onnxruntime-training", ort_res)
            if has_torch:
                _line("torch", torch_res)
            emulated = None
            if arm is not None and model in args.aarch64_models.split(","):
                emulated = _run_child("agent", model, [
                    "--artifacts", str(_stage(built, root, f"a-{model}")),
                    "--state", str(root / f"state-a-{model}"), "--epochs", "1",
                    "--samples", str(args.aarch64_samples), *common], python=arm, timeout=3600)
                if emulated is not None:
                    emulated["emulated"] = True
                _line("portable on emulated aarch64 (RSS and correctness only)", emulated)
            results[model] = {
                "parameters": info.num_parameters,
                "portable": portable,
                "ort_training": ort_res,
                "torch": torch_res,
                "aarch64_emulated": emulated,
                "samples_per_s_ratio_vs_ort_training": _ratio(portable, ort_res, "samples_per_s"),
                "samples_per_s_ratio_vs_torch": _ratio(portable, torch_res, "samples_per_s"),
                "peak_rss_ratio_vs_ort_training": _ratio(portable, ort_res, "peak_rss_mb"),
                "peak_rss_ratio_vs_torch": _ratio(portable, torch_res, "peak_rss_mb"),
            }
    measured = [r["portable"] for r in results.values() if r["portable"]]
    summary = {
        "batch_size": BATCH,
        "ort_threads": 1,
        "rss_target_mb": RSS_TARGET_MB,
        "cold_start_target_s": COLD_START_TARGET_S,
        "models": results,
        "portable_under_rss_target": all(r["peak_rss_mb"] < RSS_TARGET_MB for r in measured),
        "portable_under_cold_start_target": all(
            r["cold_start_s"] < COLD_START_TARGET_S for r in measured),
        "portable_at_least_ort_training_speed": all(
            (results[m]["samples_per_s_ratio_vs_ort_training"] or 0) >= 1.0
            for m in ("mlp", "cnn") if m in results) if has_ort else None,
        "ort_training_available": has_ort,
        "torch_available": has_torch,
    }
    print(json.dumps(summary))
    return 0


def _arm_runner(venv: str) -> list[str]:
    """The command prefix that runs Python in an aarch64 venv under emulation."""
    tool = os.environ.get("FLEETLEARN_ARM64_TOOL") or next(
        (str(p) for p in (REPO.parent / "shared" / "tools" / "arm64-python.sh",
                          Path("/work/shared/tools/arm64-python.sh")) if p.exists()), None)
    if tool is None:
        raise SystemExit("--aarch64-venv needs arm64-python.sh (set FLEETLEARN_ARM64_TOOL)")
    return ["bash", tool, "run", venv, "--", "python"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", choices=["agent", "torch"])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--artifacts")
    parser.add_argument("--weights")
    parser.add_argument("--cache")
    parser.add_argument("--state")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per backend, taking turns; the fastest is kept")
    parser.add_argument("--ort-training-python", default=None)
    parser.add_argument("--torch-python", default=None)
    parser.add_argument("--aarch64-venv", default=None)
    parser.add_argument("--aarch64-models", default="mlp")
    parser.add_argument("--aarch64-samples", type=int, default=512)
    ns = parser.parse_args()
    if ns.child == "agent":
        print(json.dumps(child_agent(ns)))
    elif ns.child == "torch":
        print(json.dumps(child_torch(ns)))
    else:
        raise SystemExit(main(ns))
