"""Wire benchmark: fleetlearn's chunked transport vs raw paho, through Mosquitto on loopback.

Prints human lines, then one JSON object on stdout:
- chunked transfer of a 20 MB body in 128 KB chunks (MB/s), ours beside raw paho
  publishing the same 128 KB payloads with no envelope, checksums or reassembly;
- 1 KB QoS 1 messages per second, ours (envelope + channel) beside raw paho.

Run from the repo root: ``python bench/wire.py``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from broker_bridge import Channel, Kind, Message, MosquittoProcess, MqttTransport

BODY_MB = 20
CHUNK = 128 * 1024
SMALL = 1024
N_SMALL = int(os.environ.get("BENCH_WIRE_MESSAGES", "5000"))
FLEET = "bench"


def _ours_bulk(url: str, body: bytes) -> float:
    done = threading.Event()
    got: list[bytes] = []
    rx = Channel(transport=MqttTransport(url=url, client_id="b-rx"), fleet=FLEET)
    tx = Channel(transport=MqttTransport(url=url, client_id="b-tx"), fleet=FLEET)
    with rx.transport, tx.transport:
        rx.subscribe(rx.topics.all_up, lambda _t, m: (got.append(m.body), done.set()))
        time.sleep(0.2)
        t0 = time.perf_counter()
        tx.send(tx.topics.up("d1", "update"),
                Message(kind=Kind.UPDATE, fleet=FLEET, device="d1", body=body))
        if not done.wait(120):
            raise RuntimeError("bulk transfer did not complete")
        elapsed = time.perf_counter() - t0
    assert got[0] == body
    return elapsed


def _paho_client(url_port: int, cid: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv311)
    c.max_inflight_messages_set(50)
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    return c


def _raw_paho(port: int, payloads: list[bytes]) -> float:
    n = len(payloads)
    count = [0]
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    rx = _paho_client(port, "raw-rx")
    rx.on_message = on_message
    rx.on_subscribe = lambda *a: subscribed.set()
    rx.subscribe("raw/#", qos=1)
    subscribed.wait(5)
    tx = _paho_client(port, "raw-tx")
    time.sleep(0.2)
    t0 = time.perf_counter()
    for p in payloads:
        tx.publish("raw/x", p, qos=1)
    if not done.wait(120):
        raise RuntimeError(f"raw paho got {count[0]} of {n}")
    elapsed = time.perf_counter() - t0
    for c in (rx, tx):
        c.loop_stop()
        c.disconnect()
    return elapsed


def _ours_small(url: str, n: int) -> float:
    count = [0]
    done = threading.Event()

    def on_msg(_t: str, _m: Message) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    rx = Channel(transport=MqttTransport(url=url, client_id="s-rx"), fleet=FLEET)
    tx = Channel(transport=MqttTransport(url=url, client_id="s-tx"), fleet=FLEET)
    with rx.transport, tx.transport:
        rx.subscribe(rx.topics.all_up, on_msg)
        time.sleep(0.2)
        body = b"x" * SMALL
        topic = tx.topics.up("d1", "update")
        t0 = time.perf_counter()
        for i in range(n):
            tx.send(topic, Message(kind=Kind.UPDATE, fleet=FLEET, device="d1", round=i,
                                   body=body))
        if not done.wait(120):
            raise RuntimeError(f"got {count[0]} of {n}")
        return time.perf_counter() - t0


def main() -> None:
    body = os.urandom(BODY_MB * 1024 * 1024)
    with MosquittoProcess() as broker:
        print(f"mosquitto on {broker.url}", file=sys.stderr)
        ours_bulk = _ours_bulk(broker.url, body)
        print(f"fleetlearn 20 MB chunked: {ours_bulk:.2f}s", file=sys.stderr)
        raw_chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
        raw_bulk = _raw_paho(broker.port, raw_chunks)
        print(f"raw paho 20 MB in 128 KB publishes: {raw_bulk:.2f}s", file=sys.stderr)
        ours_small = _ours_small(broker.url, N_SMALL)
        print(f"fleetlearn {N_SMALL} x 1 KB QoS 1: {ours_small:.2f}s", file=sys.stderr)
        raw_small = _raw_paho(broker.port, [b"x" * SMALL] * N_SMALL)
        print(f"raw paho {N_SMALL} x 1 KB QoS 1: {raw_small:.2f}s", file=sys.stderr)
    mb = len(body) / 1e6
    result = {
        "bulk_body_mb": round(mb, 2),
        "bulk_chunk_bytes": CHUNK,
        "bulk_fleetlearn_mb_per_s": round(mb / ours_bulk, 1),
        "bulk_raw_paho_mb_per_s": round(mb / raw_bulk, 1),
        "bulk_ratio_vs_raw_paho": round(raw_bulk / ours_bulk, 3),
        "small_messages": N_SMALL,
        "small_message_bytes": SMALL,
        "small_fleetlearn_msgs_per_s": round(N_SMALL / ours_small),
        "small_raw_paho_msgs_per_s": round(N_SMALL / raw_small),
        "small_ratio_vs_raw_paho": round(raw_small / ours_small, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
