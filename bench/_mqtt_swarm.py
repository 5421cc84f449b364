"""The fake devices of ``bench/aggregator.py --mqtt-counts``, in their own process.

They connect to a real Mosquitto (one shared network loop, as the simulator's agents),
say hello, and answer the aggregator's tasks with pre-encoded updates (``drive`` in
``aggregator.py``, the in-memory scenarios' own code). The aggregator runs in the parent
process, which measures its own CPU: this process prints ``ready`` before each timed
window and waits for ``go`` on stdin, prints ``done`` after the window's last
acknowledgement, and at the end prints ``drive``'s result as one JSON line.

    python bench/_mqtt_swarm.py --url mqtt://127.0.0.1:PORT --n 800 --mode sync \\
        --codec topk:0.01+q8+zstd --bodies FILE [--repo DIR]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from typing import Any

import aggregator as bench  # bench/ is this script's directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--codec", required=True)
    parser.add_argument("--bodies", required=True, help="pickled (bodies, samples)")
    parser.add_argument("--repo", default=None, help="(read by aggregator.py at import)")
    args = parser.parse_args()
    from broker_bridge import MqttTransport, NetworkLoop

    with open(args.bodies, "rb") as fh:
        bodies, samples = pickle.load(fh)
    loop = NetworkLoop(name="bench-swarm")
    swarm = bench.Swarm(args.n, lambda dev, will: MqttTransport(
        url=args.url, client_id=dev, will=will, loop=loop))
    for dev in swarm.channels:
        swarm.hello(dev)

    def start() -> None:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the aggregator's process went away")

    def end() -> None:
        print("done", flush=True)

    drove: dict[str, Any] = bench.drive(swarm, args.mode, args.codec, bodies, samples,
                                        args.n, start=start, end=end)
    for channel in swarm.channels.values():
        channel.transport.close()
    loop.close()
    print(json.dumps(drove), flush=True)


if __name__ == "__main__":
    main()
