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

# Flags that map one-to-one onto ``AggregatorConfig`` fields: (flag, field, type, help).
_AGG_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--fleet", "fleet", str, "fleet id (default: default)"),
    ("--model", "model", str, "mlp, cnn, mlp-xl or a path to your .onnx model (default: cnn)"),
    ("--backend", "backend", str,
     "training artifacts: portable (default, any onnxruntime) or ort-training"),
    ("--rounds", "rounds", int, "model versions to produce (default: 150)"),
    ("--devices-per-round", "devices_per_round", int, "target updates per round (default: 10)"),
    ("--over-selection", "over_selection", float, "devices asked per target one (default: 1.3)"),
    ("--min-devices", "min_devices", int, "ready devices needed to start a round"),
    ("--quorum", "quorum", int, "counted updates a round needs (default: half the target)"),
    ("--deadline-s", "deadline_s", float, "round deadline in seconds (default: 60)"),
    ("--mode", "mode", str, "sync (rounds) or async (FedBuff)"),
    ("--clock", "clock", str, "real, or virtual (deadlines in emulated device seconds)"),
    ("--selection", "selection", str, "random, deadline, tiered or oort"),
    ("--max-selected", "max_selected", int,
     "deadline (FedCS): select up to this many devices that fit (default: as many as others)"),
    ("--server-opt", "server_opt", str, "fedavg, fedavgm, fedadagrad, fedadam or fedyogi"),
    ("--server-lr", "server_lr", float, "server learning rate"),
    ("--local-epochs", "local_epochs", int, "local epochs per task (default: 5)"),
    ("--lr", "lr", float, "device learning rate (default: 0.05)"),
    ("--codec", "codec", str, "update codec devices use, e.g. topk:0.01+q8+zstd"),
    ("--downlink-codec", "downlink_codec", str, "global model codec: fp32 or fp16"),
    ("--robust", "robust", str, "mean, median, trimmed_mean, krum or multi_krum"),
    ("--clip-norm", "clip_norm", float, "clip each update to this L2 norm"),
    ("--norm-median-multiple", "norm_median_multiple", float,
     "refuse updates whose norm exceeds this multiple of the recent median (default: 4)"),
    ("--max-weight-multiple", "max_weight_multiple", float,
     "an update weighs at most this multiple of the recent median weight (default: 4)"),
    ("--concurrency", "concurrency", int, "async: devices kept busy"),
    ("--buffer-size", "buffer_size", int, "async: updates per aggregation (K)"),
    ("--state-dir", "state_dir", str, "where the store, checkpoints and metrics live"),
    ("--eval-data", "eval_data", str,
     "held-out .npz (arrays x: features, y: labels) for server-side evaluation"),
    ("--metrics-port", "metrics_port", int, "serve Prometheus metrics on this port"),
    ("--metrics-bind", "metrics_bind", str,
     "address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0: every interface)"),
    ("--seed", "seed", int, "selection and model seed"),
)


def _register_aggregator(sub: Any) -> None:
    agg = sub.add_parser("aggregator", help="run the cloud aggregator against a broker")
    agg.add_argument("--broker", required=True, metavar="URL",
                     help="mqtt://[user@]host[:port] or mqtts://... (a password in the URL is "
                          "visible in ps: use --password-file or $FLEETLEARN_PASSWORD)")
    agg.add_argument("--client-id", default="aggregator",
                     help="MQTT client id, and user name unless the URL names one")
    agg.add_argument("--password-file", metavar="PATH",
                     help="file with the MQTT password alone, or the credentials.toml of "
                          "`fleetlearn broker config` (its entry for the user name)")
    agg.add_argument("--tls-ca", metavar="PEM", help="CA bundle to verify the broker (mqtts://)")
    agg.add_argument("--tls-cert", metavar="PEM", help="client certificate (PEM)")
    agg.add_argument("--tls-key", metavar="PEM", help="client private key (PEM)")
    agg.add_argument("--config", metavar="aggregator.toml", help="settings file (TOML)")
    for flag, dest, kind, text in _AGG_FLAGS:
        agg.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    agg.add_argument("--quiet", action="store_true", help="no progress lines")
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
    from cloud_aggregator._config import load_config
    from cloud_aggregator._connect import broker_settings
    from cloud_aggregator._metrics import RoundMetrics

    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _AGG_FLAGS}
    overrides["progress"] = not args.quiet
    config = load_config(args.config, **overrides)
    settings = broker_settings(broker=args.broker, client_id=args.client_id,
                               password_file=args.password_file, tls_ca=args.tls_ca,
                               tls_cert=args.tls_cert, tls_key=args.tls_key)
    transport = settings.transport()
    channel = Channel(transport=transport, fleet=config.fleet)

    def progress(m: RoundMetrics) -> None:
        if not config.progress:
            return
        acc = "-" if m.accuracy is None else f"{m.accuracy:.3f}"
        print(f"round {m.round:4d} v{m.model_version:<4d} {m.outcome:9s} acc {acc:>5s} "
              f"devices {m.devices_reported}/{m.devices_selected} "
              f"up {m.bytes_up / 1e6:.2f} MB down {m.bytes_down / 1e6:.2f} MB "
              f"t {m.wall_s:.1f}s emu {m.emulated_total_s:.0f}s", flush=True)

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
    print(f"done: model version {aggregator.model_version} in {aggregator.state_dir}")
    return 0
