"""``fleetlearn agent``: run the device agent; and the ONNX Runtime throughput probe.

Registering is cheap (``fleetlearn --help`` must not import ONNX Runtime): every heavy
import happens inside the handler. ``register`` also adds the ORT step-time probe to
``fleetlearn profile``; it measures the reference models whose artifacts it finds in
``$FLEETLEARN_CACHE_DIR/reference-artifacts/<model>/`` (the device side cannot build
them: that needs the cloud extra) and reports nothing when there are none.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REFERENCE_ARTIFACTS = "reference-artifacts"
PROBE_BATCH = 32


def register(sub: Any) -> None:
    """Add ``agent`` to the ``fleetlearn`` parser and the ORT probe to ``fleetlearn profile``."""
    from device_profiles import register_throughput_probe

    register_throughput_probe(_reference_probe)
    from edge_runtime._config import AGENT

    p = sub.add_parser(
        "agent",
        help="run a device agent: train on local data when the aggregator asks",
        description=(
            "Connects to the broker as DEVICE_ID, announces itself, and answers training "
            "tasks with ONNX Runtime on the local data. Settings come from flags, then "
            "FLEETLEARN_AGENT_* environment variables, then the [agent] table of --config "
            "FILE, then defaults."
        ),
        epilog=AGENT.epilog(),
    )
    AGENT.add_flags(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from edge_runtime._config import AGENT, load_config

    flags, names = AGENT.flag_values(args)
    config = load_config(flags=flags, flag_names=names, config_file=args.config_file)
    return run_agent(config)


def run_agent(config: Any, *, stop: threading.Event | None = None) -> int:
    """Build an agent from an ``AgentConfig`` and run it until SIGTERM/SIGINT (or ``stop``)."""
    from broker_bridge import BrokerUnavailable, Channel
    from device_profiles import get_profile, load_profile_file, measure_machine
    from edge_runtime._agent import Agent, Emulation, LocalData, TrainerPool, make_agent_transport
    from edge_runtime._artifact_cache import ArtifactCache
    from edge_runtime._data import load_data
    from edge_runtime._eligibility import SystemProbe
    from edge_runtime._ort import import_onnxruntime

    ort = import_onnxruntime()  # TrainingBackendMissing says how to install it
    x, y = load_data(config.data)
    data = LocalData.split(x, y, holdout_fraction=config.holdout_fraction,
                           seed=zlib.crc32(config.device_id.encode()))
    if config.profile is None:
        profile = measure_machine(use_probes=False, gemm_seconds=0.1)
    elif config.profile.endswith(".toml") or Path(config.profile).is_file():
        profile = load_profile_file(config.profile)
    else:
        profile = get_profile(config.profile)
    transport = make_agent_transport(
        config.broker, fleet=config.fleet, device_id=config.device_id,
        password=config.password, tls=config.tls,
    )
    agent = Agent(
        device_id=config.device_id,
        channel=Channel(transport=transport, fleet=config.fleet),
        data=data,
        state_dir=config.state_dir,
        profile=profile,
        rules=config.rules,
        status_probe=SystemProbe(metered=config.metered),
        trainers=TrainerPool(intra_op_threads=config.threads),
        artifacts=ArtifactCache(root=config.artifacts_dir) if config.artifacts_dir else None,
        emulation=Emulation(profile=profile, time_scale=config.time_scale)
        if config.emulate else None,
        settings=config.settings,
        owns_transport=True,
        on_status=lambda line: print(f"fleetlearn agent {config.device_id}: {line}", flush=True),
    )
    problem = agent.data_problem()
    if problem is not None:
        print(f"fleetlearn agent {config.device_id}: error: {config.data}: {problem} "
              "(its tasks will fail until the data is fixed)", flush=True)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            agent.start()
        except BrokerUnavailable as exc:
            # The transport keeps reconnecting in the background; greet when it does.
            log.warning("%s: %s; still trying", config.device_id, exc)
        print(f"fleetlearn agent {config.device_id}: {data.num_samples} local samples, "
              f"onnxruntime {ort.__version__}, state in {config.state_dir}", flush=True)
        while not stop.wait(1.0):
            transport.check_refused()  # BrokerRefused: retrying would not help
    finally:
        agent.stop()
    return 0


# -- the ONNX Runtime throughput probe for ``fleetlearn profile`` ------------------------


def measure_step_times(
    artifact_dirs: Mapping[str, Path], *, batch_size: int = PROBE_BATCH, steps: int = 30,
    threads: int = 1,
) -> dict[str, float]:
    """Milliseconds per training step (random data) for each artifacts folder.

    Each sample times one ``train`` call over ``steps`` batches and divides by the steps,
    as a task runs them: a per-call set-up cost counted once per step would overstate
    small models by a third. The median of five such calls is kept.
    """
    import numpy as np

    from edge_runtime._training import open_trainer

    out: dict[str, float] = {}
    for name, directory in artifact_dirs.items():
        trainer = open_trainer(directory, intra_op_threads=threads)
        shape = trainer.input_shape or ("batch", 40)
        dims = [d if isinstance(d, int) else 1 for d in shape[1:]]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch_size * steps, *dims)).astype(np.float32)
        y = rng.integers(0, 10, batch_size * steps).astype(np.int64)
        trainer.train(x[:batch_size * 3], y[:batch_size * 3], batch_size=batch_size)  # warm up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            result = trainer.train(x, y, batch_size=batch_size)
            times.append((time.perf_counter() - t0) / max(result.steps, 1))
        out[name] = round(float(np.median(times)) * 1000.0, 4)
    return out


def _reference_probe() -> tuple[dict[str, float], int]:
    from edge_runtime._datasets import default_cache_dir

    root = default_cache_dir() / REFERENCE_ARTIFACTS
    dirs = {}
    for name in ("mlp", "cnn", "mlp-xl"):
        if (root / name / "artifacts.json").is_file():
            dirs[name] = root / name
    if not dirs:
        return {}, PROBE_BATCH
    return measure_step_times(dirs), PROBE_BATCH
