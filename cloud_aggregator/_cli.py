"""Subcommands owned by this package (registered by ``fleetlearn.cli``).

Only argparse here: handlers import onnx and onnxruntime when they run, so the
``fleetlearn`` command starts fast and works on a device without the cloud extra.
"""

from __future__ import annotations

import argparse
from typing import Any

_LOSSES = ("cross_entropy", "mse")
_OPTIMIZERS = ("sgd", "adamw")


def register(sub: Any) -> None:
    """Add ``fleetlearn artifacts build|reference`` to the ``fleetlearn`` parser."""
    artifacts = sub.add_parser(
        "artifacts", help="build ONNX Runtime training artifacts for a fleet's devices"
    )
    actions = artifacts.add_subparsers(dest="artifacts_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="turn your ONNX model into training artifacts")
    build.add_argument("model", metavar="MODEL.onnx", help="the model to train (IR version <= 10)")
    build.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    _common(build)
    build.add_argument(
        "--frozen", nargs="+", default=[], metavar="NAME", help="parameters to keep fixed"
    )
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
    parser.add_argument("--loss", choices=_LOSSES, default="cross_entropy")
    parser.add_argument("--optimizer", choices=_OPTIMIZERS, default="sgd")


def _report(info: Any) -> int:
    print(f"wrote training artifacts to {info.directory}")
    print(
        f"  parameters: {info.num_parameters} in {len(info.parameters)} tensors"
        + (f" ({len(info.frozen)} frozen)" if info.frozen else "")
    )
    print(f"  input: {info.input_name} {list(info.input_shape)}")
    print(f"  loss: {info.loss}, optimizer: {info.optimizer}")
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
        args.model, args.out, loss=args.loss, optimizer=args.optimizer, frozen=args.frozen
    )
    return _report(info)


def _reference(args: argparse.Namespace) -> int:
    build_artifacts, build_reference_model = _builders()
    model = build_reference_model(args.name, args.seed)
    info = build_artifacts(model, args.out, loss=args.loss, optimizer=args.optimizer)
    return _report(info)
