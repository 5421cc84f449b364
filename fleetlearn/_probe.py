"""Reference artifacts for ``fleetlearn profile``'s training-throughput probe.

The device agent's probe (``edge_runtime._cli``) times real ONNX Runtime training
steps, but only for reference models whose artifacts already sit in
``$FLEETLEARN_CACHE_DIR/reference-artifacts/<model>/``: building them needs the
cloud extra (``onnx``), which a device does not install. This module, part of the
composition root, builds the missing ones with the aggregator's artifact builder
when the cloud extra is there, so ``fleetlearn profile`` measures real step times
on a fresh machine; without it, the probe measures what is cached and the user is
told which models were left out and why.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from device_profiles import FleetlearnError

log = logging.getLogger(__name__)

PROBE_MODELS: tuple[str, ...] = ("mlp", "cnn", "mlp-xl")
"""The reference models the probe measures (the cost model knows their FLOPs)."""

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True, kw_only=True)
class ReferenceArtifacts:
    """Which reference models have artifacts under ``root``, and what was done for it."""

    root: Path
    cached: tuple[str, ...]
    built: tuple[str, ...]
    missing: tuple[str, ...]
    reason: str = ""
    """Why ``missing`` could not be built (empty when nothing is missing)."""

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(m for m in PROBE_MODELS if m in self.cached or m in self.built)


def reference_root() -> Path:
    """Where the probe looks: ``$FLEETLEARN_CACHE_DIR/reference-artifacts``."""
    from edge_runtime._cli import REFERENCE_ARTIFACTS
    from edge_runtime._datasets import default_cache_dir

    return default_cache_dir() / REFERENCE_ARTIFACTS


def cloud_extra_installed() -> bool:
    """Whether the aggregator's artifact builder can run here (it needs ``onnx``)."""
    return importlib.util.find_spec("onnx") is not None


def ensure_reference_artifacts(
    root: Path | None = None,
    *,
    models: Sequence[str] = PROBE_MODELS,
    build: bool = True,
) -> ReferenceArtifacts:
    """Build the missing reference artifacts under ``root`` when the cloud extra allows.

    Artifacts already there are kept (the probe only needs them to exist); each model
    is built with seed 0, as the aggregator builds it, and written atomically.
    """
    root = reference_root() if root is None else root
    cached = tuple(m for m in models if _portable(root / m))
    todo = [m for m in models if m not in cached]
    if not todo:
        return ReferenceArtifacts(root=root, cached=cached, built=(), missing=())
    if not build:
        return ReferenceArtifacts(root=root, cached=cached, built=(), missing=tuple(todo),
                                  reason="building was turned off (--no-build)")
    if not cloud_extra_installed():
        return ReferenceArtifacts(
            root=root, cached=cached, built=(), missing=tuple(todo),
            reason="the cloud extra is not installed (pip install 'fleetlearn[cloud]')")
    from cloud_aggregator import build_artifacts, build_reference_model

    built: list[str] = []
    failed: list[str] = []
    errors: list[str] = []
    for name in todo:
        try:
            build_artifacts(build_reference_model(name, 0), root / name)
        except (FleetlearnError, OSError) as exc:
            log.warning("cannot build reference artifacts for %s: %s", name, exc)
            failed.append(name)
            errors.append(f"{name}: {exc}")
        else:
            built.append(name)
    return ReferenceArtifacts(root=root, cached=cached, built=tuple(built),
                              missing=tuple(failed), reason="; ".join(errors))


def _portable(directory: Path) -> bool:
    """A cached, well-formed manifest of the portable backend (older versions cached the
    onnxruntime-training artifacts, which plain onnxruntime cannot run: rebuilt)."""
    from edge_runtime._errors import ArtifactError
    from edge_runtime._manifest import backend_of, read_manifest_file

    try:
        manifest = read_manifest_file(directory)
    except ArtifactError:
        return False
    return manifest is not None and backend_of(manifest) == "portable"


def describe(refs: ReferenceArtifacts) -> list[str]:
    """Human lines for stderr: what the probe will measure and what it cannot."""
    lines: list[str] = []
    if refs.built:
        lines.append(f"built reference artifacts for {', '.join(refs.built)} in {refs.root}")
    if refs.missing:
        have = ", ".join(refs.available) or "none"
        lines.append(
            f"no training step times for {', '.join(refs.missing)}: {refs.reason}; "
            f"measuring the cached reference models only ({have})")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The composition root's flag on ``fleetlearn profile``."""
    parser.add_argument(
        "--no-build", dest="no_build", action="store_true",
        help="do not build missing reference artifacts; measure only the cached ones")


def with_reference_artifacts(handler: Handler) -> Handler:
    """Wrap the ``profile`` handler: make the probe's artifacts exist, then measure."""

    def run(args: argparse.Namespace) -> int:
        if not getattr(args, "catalogue", False):
            refs = ensure_reference_artifacts(build=not getattr(args, "no_build", False))
            for line in describe(refs):
                print(f"fleetlearn profile: {line}", file=sys.stderr)
        return handler(args)

    return run
