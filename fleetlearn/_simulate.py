"""``fleetlearn simulate``: a fleet, an aggregator and a broker, on this machine.

This is the composition root's job: it is the one place that runs the aggregator
(``cloud_aggregator``) and the device agents (``edge_runtime``) side by side. They
still only talk over MQTT, through a broker this process starts (a Mosquitto child
when the binary exists, the embedded Python broker otherwise) or an external one.

The simulation drives the aggregator's scheduling step itself so that fleet changes
(reboots after injected crashes, availability windows) happen between rounds, and
waits for the aggregator to see them: the same seed gives the same run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge import (
    EMBEDDED_LIMITS,
    Channel,
    MqttTransport,
    atomic_write,
    local_broker,
    local_broker_kind,
)
from cloud_aggregator import Aggregator, RoundMetrics
from device_profiles import ConfigError
from edge_runtime._datasets import load_mnist1d
from edge_runtime._fleet import Fleet, FleetConfig, summarise_ids, wait_until
from fleetlearn._report import (
    human_time,
    reputation_summary,
    summary_lines,
    time_to_accuracy,
    write_plots,
    write_report,
    write_reputation_plot,
)
from fleetlearn._sim_config import DEFAULT_CODEC, SimConfig

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CODEC", "TARGETS", "SimConfig", "SimResult", "run_simulation"]

TARGETS = (0.6, 0.8, 0.9)


def _ort_version() -> str:
    from edge_runtime._ort import import_onnxruntime

    return str(import_onnxruntime().__version__)


def _backend_line(backend: str) -> str:
    if backend == "portable":
        return f"portable graphs on onnxruntime {_ort_version()}"
    return f"onnxruntime-training {_ort_version()}"


@dataclass
class SimResult:
    report: dict[str, Any]
    report_path: Path
    plots: list[Path]
    rounds: list[dict[str, Any]]


def _load_credentials(path: Path | None) -> Callable[[str], str | None]:
    if path is None:
        return lambda _d: None
    try:
        creds = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read credentials {path}: {exc}") from exc
    return lambda device: creds.get(device)


@contextlib.contextmanager
def _device_logs(path: Path) -> Iterator[None]:
    """Send the fleet's and the aggregator's log records to a file, not the terminal:
    a hundred devices warning at once would bury the progress lines."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(n) for n in ("edge_runtime", "cloud_aggregator",
                                               "broker_bridge")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        handler.close()


@contextlib.contextmanager
def _broker(cfg: SimConfig) -> Iterator[str]:
    if cfg.broker is not None:
        yield cfg.broker
        return
    with local_broker(prefer=cfg.broker_kind) as url:
        yield url


class _Printer:
    def __init__(self, out: io.TextIOBase | Any, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)


def _fmt_kb(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def simulate(config: SimConfig | None = None, *, out: Any = None, quiet: bool = False,
             strategy: Any = None, policy: Any = None, optimizer: Any = None,
             evaluator: Any = None, **settings: Any) -> SimResult:
    """Simulate a fleet on this machine: real agents, real training, a broker started
    for the run; what ``fleetlearn simulate`` does. ``config`` or ``SimConfig`` fields
    as keywords (``simulate(devices=20, per_round=5, rounds=10)``). ``strategy``,
    ``policy``, ``optimizer`` and ``evaluator`` replace the aggregator's configured ones.
    Progress goes to ``out`` (stdout) unless ``quiet``; the report and plots to
    ``config.out_dir``."""
    if config is None:
        try:
            config = SimConfig(**settings)
        except TypeError as exc:  # an unknown keyword
            raise ConfigError(f"simulate(): {exc}") from exc
    elif settings:
        raise ConfigError(f"give a SimConfig or its fields, not both ({sorted(settings)})")
    parts = {k: v for k, v in (("strategy", strategy), ("policy", policy),
                                ("optimizer", optimizer), ("evaluator", evaluator))
             if v is not None}
    return run_simulation(config, out=out, quiet=quiet, **parts)


def run_simulation(cfg: SimConfig, *, out: Any = None, quiet: bool = False,
                   **parts: Any) -> SimResult:
    """Run one simulation end to end; write the report and plots into ``cfg.out_dir``.

    ``parts`` go to the ``Aggregator`` (``strategy``, ``policy``, ``optimizer``,
    ``evaluator``): a simulation runs your own parts exactly as a deployment would."""
    if cfg.topology is not None:
        from fleetlearn._sim_tree import run_tree_simulation

        return run_tree_simulation(cfg, out=out, quiet=quiet)
    say = _Printer(out or sys.stdout, quiet)
    started = time.monotonic()
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("aggregator", "devices", "artifact-cache"):
        path = out_dir / stale
        if path.exists():
            shutil.rmtree(path)

    codec = "secagg (secure aggregation)" if cfg.secure_aggregation else cfg.codec
    say(f"fleetlearn simulate: {cfg.devices} devices, {cfg.per_round} per round, model "
        f"{cfg.model}, codec {codec}, {cfg.selection} selection, {cfg.mode} rounds, "
        f"seed {cfg.seed}")
    data = load_mnist1d(num_samples=cfg.num_samples)
    buf = io.BytesIO()
    np.savez(buf, x=data.x_test, y=data.y_test)
    atomic_write(out_dir / "test.npz", buf.getvalue())
    say(f"data: MNIST-1D generated locally, {len(data.y_train)} train samples split "
        f"{cfg.partition} over {cfg.devices} devices, {len(data.y_test)} held out")

    agg_cfg = cfg.aggregator_config()
    log_path = out_dir / "simulation.log"
    password_for = _load_credentials(cfg.credentials)
    records: list[dict[str, Any]] = []
    privacy: dict[str, Any] | None = None
    with _device_logs(log_path), _broker(cfg) as url:
        say(f"broker: {url}" + ("" if cfg.broker else " (started for this run)"))
        if cfg.broker is None and local_broker_kind(cfg.broker_kind) == "embedded":
            say(f"warning: {EMBEDDED_LIMITS}")
        fleet = Fleet(
            config=FleetConfig(
                fleet=agg_cfg.fleet, devices=cfg.devices, profile_mix=cfg.profile_mix,
                partition=cfg.partition, seed=cfg.seed, model=cfg.model,
                network_loops=cfg.network_loops, training_workers=cfg.workers,
                time_scale=cfg.time_scale if cfg.clock == "real" else None,
                availability=cfg.availability, start_hour=cfg.start_hour, faults=cfg.faults,
            ),
            broker_url=url, x=data.x_train, y=data.y_train, state_root=out_dir,
            password_for=password_for,
        )
        agg_transport = MqttTransport(url=url, client_id="aggregator", username="aggregator",
                                      password=password_for("aggregator"))
        aggregator = Aggregator(config=agg_cfg,
                                channel=Channel(transport=agg_transport, fleet=agg_cfg.fleet),
                                enrolment=fleet.enrolment, **parts)
        fleet.pin_ledger_key(aggregator.trail.key.public_hex)  # proofs verify end to end
        dense_bytes = 4 * aggregator.layout.size
        reputation: dict[str, dict[str, Any]] = {}
        try:
            aggregator.start()
            say(f"model: {cfg.model}, {aggregator.layout.size} parameters "
                f"({_fmt_kb(dense_bytes)} dense); training: {_backend_line(agg_cfg.backend)}")
            fleet.start(progress=lambda n, total: say(f"  connected {n}/{total} devices"))
            _await_online(aggregator, fleet, say)
            if aggregator.privacy is not None:
                say(f"privacy: {aggregator.privacy.plan.describe()}")
            records = _drive(cfg, aggregator, fleet, say, dense_bytes, started)
            if aggregator.privacy is not None:
                privacy = {**aggregator.privacy.report(), "stopped": aggregator.finished}
        finally:
            participation = fleet.participation()
            reputation = _reputation(aggregator, fleet, agg_cfg.reputation_floor)
            fleet.stop()
            aggregator.close()
            agg_transport.close()

    wall = time.monotonic() - started
    final = next((r["accuracy"] for r in reversed(records) if r["accuracy"] is not None), None)
    report: dict[str, Any] = {
        "model": cfg.model, "devices": cfg.devices, "per_round": cfg.per_round,
        "selection": cfg.selection, "mode": cfg.mode,
        "codec": codec,
        "secure_aggregation": cfg.secure_aggregation,
        "partition": cfg.partition, "seed": cfg.seed, "clock": cfg.clock,
        "faults": asdict(cfg.faults), "availability": cfg.availability,
        "aggregator": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in asdict(agg_cfg).items() if k != "extra"},
        "parameters": dense_bytes // 4,
        "training_backend": agg_cfg.backend,
        "onnxruntime": _ort_version(),
        "final_accuracy": final,
        "best_accuracy": max((r["accuracy"] for r in records if r["accuracy"] is not None),
                             default=None),
        "time_to_accuracy": {str(t): time_to_accuracy(records, t) for t in TARGETS},
        "bytes_up": sum(r["bytes_up"] for r in records),
        "bytes_up_dense": sum(r["bytes_up_dense"] for r in records),
        "bytes_down": sum(r["bytes_down"] for r in records),
        "emulated_time_s": records[-1]["emulated_time_s"] if records else 0.0,
        "wall_time_s": wall,
        "abandoned_rounds": sum(1 for r in records if r["outcome"] == "abandoned"),
        "participation": participation,
        "reputation": reputation,
        "reputation_summary": reputation_summary(reputation),
        "privacy": privacy,
        "rounds": records,
    }
    report_path = write_report(out_dir, report)
    plots = write_plots(out_dir, [r for r in records if r["outcome"] != "abandoned"],
                        {k: {"completed": v["completed"], "dropped": v["dropped"]}
                         for k, v in participation.items()})
    plots += write_reputation_plot(out_dir, records, reputation,
                                   floor=agg_cfg.reputation_floor)
    for line in summary_lines(report):
        say(line)
    say(f"  report: {report_path}")
    say(f"  log:    {log_path}")
    say(f"  plots:  {', '.join(str(p) for p in plots)}")
    return SimResult(report=report, report_path=report_path, plots=plots, rounds=records)


def _await_online(aggregator: Aggregator, fleet: Fleet, say: _Printer, *,
                  timeout: float = 60.0) -> bool:
    """Wait until the aggregator sees every connected device online (saying so first);
    on a timeout, warn and go on with the devices it sees."""
    expected = set(fleet.online_ids())
    say(f"waiting for the aggregator to see the {len(expected)} connected devices "
        f"(up to {timeout:.0f} s)")

    def seen() -> set[str]:
        return {d.device_id for d in aggregator.registry.online()}

    if wait_until(lambda: seen() >= expected, timeout=timeout):
        return True
    missing = sorted(expected - seen())
    text = (f"after {timeout:.0f} s the aggregator sees {len(expected) - len(missing)} of "
            f"the {len(expected)} connected devices (not {summarise_ids(missing)}); "
            "starting anyway")
    say(f"warning: {text}")
    log.warning("%s", text)
    return False


def _drive(cfg: SimConfig, aggregator: Aggregator, fleet: Fleet, say: _Printer,
           dense_bytes: int, started: float) -> list[dict[str, Any]]:
    """Tick the aggregator; between rounds, apply fleet changes and print progress."""
    records: list[dict[str, Any]] = []
    last_poll = 0.0
    seen = 0
    while not aggregator.done:
        if time.monotonic() - started > cfg.max_wall_s:
            say(f"stopping: wall-clock limit of {cfg.max_wall_s:.0f} s reached")
            break
        progressed = aggregator.tick()
        now = time.monotonic()
        if now - last_poll >= 1.0:
            last_poll = now
            fleet.poll()
        if len(aggregator.history) > seen:
            for m in aggregator.history[seen:]:
                rec = _record(m, dense_bytes)
                records.append(rec)
                say(_progress_line(cfg, rec, len(aggregator.registry.online()), cfg.devices))
            seen = len(aggregator.history)
            last = records[-1]
            if (cfg.target_accuracy is not None and last["accuracy"] is not None
                    and last["accuracy"] >= cfg.target_accuracy):
                say(f"target accuracy {100 * cfg.target_accuracy:.0f}% reached")
                break
            _between_rounds(aggregator, fleet, say)
        elif not progressed:
            time.sleep(0.005)
    # A round can close between the check above and ``done`` (a secure round closes when
    # its last reveal arrives): its record is still the run's.
    for m in aggregator.history[seen:]:
        records.append(_record(m, dense_bytes))
        say(_progress_line(cfg, records[-1], len(aggregator.registry.online()), cfg.devices))
    if aggregator.failure:
        say(f"aggregator stopped: {aggregator.failure}")
    if aggregator.finished:
        say(f"training stopped: {aggregator.finished}")
    return records


def _between_rounds(aggregator: Aggregator, fleet: Fleet, say: _Printer) -> None:
    came, went = fleet.advance(round_index=aggregator.history[-1].round + 1,
                               emulated_now=aggregator.emulated_total_s)
    if went:
        say(f"  offline now: {summarise_ids(went)}")
    if came:
        say(f"  back online: {summarise_ids(came)}")
    expected = set(fleet.online_ids())

    def settled() -> bool:
        online = {d.device_id for d in aggregator.registry.online()}
        return online == expected

    if not wait_until(settled, timeout=30):
        online = {d.device_id for d in aggregator.registry.online()}
        log.warning("aggregator's view differs from the fleet: %d extra, %d missing",
                    len(online - expected), len(expected - online))


def _reputation(aggregator: Aggregator, fleet: Fleet,
                floor: float | None) -> dict[str, dict[str, Any]]:
    """Each device's contributions and reputation as the aggregator ends, and whether
    the simulation made it Byzantine."""
    history = aggregator.registry.history
    out: dict[str, dict[str, Any]] = {}
    for d in fleet.devices:
        h = history.get(d.device_id)
        out[d.device_id] = {
            "byzantine": d.byzantine, "contributions": h.contributions,
            "weight_total": round(h.weight_total, 6),
            "marginal_total": _num(h.marginal_total), "alignment": round(h.alignment, 6),
            "refusal_rate": round(h.refusal_rate, 6), "reputation": round(h.reputation, 6),
            "distrusted": floor is not None and h.reputation < floor,
        }
    return out


def _record(m: RoundMetrics, dense_bytes: int) -> dict[str, Any]:
    return {
        "round": m.round, "model_version": m.model_version, "outcome": m.outcome,
        "reason": m.reason, "accuracy": _num(m.accuracy), "loss": _num(m.loss),
        "train_loss": _num(m.train_loss), "selected": m.devices_selected,
        "reported": m.devices_reported, "dropped": m.devices_dropped,
        "declined": m.devices_declined, "rejected": m.updates_rejected,
        "bytes_up": m.bytes_up, "bytes_up_dense": m.devices_reported * dense_bytes,
        "bytes_down": m.bytes_down, "emulated_round_s": m.emulated_s,
        "emulated_time_s": m.emulated_total_s, "wall_s": m.wall_s,
        "alignment_mean": _num(m.alignment_mean), "devices_distrusted": m.devices_distrusted,
        "screened": list(m.screened), "contributions": [r.to_json() for r in m.contributions],
        "dp_epsilon": _num(m.dp_epsilon), "dp_clip_norm": _num(m.dp_clip_norm),
        "dp_noise_std": _num(m.dp_noise_std),
    }


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def _progress_line(cfg: SimConfig, r: dict[str, Any], online: int, total: int) -> str:
    acc = "  n/a " if r["accuracy"] is None else f"{100 * r['accuracy']:5.1f}%"
    status = "" if r["outcome"] != "abandoned" else f"  ABANDONED ({r['reason']})"
    if r.get("dp_epsilon") is not None:
        status = f"  eps {r['dp_epsilon']:.3g}{status}"
    return (f"round {r['round']:>4}/{cfg.rounds}  acc {acc}  devices "
            f"{r['reported']:>3}/{r['selected']:<3} online {online:>5}/{total}  "
            f"up {_fmt_kb(r['bytes_up']):>9} (dense {_fmt_kb(r['bytes_up_dense'])})  "
            f"t {human_time(r['emulated_time_s']):>9}{status}")

