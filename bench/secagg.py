"""Secure aggregation's cost per device and per round, beside plain rounds, same run.

For each round size n (default 10, 100, 1000 devices) it runs one whole secure round of
real ``SecAggDevice`` objects and a real ``SecAggRound`` in this process (every message
through its bytes and envelope, no broker: the secure rounds of real agents over
Mosquitto are tests/cloud_aggregator/test_secure_mqtt.py, too slow to time here), with the
``mlp`` reference model's layout (23,050 parameters) and the round's shared subset at
``--fraction`` (default 0.1). Per device it reports CPU ms (process time of the device's
own steps), bytes up and down (whole MQTT payloads: envelope headers included) and
messages; per round the aggregator's CPU ms and bytes. The baseline is a plain round of
the same devices: each device's update encoded with ``ef+topk:0.1+q8+zstd:3`` (the
compressed default) and with ``fp32``, plus the task, model download and ack every round
has either way. Updates are Gaussian (sd 0.01), not trained ones (bench/codec.py has
genuine ones). Prints a line per size, then one JSON object. Never fails on a figure.

    python bench/secagg.py [--sizes 10,100,1000] [--fraction 0.1]

The 1,000-device round takes about 4 CPU minutes (3 of them its 1,000 devices).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broker_bridge import (
    Ack,
    CodecSpec,
    ErrorFeedback,
    Layout,
    TaskSpec,
    UpdateMeta,
    encode_model,
    encode_update,
    split_message,
    update_message,
)
from broker_bridge._model_msg import ModelMeta, model_message, weights_hash
from broker_bridge._secagg import FixedPoint, shared_subset
from broker_bridge._secagg_device import SecAggDevice
from broker_bridge._secagg_msg import _Body, secagg_message
from cloud_aggregator._secagg import SecAggRound

FLEET = "bench"
MAX_PAYLOAD = 128 * 1024
COMPRESSED = "ef+topk:0.1+q8+zstd:3"
MLP = Layout(tensors=(("fc1.weight", (128, 40)), ("fc1.bias", (128,)),
                      ("fc2.weight", (128, 128)), ("fc2.bias", (128,)),
                      ("fc3.weight", (10, 128)), ("fc3.bias", (10,))))


def wire_bytes(message: Any) -> int:
    return sum(len(p) for p in split_message(message, max_payload=MAX_PAYLOAD))


def secagg_bytes(body: _Body, device: str) -> int:
    return wire_bytes(secagg_message(body, fleet=FLEET, device=device))


def common_traffic(device: str, weights: np.ndarray) -> tuple[int, int]:
    """(down, up) bytes every round has, secure or not: task, model download, task ack,
    update ack."""
    model_body = encode_model(weights, MLP, CodecSpec.parse("fp32"))
    meta = ModelMeta(run="r" * 16, model_version=1, model_hash=weights_hash(weights))
    task = TaskSpec(round=1, model_version=1, artifacts_hash="a" * 64,
                    model_hash=meta.model_hash, nonce="n" * 32, codec="fp32")
    down = (wire_bytes(task.to_message(fleet=FLEET, device=device, round=1, model_version=1))
            + wire_bytes(model_message(fleet=FLEET, meta=meta, codec="fp32",
                                       codec_body=model_body, device=device))
            + wire_bytes(Ack(round=1).to_message(fleet=FLEET, device=device, round=1)))
    up = wire_bytes(Ack(round=1, what="task").to_message(fleet=FLEET, device=device, round=1))
    return down, up


def plain_round(updates: dict[str, np.ndarray], spec: str) -> dict[str, float]:
    codec = CodecSpec.parse(spec)
    cpu, up = [], []
    meta = UpdateMeta(num_samples=80, steps=10, nonce="n" * 32, train_loss=0.5,
                      duration_s=1.0)
    for device, update in updates.items():
        start = time.process_time()
        feedback = ErrorFeedback.zeros(MLP) if codec.error_feedback else None
        body = encode_update(update, MLP, codec, feedback=feedback, rng=0).body
        cpu.append(time.process_time() - start)
        up.append(wire_bytes(update_message(fleet=FLEET, device=device, round=1,
                                            model_version=1, attempt=0, codec=spec,
                                            meta=meta, codec_body=body)))
    return {"device_cpu_ms": 1000 * float(np.mean(cpu)), "update_bytes": float(np.mean(up)),
            "messages_up": 1}


def secure_round(updates: dict[str, np.ndarray], fraction: float, seed: int
                 ) -> dict[str, Any]:
    rng = random.Random(seed)
    n = len(updates)
    fixed_clip, scale = 0.1, float(2 ** math.floor(math.log2((2**31 - 1) / (0.1 * n))))
    server_cpu = 0.0
    start = time.process_time()
    server = SecAggRound(fleet=FLEET, round_index=1, clip=fixed_clip, scale=scale,
                         fraction=fraction, size=MLP.size, max_devices=n,
                         randbytes=rng.randbytes, randbelow=rng.randrange)
    server_cpu += time.process_time() - start
    cpu = dict.fromkeys(updates, 0.0)
    wire_up = dict.fromkeys(updates, 0)
    wire_down = dict.fromkeys(updates, 0)
    devices: dict[str, SecAggDevice] = {}

    def device_step(d: str, fn: Any, *args: Any) -> Any:
        t0 = time.process_time()
        out = fn(*args)
        cpu[d] += time.process_time() - t0
        return out

    def server_step(fn: Any, *args: Any) -> Any:
        nonlocal server_cpu
        t0 = time.process_time()
        out = fn(*args)
        server_cpu += time.process_time() - t0
        return out

    for d in updates:
        wire_down[d] += secagg_bytes(server.setup, d)
        devices[d] = device_step(d, lambda: SecAggDevice(fleet=FLEET, setup=server.setup,
                                                         randbytes=rng.randbytes,
                                                         randbelow=rng.randrange))
        adv = device_step(d, devices[d].advertise)
        wire_up[d] += secagg_bytes(adv, d)
        server_step(server.on_advertise, d, adv)
    for d, keys in server_step(server.close_advertising).items():
        wire_down[d] += secagg_bytes(keys, d)
        shares = device_step(d, devices[d].on_keys, keys)
        wire_up[d] += secagg_bytes(shares, d)
        server_step(server.on_shares, d, shares)
    subset = shared_subset(server.setup.subset_seed, MLP.size, fraction)
    fixed = FixedPoint(clip=fixed_clip, scale=scale, max_devices=n)
    noise = np.random.default_rng(seed)
    sent: dict[str, np.ndarray] = {}
    for d, deliver in server_step(server.close_sharing).items():
        wire_down[d] += secagg_bytes(deliver, d)
        device_step(d, devices[d].on_deliver, deliver)
        values = (updates[d][subset] / fraction).astype(np.float32)
        levels = device_step(d, lambda v=values: fixed.encode(v, noise.random(len(subset))))
        sent[d] = levels
        masked = device_step(d, devices[d].masked, levels)
        wire_up[d] += secagg_bytes(masked, d)
        server_step(server.on_masked, d, masked)
    for d, request in server_step(server.close_upload).items():
        wire_down[d] += secagg_bytes(request, d)
        reveal = device_step(d, devices[d].on_unmask, request)
        wire_up[d] += secagg_bytes(reveal, d)
        server_step(server.on_reveal, d, reveal)
    total, counted = server_step(server.finish)
    expected = np.zeros(len(subset), np.uint32)  # the sum must be the plain sum
    for d in counted:
        expected += sent[d]
    costs = [dev.cost for dev in devices.values()]
    return {
        "degree": server.degree, "threshold": server.threshold, "words": len(subset),
        "device_cpu_ms_mean": 1000 * float(np.mean(list(cpu.values()))),
        "device_cpu_ms_max": 1000 * float(np.max(list(cpu.values()))),
        "device_bytes_up": float(np.mean(list(wire_up.values()))),
        "device_bytes_down": float(np.mean(list(wire_down.values()))),
        "device_messages": float(np.mean([c.messages_up + c.messages_down for c in costs])),
        "device_key_exchanges": float(np.mean([c.key_exchanges for c in costs])),
        "device_prg_words": float(np.mean([c.prg_words for c in costs])),
        "aggregator_cpu_ms": 1000 * server_cpu,
        "round_bytes": int(sum(wire_up.values()) + sum(wire_down.values())),
        "counted": len(counted), "sum_equals_plain_sum": bool(np.array_equal(total, expected)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--fraction", type=float, default=0.1)
    opts = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.1, MLP.size).astype(np.float32)
    results: dict[str, Any] = {}
    for n in (int(s) for s in opts.sizes.split(",")):
        updates = {f"dev-{i:04d}": rng.normal(0, 0.01, MLP.size).astype(np.float32)
                   for i in range(n)}
        plain_sample = dict(list(updates.items())[:min(n, 50)])
        compressed = plain_round(plain_sample, COMPRESSED)
        dense = plain_round(plain_sample, "fp32")
        down, up = common_traffic("dev-0000", weights)
        wall = time.perf_counter()
        secure = secure_round(updates, opts.fraction, seed=n)
        secure["wall_s"] = time.perf_counter() - wall
        plain_traffic = down + up + compressed["update_bytes"]
        secure_traffic = down + up + secure["device_bytes_up"] + secure["device_bytes_down"]
        results[str(n)] = {
            "secure": secure,
            "plain_compressed": compressed, "plain_dense_fp32": dense,
            "common_bytes_per_device": {"down": down, "up": up},
            "device_traffic_bytes": {"secure": secure_traffic, "plain_compressed": plain_traffic,
                                     "plain_dense_fp32": down + up + dense["update_bytes"]},
            "ratio_traffic_vs_plain_compressed": secure_traffic / plain_traffic,
            "ratio_upload_vs_plain_compressed":
                secure["device_bytes_up"] / compressed["update_bytes"],
            "ratio_cpu_vs_plain_compressed":
                secure["device_cpu_ms_mean"] / compressed["device_cpu_ms"],
        }
        print(f"n={n:5d} degree {secure['degree']:4d}: device {secure['device_cpu_ms_mean']:8.1f}"
              f" ms CPU (plain {compressed['device_cpu_ms']:.1f}), up "
              f"{secure['device_bytes_up'] / 1e3:7.1f} KB down "
              f"{secure['device_bytes_down'] / 1e3:7.1f} KB, {secure['device_messages']:.0f} "
              f"messages; traffic {results[str(n)]['ratio_traffic_vs_plain_compressed']:.2f}x "
              f"plain {COMPRESSED}; aggregator {secure['aggregator_cpu_ms']:.0f} ms CPU, "
              f"wall {secure['wall_s']:.1f} s", file=sys.stderr)
    sizes = sorted(int(k) for k in results)
    growth = {}
    for a, b in itertools.pairwise(sizes):
        ra, rb = results[str(a)]["secure"], results[str(b)]["secure"]
        growth[f"{a}_to_{b}"] = {
            "n_ratio": b / a, "log_n_ratio": math.log(b) / math.log(a),
            "device_bytes_ratio": (rb["device_bytes_up"] + rb["device_bytes_down"])
            / (ra["device_bytes_up"] + ra["device_bytes_down"]),
            "device_cpu_ratio": rb["device_cpu_ms_mean"] / ra["device_cpu_ms_mean"],
            "degree_ratio": rb["degree"] / ra["degree"],
        }
    print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                      "model": "mlp", "parameters": MLP.size, "fraction": opts.fraction,
                      "baseline_codec": COMPRESSED, "sizes": results, "growth": growth}))


if __name__ == "__main__":
    main()
