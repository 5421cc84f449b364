"""Model downloads in async (FedBuff) mode: what the broker sends, broadcast vs on request.

A FedBuff simulation of real agents (the reference task, ``mlp``, MNIST-1D) over a real
Mosquitto started for the run, once with ``model_push = broadcast`` (every release
published on ``broadcast/model``: what async mode did before ``model_push``, the
baseline) and once with ``on_request`` (each device fetches the version its task
names: the async default). The figure is the broker's own count of the bytes it sent
(``$SYS/broker/bytes/sent``, read once the run is over), over the updates the
aggregator accepted; beside it the model versions released and the final accuracy.

    python bench/downlink.py [--devices 50] [--per-round 5] [--rounds 20]

Prints one line per run, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_bridge import MosquittoProcess
from broker_bridge._brokers import _child_user, render_mosquitto_conf
from fleetlearn._simulate import SimConfig, run_simulation

SYS_BYTES_SENT = "$SYS/broker/bytes/sent"


def broker_bytes_sent(url: str, *, timeout_s: float = 10.0) -> int:
    """The broker's count of bytes sent since it started (its next ``$SYS`` update)."""
    import paho.mqtt.client as mqtt

    got: list[int] = []
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got.append(int(msg.payload))
        done.set()

    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-downlink-sys")
    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(SYS_BYTES_SENT)
    client.connect(host, int(port))
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise SystemExit(f"the broker published no {SYS_BYTES_SENT} within {timeout_s} s")
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def run(push: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-downlink-") as tmp:
        port_probe = MosquittoProcess(workdir=Path(tmp) / "broker")
        conf = render_mosquitto_conf(
            port=port_probe.port, bind_address="127.0.0.1", password_file=None,
            acl_file=None, persistence_dir=None,
            run_as_user=_child_user()) + "\nsys_interval 1\n"
        broker = MosquittoProcess(conf_text=conf, port=port_probe.port,
                                  workdir=Path(tmp) / "broker").start()
        try:
            started = time.monotonic()
            result = run_simulation(SimConfig(
                devices=args.devices, per_round=args.per_round, rounds=args.rounds,
                model="mlp", mode="async", seed=0, broker=broker.url,
                out_dir=Path(tmp) / "sim", aggregator={"model_push": push}), quiet=True)
            wall = time.monotonic() - started
            time.sleep(1.5)  # the next $SYS update counts the run's last messages
            sent = broker_bytes_sent(broker.url)
        finally:
            broker.stop()
    rounds = result.rounds
    accepted = sum(r["reported"] for r in rounds)
    return {"model_push": push, "devices": args.devices, "releases": len(rounds),
            "accepted_updates": accepted, "broker_bytes_sent": sent,
            "broker_kb_sent_per_accepted_update": round(sent / max(accepted, 1) / 1e3, 1),
            "final_accuracy": rounds[-1].get("accuracy") if rounds else None,
            "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=5,
                        help="buffer size K; 2 x this many devices train at once")
    parser.add_argument("--rounds", type=int, default=20, help="model versions released")
    args = parser.parse_args()
    rows = []
    for push in ("broadcast", "on_request"):
        row = run(push, args)
        print(f"{push:10s}: broker sent {row['broker_bytes_sent'] / 1e6:7.2f} MB, "
              f"{row['broker_kb_sent_per_accepted_update']:7.1f} kB per accepted update "
              f"({row['accepted_updates']} updates, {row['releases']} releases), "
              f"accuracy {row['final_accuracy']}, {row['wall_s']} s", file=sys.stderr)
        rows.append(row)
    base, ours = rows
    print(json.dumps({"runs": rows, "broker_bytes_ratio": round(
        base["broker_bytes_sent"] / max(ours["broker_bytes_sent"], 1), 2)}))


if __name__ == "__main__":
    main()
