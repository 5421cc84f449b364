"""Importing ONNX Runtime on a device, and torch-free access to its training API.

``import_onnxruntime`` is all the portable backend needs (any ONNX Runtime build). The
rest concerns the optional onnxruntime-training backend:

``import onnxruntime.training`` runs that package's ``__init__``, which imports its
``optim`` subpackage and with it torch. A device has no torch, and the on-device
API (``onnxruntime.training.api``: ``CheckpointState``, ``Module``, ``Optimizer``)
does not need it. The one workaround, kept here and nowhere else on the device side:
register a bare stub package for ``onnxruntime.training`` (same ``__path__``, no
``__init__`` code) so that its submodules import on their own, before onnxruntime
itself is imported (its start-up validation would otherwise import torch).
``cloud_aggregator._ort_artifacts.load_artifacts_module`` holds the same few lines for
the artifact builder (the two packages never import each other).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import threading
import types
from typing import Any, NamedTuple

from edge_runtime._errors import TrainingBackendMissing

ORT_TRAINING_VERSION = "1.19.2"
"""The onnxruntime-training release fleetlearn is built and tested against (the last one)."""

_LOCK = threading.Lock()
_API: TrainingApi | None = None


class TrainingApi(NamedTuple):
    """The three classes of ONNX Runtime's on-device training API."""

    CheckpointState: Any
    Module: Any
    Optimizer: Any


def install_hint() -> str:
    """What to do on this machine to get the onnxruntime-training API."""
    machine = platform.machine().lower()
    portable = ("or rebuild the artifacts with the portable backend (the default of "
                "'fleetlearn artifacts build'), which runs on plain onnxruntime")
    if (sys.platform.startswith("linux") and machine in ("aarch64", "arm64")) or (
        sys.version_info >= (3, 13)
    ):
        return (
            f"onnxruntime-training-cpu {ORT_TRAINING_VERSION} (its last release) has no wheel for "
            f"{machine} / Python {sys.version_info.major}.{sys.version_info.minor}: {portable}"
        )
    return (f"replace onnxruntime with onnxruntime-training-cpu=={ORT_TRAINING_VERSION} "
            f"(pip uninstall -y onnxruntime; pip install onnxruntime-training-cpu=="
            f"{ORT_TRAINING_VERSION}), {portable}")


def import_onnxruntime() -> types.ModuleType:
    """``import onnxruntime`` (any build), quiet, without pulling in torch."""
    # The stub must be in place BEFORE ``import onnxruntime``: importing onnxruntime runs
    # its validation module, which imports ``onnxruntime.training.ortmodule`` and through
    # it torch whenever torch happens to be installed (1.5 s and 200 MB for nothing).
    if "onnxruntime" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is not None and spec.submodule_search_locations:
            install_training_stub(os.path.join(spec.submodule_search_locations[0], "training"))
            sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]
    try:
        import onnxruntime
    except ImportError as exc:
        raise TrainingBackendMissing(
            f"onnxruntime is not installed ({exc}): pip install onnxruntime"
        ) from exc
    # ORT logs every graph transformation at start-up; a device agent keeps errors only.
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def install_training_stub(training_dir: str) -> None:
    """Register ``onnxruntime.training`` as an empty package so its ``__init__`` (torch) never runs.

    Does nothing when the real package (or the stub) is already imported.
    """
    if "onnxruntime.training" in sys.modules:
        return
    stub = types.ModuleType("onnxruntime.training")
    stub.__path__ = [training_dir]
    stub.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = stub


def load_training_api() -> TrainingApi:
    """Import ``CheckpointState``, ``Module`` and ``Optimizer`` without importing torch.

    Raises :class:`TrainingBackendMissing`, saying how to install it, when onnxruntime
    or its training API is absent (a plain ``onnxruntime`` inference build, say).
    """
    global _API
    with _LOCK:
        if _API is not None:
            return _API
        installed_stub = "onnxruntime.training" not in sys.modules
        onnxruntime = import_onnxruntime()
        install_training_stub(os.path.join(onnxruntime.__path__[0], "training"))
        try:
            from onnxruntime.training.api import CheckpointState, Module, Optimizer
        except ImportError as exc:
            if installed_stub:
                sys.modules.pop("onnxruntime.training", None)
            raise TrainingBackendMissing(
                f"onnxruntime {getattr(onnxruntime, '__version__', '?')} has no training API "
                f"({exc}); {install_hint()}"
            ) from exc
        _API = TrainingApi(CheckpointState, Module, Optimizer)
        return _API


def session_options(*, intra_op_threads: int, inter_op_threads: int) -> Any:
    """Session options that keep ORT to the given thread counts (0 lets ORT choose)."""
    onnxruntime = import_onnxruntime()
    if intra_op_threads < 0 or inter_op_threads < 0:
        raise ValueError("thread counts must be >= 0 (0 lets ONNX Runtime choose)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    return options
