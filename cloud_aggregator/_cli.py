"""Subcommands owned by this package (registered by ``fleetlearn.cli``).

Only argparse here: handlers import onnx and onnxruntime when they run, so the
``fleetlearn`` command starts fast and works on a device without the cloud extra.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any


def register(sub: Any) -> None:
    """Add ``fleetlearn artifacts build|reference`` and ``fleetlearn aggregator``."""
    _register_aggregator(sub)
    from cloud_aggregator._ledger_cli import register_ledger

    register_ledger(sub)
    artifacts = sub.add_parser(
        "artifacts", help="build training artifacts (portable training graphs) for a fleet"
    )
    actions = artifacts.add_subparsers(dest="artifacts_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="turn your ONNX model into training artifacts")
    build.add_argument("model", metavar="MODEL.onnx", help="the model to train (IR version <= 10)")
    build.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    _common(build)
    build.add_argument(
        "--frozen", nargs="+", default=[], metavar="NAME", help="parameters to keep fixed"
    )
    build.add_argument(
        "--trainable", nargs="+", default=None, metavar="NAME",
        help="train only these parameters (the rest are frozen; only these travel)")
    build.set_defaults(handler=_build)

    reference = actions.add_parser(
        "reference", help="build a reference model (mlp, cnn, mlp-xl) and its artifacts"
    )
    reference.add_argument("name", metavar="NAME", help="mlp, cnn or mlp-xl")
    reference.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    reference.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    _common(reference)
    reference.set_defaults(handler=_reference)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loss", default="cross_entropy", metavar="SPEC",
        help="cross_entropy, mse, bce, distillation, joined by + with options, e.g. "
        "'cross_entropy:label_smoothing=0.1+prox:mu=0.01' (default: cross_entropy)")
    parser.add_argument(
        "--optimizer", default="sgd", metavar="SPEC",
        help="sgd or adamw with options, e.g. 'sgd:momentum=0.9,weight_decay=5e-4' "
        "(default: sgd)")
    parser.add_argument(
        "--backend", choices=("portable", "ort-training"), default="portable",
        help="portable (default): standard ONNX operators, runs on any onnxruntime; "
        "ort-training: needs the onnxruntime-training wheel (x86_64, Python <= 3.12)")


def _report(info: Any) -> int:
    print(f"wrote training artifacts to {info.directory}")
    print(
        f"  parameters: {info.num_parameters} in {len(info.parameters)} tensors"
        + (f" ({len(info.frozen)} frozen)" if info.frozen else "")
    )
    print(f"  input: {info.input_name} {list(info.input_shape)}")
    print(f"  loss: {info.loss}, optimizer: {info.optimizer}, backend: {info.backend}")
    print(f"  files: {', '.join(info.device_files)}")
    print(f"  content hash: {info.content_hash}")
    return 0


def _builders() -> tuple[Any, Any]:
    """The artifact builder and model zoo, or a clear error without the cloud extra."""
    try:
        from cloud_aggregator._artifacts import build_artifacts
        from cloud_aggregator._models import build_reference_model
    except ImportError as exc:
        from cloud_aggregator._errors import ModelBuildError

        raise ModelBuildError(
            f"building artifacts needs the cloud extra: pip install 'fleetlearn[cloud]' ({exc})"
        ) from exc
    return build_artifacts, build_reference_model


def _build(args: argparse.Namespace) -> int:
    build_artifacts, _ = _builders()
    info = build_artifacts(
        args.model, args.out, loss=args.loss, optimizer=args.optimizer, frozen=args.frozen,
        trainable=args.trainable, backend=args.backend,
    )
    return _report(info)


def _reference(args: argparse.Namespace) -> int:
    build_artifacts, build_reference_model = _builders()
    model = build_reference_model(args.name, args.seed)
    info = build_artifacts(model, args.out, loss=args.loss, optimizer=args.optimizer,
                           backend=args.backend)
    return _report(info)


# --------------------------------------------------------------------------- aggregator

def _register_aggregator(sub: Any) -> None:
    from cloud_aggregator._config import AGGREGATOR

    agg = sub.add_parser(
        "aggregator", help="run the cloud aggregator against a broker",
        description="Runs the aggregator: selects devices, sends tasks, aggregates their "
        "updates into new model versions. Settings come from flags, then "
        "FLEETLEARN_AGGREGATOR_* environment variables, then the [aggregator] table of "
        "--config FILE, then defaults.",
        epilog=AGGREGATOR.epilog())
    AGGREGATOR.add_flags(agg)
    agg.set_defaults(handler=_aggregator)


def _stop_when_refused(transport: Any, aggregator: Any) -> None:
    """Stop the aggregator when the broker refuses it for good (a changed password, a
    revoked user): retrying would wait for ever."""
    while not aggregator.done and transport.refused is None:
        time.sleep(1.0)
    if transport.refused is not None:
        aggregator.stop()


def _aggregator(args: argparse.Namespace) -> int:
    from broker_bridge import Channel
    from cloud_aggregator import Aggregator
    from cloud_aggregator._config import AGGREGATOR, AggregatorConfig
    from cloud_aggregator._connect import AggregatorConnection
    from cloud_aggregator._metrics import RoundMetrics

    resolved = AGGREGATOR.from_args(args)
    config: AggregatorConfig = resolved.build(AggregatorConfig)
    connection: AggregatorConnection = resolved.build(AggregatorConnection)
    transport = connection.settings().transport()
    channel = Channel(transport=transport, fleet=config.fleet)

    def progress(m: RoundMetrics) -> None:
        if not config.progress:
            return
        acc = "-" if m.accuracy is None else f"{m.accuracy:.3f}"
        print(f"round {m.round:4d} v{m.model_version:<4d} {m.outcome:9s} acc {acc:>5s} "
              f"devices {m.devices_reported}/{m.devices_selected} "
              f"up {m.bytes_up / 1e6:.2f} MB down {m.bytes_down / 1e6:.2f} MB "
              f"t {m.wall_s:.1f}s emu {m.emulated_total_s:.0f}s"
              + ("" if m.dp_epsilon is None else f" eps {m.dp_epsilon:.3g}"), flush=True)

    def status(line: str) -> None:
        if config.progress:
            print(f"fleetlearn aggregator: {line}", flush=True)

    aggregator = Aggregator(config=config, channel=channel, on_round=progress, on_status=status)
    watcher = threading.Thread(target=_stop_when_refused, args=(transport, aggregator),
                               name="refusal-watch", daemon=True)
    try:
        # start() registers the handlers, then connects: what the broker kept for this
        # persistent session while the aggregator was away is handled, not dropped.
        aggregator.start()
        if aggregator.privacy is not None and config.progress:
            print(f"privacy: {aggregator.privacy.plan.describe()}", flush=True)
        if aggregator.metrics_port is not None and config.progress:
            print(f"metrics on http://{config.metrics_bind}:{aggregator.metrics_port}/metrics",
                  flush=True)
        watcher.start()
        aggregator.run()
        transport.check_refused()  # BrokerRefused: the reason run() returned early
    finally:
        # The session keeps its subscriptions: the broker queues what devices send
        # until the aggregator is back.
        aggregator.close(unsubscribe=False)
        transport.close()
    if aggregator.failure is not None:
        print(f"fleetlearn: aggregator stopped: {aggregator.failure}")
        return 1
    if aggregator.finished is not None:
        print(f"fleetlearn: training stopped: {aggregator.finished}")
    if aggregator.privacy_epsilon is not None:
        print(f"privacy: epsilon {aggregator.privacy_epsilon:.4g} spent at delta "
              f"{config.dp_delta:g}")
    print(f"done: model version {aggregator.model_version} in {aggregator.state_dir}")
    return 0
