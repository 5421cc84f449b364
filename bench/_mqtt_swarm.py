"""``bench/aggregator.py --mqtt-counts``: the ingest scenarios through a real Mosquitto.

``run_mqtt`` (in the benchmark's process) starts the broker and the aggregator, and runs
this file again as a child: the fake devices' process (``main``). The devices connect to
the broker over one shared network loop, as the simulator's agents do, say hello, and
answer the aggregator's tasks with pre-encoded updates (``drive`` in ``aggregator.py``,
the in-memory scenarios' own code). The parent measures its own CPU: the child prints
``ready`` before each timed window and waits for ``go`` on stdin, prints ``done`` after
the window's last acknowledgement, and at the end prints ``drive``'s result as one JSON
line.

    python bench/_mqtt_swarm.py --url mqtt://127.0.0.1:PORT --n 800 --mode sync \\
        --codec topk:0.01+q8+zstd --bodies FILE [--repo DIR]
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aggregator as bench  # bench/ is this script's directory


def run_mqtt(mode: str, codec: str, bodies: list[bytes], samples: list[int], n: int,
             buffer: int, state: Path) -> dict[str, Any]:
    """The same scenario through a real Mosquitto on a free port: the aggregator as
    ``fleetlearn aggregator`` runs it (its MQTT client's network thread runs the
    handlers), the devices in a child process (``_mqtt_swarm.py``). The broker and the
    devices share this machine's cores with the aggregator; CPU is this process's."""
    import pickle

    from broker_bridge import MosquittoProcess
    from cloud_aggregator import Aggregator

    enrolment, _ = bench.device_keys(n)
    parts = {} if enrolment is None else {"enrolment": enrolment}
    bodies_file = state / "bodies.pickle"
    state = state / "aggregator"
    with open(bodies_file, "wb") as fh:
        pickle.dump((bodies, samples), fh)
    broker = MosquittoProcess().start()
    config = bench.bench_config(mode, codec, n, buffer, state)
    agg = Aggregator.connect(config, broker=broker.url, **parts)
    fetch = ["--fetch-models"] if bench.fetches_models(config) else []
    child = None
    try:
        agg.start()
        runner = threading.Thread(target=agg.run, name="aggregator-run", daemon=True)
        runner.start()
        repo = ["--repo", sys.argv[sys.argv.index("--repo") + 1]] if "--repo" in sys.argv else []
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--url",
             broker.url, "--n", str(n), "--mode", mode, "--codec", codec, "--bodies",
             str(bodies_file), *repo, *fetch],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        window, drove = bench.Window(), None
        for line in child.stdout:
            if line.strip() == "ready":
                window.start()
                child.stdin.write("go\n")
                child.stdin.flush()
            elif line.strip() == "done":
                window.end()
            elif line.startswith("{"):
                drove = json.loads(line)
        if child.wait() != 0 or drove is None:
            raise SystemExit(f"the MQTT devices' process failed (exit {child.returncode})")
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        agg.stop()
        agg.close()
        broker.stop()
    row = bench.result_row(mode, codec, n, drove, window)
    row["broker"] = "mosquitto"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--codec", required=True)
    parser.add_argument("--bodies", required=True, help="pickled (bodies, samples)")
    parser.add_argument("--repo", default=None, help="(read by aggregator.py at import)")
    parser.add_argument("--fetch-models", action="store_true",
                        help="each device asks for its task's model (none is broadcast)")
    args = parser.parse_args()
    from broker_bridge import MqttTransport, NetworkLoop

    with open(args.bodies, "rb") as fh:
        bodies, samples = pickle.load(fh)
    loop = NetworkLoop(name="bench-swarm")
    swarm = bench.Swarm(args.n, lambda dev, will: MqttTransport(
        url=args.url, client_id=dev, will=will, loop=loop), fetch_models=args.fetch_models)
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
    swarm.close()
    for channel in swarm.channels.values():
        channel.transport.close()
    loop.close()
    print(json.dumps(drove), flush=True)


if __name__ == "__main__":
    main()
