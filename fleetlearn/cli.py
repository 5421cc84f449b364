"""Entry point of the ``fleetlearn`` console script."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from device_profiles import FleetlearnError
from fleetlearn import _probe

# Each package's ``_cli`` module exposes ``register(subparsers)``. A package whose
# optional dependencies are not installed (a device without the cloud extra) still
# registers: its handlers import what they need and fail with a clear message.
_PACKAGES = ("fleetlearn", "broker_bridge", "edge_runtime", "cloud_aggregator", "device_profiles")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetlearn",
        description="Federated learning for edge-device fleets over MQTT.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _PACKAGES:
        module = importlib.import_module(f"{name}._cli")
        module.register(sub)
    _compose(sub)
    return parser


def _compose(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Wire what crosses packages: ``profile`` measures real training steps, which
    needs the agent's probe (edge_runtime) and, on a fresh machine, reference
    artifacts only the cloud side can build (cloud_aggregator)."""
    profile = sub.choices.get("profile")
    if profile is None:
        return
    _probe.add_arguments(profile)
    profile.set_defaults(handler=_probe.with_reference_artifacts(profile.get_default("handler")))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(int(args.verbose), 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
    except FleetlearnError as exc:
        print(f"fleetlearn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fleetlearn: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
