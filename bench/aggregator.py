"""Aggregator ingest benchmark: genuine ``mlp-xl`` updates through the whole service path.

Updates come from real local training: the 40-1024-1024-10 MLP (1.1M parameters) is
trained with ONNX Runtime for one epoch on each of a few MNIST-1D device partitions
(Dirichlet(0.5), seed 0), and update = trained - global; each is encoded as
``topk:0.01+q8+zstd`` (compressed) and as dense ``fp32``.

*Service* scenarios drive a real ``Aggregator`` (its own SQLite store, synchronous FULL,
so every acknowledged update is durable) over an in-memory broker: N fake devices say
hello, the aggregator selects them, and each answers its task with one update (the task's
nonce and model hash echoed, bodies reused cyclically, encoded into wire payloads before
the clock starts: that is the devices' work, not the aggregator's). Throughput is N over
the time from the first payload published to the last acknowledgement received; the
run loop runs in its own thread, as in production. ``cpu_ms_per_update`` is the
process's CPU time over the same window per update (every thread: the aggregator's
handlers run in the publishing thread here), which a busy machine inflates far less than
the wall-clock rate. ``sync``: one round of N devices (``round_turnaround_s``: from its
last acknowledgement until every device holds the next round's task, i.e. the round's
close, checkpoint, ledger entry and proofs and the next round's opening; the
``sustained_updates_per_s`` counts it);
``async``: FedBuff with N devices in flight and a buffer of ``--buffer`` updates, as
configured by default: each released version published once on ``broadcast/model`` (a
model of more than 1 MiB as sent, as ``mlp-xl``; the fake devices do not subscribe to
it, and the broker's fan-out to every device is not measured here: ``bench/downlink.py``
measures it); ``async+on_request`` (``--async-on-request``, on by default): nothing
broadcast, each device fetches the version its task names as the task arrives (the
default for a model of at most 1 MiB), so serving it (4.4 MB here) is part of the
aggregator's work. Peak memory is the
process's ``VmHWM`` growth while ingesting, for two counts (flat means it does not grow
with N).

*Over Mosquitto* (``--mqtt-counts``, compressed only): the same scenarios through a real
``mosquitto`` started on a free port, the aggregator connected as ``fleetlearn
aggregator`` connects (its MQTT client's network thread runs the handlers), the devices
in a child process (``_mqtt_swarm.py``, one shared network loop). The broker and the
devices share the machine's two cores with the aggregator; the CPU figure is the
aggregator's process only. ``broker`` in each row says which.

*Side by side* (``--processes P``, default 2; 1 skips): the largest in-memory compressed
count split over P aggregator processes, each the in-memory scenario with its share of
the devices, their timed windows started together (``_shards.py``). The aggregator's
process is bound by the interpreter's lock, so this is what a sharded aggregator could
reach on this machine: a ceiling measured beside the one-process rows, not a feature
(nothing merges the shards' sums into one model). Its rows say ``memory xP processes``.

``--slow-disk-ms MS`` makes every checkpoint file's write take MS longer (a sleep, which
holds no interpreter lock, as an fsync on a network-attached volume does), in this
checkout and the baseline alike: what a slow disk costs ingest.

``compressed_at_least_1000_per_s`` reads the in-memory rows (the aggregator's own
cost); the rows over Mosquitto say what a deployment on one such machine gets.

``--repo DIR`` runs the same scenarios against another checkout (e.g. the commit before
the ingest pipeline): run it twice, or let ``--baseline-rev REV`` make a temporary
worktree of REV and run it there in a child process, and print both side by side (the
baseline's in-memory scenarios only: an older aggregator may not run over MQTT here).

    python bench/aggregator.py [--counts 200,800] [--mqtt-counts 800] [--modes sync]
                               [--processes 2] [--baseline-rev REV]

Over 400 lines on purpose: the in-memory and Mosquitto scenarios share the swarm, the
drive loop, the timed window and the row format here (the Mosquitto processes live in
``_mqtt_swarm.py``); splitting them would split one measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
if "--repo" in sys.argv:  # import another checkout's packages (a baseline run)
    sys.path.insert(0, sys.argv[sys.argv.index("--repo") + 1])
else:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SPECS = ("topk:0.01+q8+zstd", "fp32")
FLEET = "bench"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def vm_hwm_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def genuine_updates(devices: int, cache: Path) -> tuple[list[np.ndarray], list[int]]:
    """Trained-minus-initial vectors of ``devices`` partitions (cached as .npz)."""
    path = cache / f"mlp-xl-updates-{devices}.npz"
    if path.exists():
        with np.load(path) as npz:
            return [npz[f"u{i}"] for i in range(devices)], [int(n) for n in npz["samples"]]
    from cloud_aggregator._artifacts import build_artifacts, initial_parameters
    from cloud_aggregator._models import build_reference_model
    from edge_runtime._datasets import load_mnist1d, partition_dirichlet
    from edge_runtime._training import open_trainer

    data = load_mnist1d()
    parts = partition_dirichlet(data.y_train, 100, alpha=0.5, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        build_artifacts(build_reference_model("mlp-xl", 0), tmp)
        init = initial_parameters(tmp)
        trainer = open_trainer(tmp)
        updates, samples = [], []
        for d in range(devices):
            idx = parts[d]
            trainer.set_parameters(init)
            trainer.train(data.x_train[idx], data.y_train[idx], epochs=1, lr=0.05, seed=d)
            updates.append(trainer.get_parameters() - init)
            samples.append(len(idx))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, samples=np.asarray(samples), **{f"u{i}": u for i, u in enumerate(updates)})
    return updates, samples


def device_ids(n: int) -> list[str]:
    return [f"d{i:05d}" for i in range(n)]


def device_keys(n: int) -> tuple[Any, dict[str, Any]]:
    """The enrolment and the signing keys of ``n`` fake devices, the same in every process
    (each key from a seed derived from its device id). A checkout from before signed
    updates (a baseline) has neither: its devices send unsigned updates."""
    import hashlib

    try:
        from broker_bridge import Enrolment
        from edge_runtime import DeviceKey
    except ImportError:
        return None, {}
    enrolment = Enrolment(fleet=FLEET)
    keys = {}
    for dev in device_ids(n):
        seed = hashlib.sha256(f"fleetlearn-bench/{dev}".encode()).digest()
        keys[dev] = DeviceKey.from_seed(seed)
        enrolment.enrol(dev, keys[dev].public_key)
    return enrolment, keys


class Swarm:
    """N fake devices answering tasks by hand, over any transport.

    Their handlers only keep the payloads that arrive, by topic (over the in-memory
    broker they run inside the aggregator's publish calls): tasks and acks are decoded
    after the timed window (``collect``) and proofs and models not at all, so a device's
    work on what it receives is not charged to the aggregator. Tasks and acks fit in one
    chunk. ``fetch_models``: when the aggregator does not broadcast models, each device
    asks for the version its task names as it arrives, as an agent does (from a thread of
    the swarm's own, as a device's network thread would), so serving it is counted.
    """

    def __init__(self, n: int, connect: Any, *, fetch_models: bool = False) -> None:
        """``connect(device, will)`` returns that device's transport, not yet connected."""
        from broker_bridge import Channel, Kind, TaskSpec, presence_will

        self.kind, self.task_spec = Kind, TaskSpec
        self.tasks: dict[str, Any] = {}
        self.answered: set[int] = set()
        self.acks = 0
        self.rejected: list[str] = []
        self._raw_tasks: dict[str, Any] = {}
        self._raw_acks: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()
        self._fetches: queue.SimpleQueue[tuple[str, int] | None] | None = None
        if fetch_models:
            self._fetches = queue.SimpleQueue()
            threading.Thread(target=self._fetch_loop, name="bench-swarm-fetch",
                             daemon=True).start()
        self.channels = {}
        self.enrolment, self.keys = device_keys(n)
        for dev in device_ids(n):
            transport = connect(dev, presence_will(fleet=FLEET, device=dev))
            channel = Channel(transport=transport, fleet=FLEET)
            transport.connect()
            transport.subscribe(channel.topics.device_down(dev), self._handler(dev), qos=1)
            self.channels[dev] = channel

    @classmethod
    def in_memory(cls, broker: Any, n: int, *, fetch_models: bool = False) -> Swarm:
        """The devices on an in-memory broker."""
        from broker_bridge import MemoryTransport

        return cls(n, lambda dev, will: MemoryTransport(broker=broker, client_id=dev,
                                                        will=will), fetch_models=fetch_models)

    def _fetch_loop(self) -> None:
        from broker_bridge import Request

        assert self._fetches is not None
        while (job := self._fetches.get()) is not None:
            dev, version = job
            channel = self.channels[dev]
            channel.send(channel.topics.up(dev, "request"), Request(
                want="model", model_version=version).to_message(fleet=FLEET, device=dev))

    def close(self) -> None:
        if self._fetches is not None:
            self._fetches.put(None)

    def _handler(self, dev: str) -> Any:
        from broker_bridge import Chunk

        def on(topic: str, payload: bytes) -> None:
            leaf = topic.rsplit("/", 1)[-1]
            if leaf == "task":
                with self._lock:
                    self._raw_tasks[dev] = (topic, payload)
                if self._fetches is not None:  # the version it names is in the header
                    self._fetches.put((dev, Chunk.from_bytes(payload).model_version))
            elif leaf == "ack":  # the aggregator acks updates only
                with self._lock:
                    self.acks += 1
                    self._raw_acks.append((dev, topic, payload))
            elif leaf == "control":  # a roll call
                message = self.channels[dev].decode(topic, payload)
                if message is not None and message.kind == self.kind.CONTROL:
                    self.hello(dev)
        return on

    def collect(self) -> None:
        """Decode what arrived (outside the timed window): tasks and update acks."""
        from broker_bridge import Ack

        with self._lock:
            raw_tasks, self._raw_tasks = self._raw_tasks, {}
            raw_acks, self._raw_acks = self._raw_acks, []
        for dev, (topic, payload) in raw_tasks.items():
            message = self.channels[dev].decode(topic, payload)
            if message is not None:
                self.tasks[dev] = self.task_spec.from_message(message)
        for dev, topic, payload in raw_acks:
            message = self.channels[dev].decode(topic, payload)
            ack = None if message is None else Ack.from_message(message)
            if ack is None:
                self.rejected.append(f"{dev}: an ack that does not decode")
            elif ack.what != "update" or ack.status != "accepted":
                self.rejected.append(f"{dev}: {ack.what} {ack.status} {ack.reason}")

    def hello(self, dev: str) -> None:
        from broker_bridge import Hello, presence_message
        from device_profiles import get_profile

        channel = self.channels[dev]
        channel.send(channel.topics.presence(dev),
                     presence_message(fleet=FLEET, device=dev, status="online"), retain=True)
        hello = Hello(profile=get_profile("pi4").to_dict(), eligibility={"eligible": True},
                      num_samples=80)
        channel.send(channel.topics.up(dev, "hello"), hello.to_message(fleet=FLEET, device=dev))

    def send_updates(self, *, profile: bool = False) -> None:
        """Publish what ``prepare`` encoded (timed)."""
        import cProfile
        import pstats

        prof = cProfile.Profile() if profile else None
        if prof is not None:
            prof.enable()
        self._send_updates()
        if prof is not None:
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)

    def prepare(self, bodies: list[bytes], samples: list[int], codec: str) -> None:
        """Encode every device's update into wire payloads (not timed: device work)."""
        from broker_bridge import UpdateMeta, split_message, update_message

        self._ready: list[tuple[Any, str, list[bytes]]] = []
        for i, (dev, channel) in enumerate(self.channels.items()):
            task = self.tasks[dev]
            meta = UpdateMeta(num_samples=samples[i % len(samples)], steps=3, nonce=task.nonce,
                              train_loss=1.0, duration_s=0.1)
            msg = update_message(fleet=FLEET, device=dev, round=task.round,
                                 model_version=task.model_version, attempt=0, codec=codec,
                                 meta=meta, codec_body=bodies[i % len(bodies)])
            if dev in self.keys:
                msg = self.keys[dev].sign_update(msg)
            self.answered.add(task.round)
            payloads = split_message(msg, max_payload=channel.max_payload)
            self._ready.append((channel.transport, channel.topics.up(dev, "update"), payloads))

    def _send_updates(self) -> None:
        for transport, topic, payloads in self._ready:
            for payload in payloads:
                transport.publish(topic, payload)


def bench_config(mode: str, codec: str, n: int, buffer: int, state: Path) -> Any:
    """One round (sync) or N in flight (async) of exactly the swarm's devices; a mode
    ``async+on_request`` is async mode with each task's model fetched by its device."""
    from cloud_aggregator import AggregatorConfig

    mode, _, push = mode.partition("+")
    return AggregatorConfig(
        fleet=FLEET, model="mlp-xl", rounds=1_000_000, mode=mode, devices_per_round=n,
        over_selection=1.0, quorum=n, min_devices=n, deadline_s=3600.0, codec=codec,
        concurrency=n, buffer_size=buffer, state_dir=state, progress=False, seed=0,
        **({"model_push": push} if push else {}))


MODEL_BYTES = 4 * 1_101_834
"""An ``mlp-xl`` version as sent (fp32, the default downlink codec), about."""


def fetches_models(config: Any) -> bool:
    """Whether devices fetch each task's model (a baseline from before ``model_push``
    broadcast every version)."""
    broadcasts = getattr(config, "broadcasts_model", None)
    return broadcasts is not None and not broadcasts(MODEL_BYTES)


def run_service(mode: str, codec: str, bodies: list[bytes], samples: list[int], n: int,
                buffer: int, state: Path, profile: bool = False,
                before_timed: Callable[[], object] | None = None) -> dict[str, Any]:
    import cProfile
    import pstats

    from broker_bridge import Channel, MemoryBroker, MemoryTransport
    from cloud_aggregator import Aggregator

    broker = MemoryBroker()
    config = bench_config(mode, codec, n, buffer, state)
    swarm = Swarm.in_memory(broker, n, fetch_models=fetches_models(config))
    parts = {} if swarm.enrolment is None else {"enrolment": swarm.enrolment}
    agg = Aggregator(config=config, channel=Channel(
        transport=MemoryTransport(broker=broker, client_id="aggregator"), fleet=FLEET),
        **parts)
    agg.start()
    for dev in swarm.channels:
        swarm.hello(dev)
    run_prof = cProfile.Profile() if profile else None

    def run_loop() -> None:  # the run loop's own thread (commits, ticks, releases)
        if run_prof is not None:
            run_prof.enable()
        try:
            agg.run()
        finally:
            if run_prof is not None:
                run_prof.disable()

    runner = threading.Thread(target=run_loop, name="aggregator-run", daemon=True)
    runner.start()
    window = Window()
    try:
        drove = drive(swarm, mode, codec, bodies, samples, n, start=window.start,
                      end=window.end, profile=profile, before_timed=before_timed)
    finally:
        agg.stop()
        runner.join(timeout=60)
        swarm.close()
        agg.close()
    if run_prof is not None:
        say("run loop thread (warm-up and timed phases):")
        pstats.Stats(run_prof, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
    return result_row(mode, codec, n, drove, window)


class Window:
    """What the aggregator's process spends over the timed window: CPU and peak RSS."""

    cpu = 0.0
    rss_growth = 0.0

    def start(self) -> None:
        self._rss0, self._cpu0 = vm_hwm_mb(), time.process_time()

    def end(self) -> None:
        self.cpu = time.process_time() - self._cpu0
        self.rss_growth = vm_hwm_mb() - self._rss0


def drive(swarm: Swarm, mode: str, codec: str, bodies: list[bytes], samples: list[int],
          n: int, *, start: Any, end: Any, profile: bool = False,
          before_timed: Callable[[], object] | None = None) -> dict[str, Any]:
    """Two phases: a first round (or buffer) warms the screens up (their first updates
    are judged differently: no history yet); the second is timed, from ``start()``
    returning until the last acknowledgement (then ``end()``). ``before_timed`` is
    called just before it (processes side by side start their windows together)."""
    turnaround = seconds = float("nan")
    wall = (seconds, seconds)
    acked0 = 0
    for phase in ("warm-up", "timed"):
        wait_for_tasks(swarm, n, phase)
        acked0 = swarm.acks
        swarm.prepare(bodies, samples, codec)
        if phase == "timed" and before_timed is not None:
            before_timed()
        start()
        t0, wall0 = time.perf_counter(), time.time()
        swarm.send_updates(profile=profile and phase == "timed")
        while swarm.acks < acked0 + n and time.perf_counter() - t0 < 600:
            time.sleep(0.001)
        seconds = time.perf_counter() - t0
        wall = (wall0, time.time())
        end()
        swarm.collect()
        if phase == "timed" and mode == "sync":
            # The round closes (aggregate, checkpoint, ledger entry, proofs) and the next
            # one opens: every device has a new task. Sustained throughput counts it.
            t1 = time.perf_counter()
            wait_for_tasks(swarm, n, "the next round")
            turnaround = time.perf_counter() - t1
    return {"seconds": seconds, "turnaround": turnaround, "acked": swarm.acks - acked0,
            "rejected": swarm.rejected, "wall": wall}


def wait_for_tasks(swarm: Swarm, n: int, what: str) -> None:
    """Until every device holds a task it has not answered (SystemExit after 120 s)."""
    deadline = time.monotonic() + 120
    swarm.collect()
    while time.monotonic() < deadline and (
            len(swarm.tasks) < n or any(t.round in swarm.answered
                                        for t in list(swarm.tasks.values()))):
        time.sleep(0.002)
        swarm.collect()
    if len(swarm.tasks) < n or any(t.round in swarm.answered for t in swarm.tasks.values()):
        raise SystemExit(f"{what}: not every device got a new task within 120 s "
                         f"({len(swarm.tasks)} of {n} hold one)")


def result_row(mode: str, codec: str, n: int, drove: dict[str, Any],
               window: Window) -> dict[str, Any]:
    seconds, turnaround = drove["seconds"], drove["turnaround"]
    return {"mode": mode, "codec": codec, "updates": n, "acked": drove["acked"],
            "rejected": len(drove["rejected"]), "seconds": round(seconds, 3),
            "updates_per_s": round(n / seconds, 1),
            "cpu_ms_per_update": round(1000 * window.cpu / n, 3),
            "round_turnaround_s": None if turnaround != turnaround else round(turnaround, 3),
            "sustained_updates_per_s": (None if turnaround != turnaround
                                        else round(n / (seconds + turnaround), 1)),
            "peak_rss_growth_mb": round(window.rss_growth, 1),
            "first_rejections": drove["rejected"][:3], "wall_window": drove["wall"]}


def parse_counts(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def slow_disk(ms: float) -> None:
    """Every checkpoint file's write takes ``ms`` longer (see the module doc)."""
    import cloud_aggregator._store as store_module

    write = store_module.atomic_write

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        time.sleep(ms / 1000)
        return write(*args, **kwargs)

    store_module.atomic_write = slow_write


def workload(codec: str, devices: int, cache: Path) -> tuple[list[bytes], list[int], int]:
    """The genuine updates encoded with ``codec``, their sample counts, the model's size."""
    from broker_bridge import CodecSpec, Layout, encode_update
    from cloud_aggregator._models import build_reference_model

    updates, samples = genuine_updates(devices, cache)
    model = build_reference_model("mlp-xl", 0)
    layout = Layout(tensors=tuple((i.name, tuple(int(d) for d in i.dims))
                                  for i in model.graph.initializer if len(i.dims) >= 1))
    spec = CodecSpec.parse(codec)
    return [encode_update(u, layout, spec, rng=0).body for u in updates], samples, layout.size


def scenarios(args: argparse.Namespace) -> dict[str, Any]:
    from broker_bridge._brokers import find_mosquitto

    if args.slow_disk_ms:
        slow_disk(args.slow_disk_ms)
    out: dict[str, Any] = {"parameters": 0, "runs": []}
    for codec in SPECS:
        bodies, samples, out["parameters"] = workload(codec, args.devices, Path(args.cache))
        if 4 * out["parameters"] != MODEL_BYTES:
            raise SystemExit(f"mlp-xl has {out['parameters']} parameters: set MODEL_BYTES")
        counts = parse_counts(args.counts if codec != "fp32" else args.dense_counts)
        over_mqtt = parse_counts(args.mqtt_counts) if codec != "fp32" else []
        if over_mqtt and find_mosquitto() is None:
            say("  (no mosquitto binary: the scenarios over a real broker are skipped)")
            over_mqtt = []
        runs = [("memory", n) for n in counts] + [("mosquitto", n) for n in over_mqtt]
        modes = args.modes.split(",")
        if "async" in modes and args.async_on_request:
            modes.append("async+on_request")
        for mode in modes:
            for broker, n in runs:
                with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-agg-") as tmp:
                    if broker == "memory":
                        row = run_service(mode, codec, bodies, samples, n, args.buffer,
                                          Path(tmp), profile=args.profile)
                        row["broker"] = "memory"
                    else:
                        from _mqtt_swarm import run_mqtt

                        row = run_mqtt(mode, codec, bodies, samples, n, args.buffer, Path(tmp))
                turn = ("" if row["round_turnaround_s"] is None else
                        f"round close+open {row['round_turnaround_s']:.3f} s, ")
                say(f"  {mode:15s} {codec:18s} {broker:9s} n={n:5d}: "
                    f"{row['updates_per_s']:8.1f} updates/s, "
                    f"{row['cpu_ms_per_update']:.3f} CPU ms/update, {turn}"
                    f"peak RSS +{row['peak_rss_growth_mb']} MB, rejected {row['rejected']}")
                out["runs"].append(row)
            if codec != "fp32" and counts and args.processes > 1 and "+" not in mode:
                from _shards import run_processes

                n = max(counts)
                row = run_processes(mode, codec, n, args.buffer, args.processes,
                                    devices=args.devices, cache=args.cache,
                                    slow_disk_ms=args.slow_disk_ms)
                say(f"  {mode:15s} {codec:18s} {args.processes} processes n={n:5d}: "
                    f"{row['updates_per_s']:8.1f} updates/s together "
                    f"({', '.join(f'{r:.0f}' for r in row['per_process_updates_per_s'])}), "
                    f"{row['cpu_ms_per_update']:.3f} CPU ms/update, windows overlap "
                    f"{100 * row['windows_overlap']:.0f}%, rejected {row['rejected']}")
                out["runs"].append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="200,800", help="compressed updates per scenario")
    parser.add_argument("--dense-counts", default="50,100", help="dense fp32 updates")
    parser.add_argument("--mqtt-counts", default="800",
                        help="compressed updates through a real Mosquitto ('' skips)")
    parser.add_argument("--modes", default="sync,async", choices=("sync,async", "sync", "async"),
                        help="which aggregation modes to run")
    parser.add_argument("--buffer", type=int, default=100, help="async buffer size (K)")
    parser.add_argument("--async-on-request", type=int, default=1, choices=(0, 1),
                        help="also run async mode with each task's model fetched by its "
                        "device (async+on_request rows; model_push = on_request)")
    parser.add_argument("--processes", type=int, default=2,
                        help="also split the largest in-memory compressed count over this "
                        "many aggregator processes side by side (1: skip; _shards.py)")
    parser.add_argument("--devices", type=int, default=6, help="genuine updates to train")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "fleetlearn"))
    parser.add_argument("--repo", default=None, help="run another checkout's code")
    parser.add_argument("--baseline-rev", default=None,
                        help="also run this git revision (in a temporary worktree)")
    parser.add_argument("--slow-disk-ms", type=float, default=0.0,
                        help="add this much to every checkpoint file's write")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of each timed ingest to stderr")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scenarios(args)))
        return
    say(f"training (or loading) {args.devices} genuine mlp-xl updates...")
    genuine_updates(args.devices, Path(args.cache))
    say(f"this checkout ({REPO}):")
    ours = scenarios(args)
    result: dict[str, Any] = {"model": "mlp-xl", "parameters": ours["parameters"],
                              "slow_disk_ms": args.slow_disk_ms,
                              "store_synchronous": "FULL", "ours": ours["runs"]}
    if args.baseline_rev:
        with tempfile.TemporaryDirectory(prefix="fleetlearn-baseline-") as tmp:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", tmp,
                            args.baseline_rev], check=True, capture_output=True)
            try:
                say(f"baseline {args.baseline_rev}:")
                child = subprocess.run(
                    [sys.executable, __file__, "--child", "--repo", tmp, "--counts", args.counts,
                     "--dense-counts", args.dense_counts, "--mqtt-counts", "",
                     "--modes", args.modes, "--buffer", str(args.buffer), "--processes", "1",
                     "--async-on-request", "0",
                     "--slow-disk-ms", str(args.slow_disk_ms),
                     "--devices", str(args.devices), "--cache", args.cache],
                    capture_output=True, text=True, timeout=3600)
                sys.stderr.write(child.stderr)
                base = json.loads(child.stdout.strip().splitlines()[-1])["runs"]
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tmp],
                               capture_output=True)
        result["baseline_rev"] = args.baseline_rev
        result["baseline"] = base
        def key(row: dict[str, Any]) -> str:
            return f"{row['mode']}:{row['codec']}:{row.get('broker', 'memory')}:{row['updates']}"

        theirs = {key(row): row for row in base}
        ratios = {key(mine): round(mine["updates_per_s"] / theirs[key(mine)]["updates_per_s"], 2)
                  for mine in ours["runs"] if key(mine) in theirs}
        result["speedup_vs_baseline"] = ratios
    compressed = [r for r in ours["runs"] if r["codec"] != "fp32" and r["broker"] == "memory"]
    result["compressed_at_least_1000_per_s"] = all(r["updates_per_s"] >= 1000 for r in compressed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
