"""What the aggregator checks before it serves a fleet: is this state dir this run?

A wrong start must be a clear error at start-up, never a silent wrong run or a crash
on every restart. Checked here, in this order:

- the *run record* (state blob ``run``): a random run id, the secret task nonces are
  derived from, and the identity of the model being trained (a reference model's name,
  or the sha256 of the user's ``.onnx``). ``--model cnn`` on a state dir holding an
  ``mlp`` run is refused, and so is an artifacts folder built from another model;
- a database with no run while the state dir holds checkpoints past version 0 or
  metrics lines: ``aggregator.sqlite`` was emptied or replaced, and starting over at
  version 0 would orphan that run (refused, with what to do);
- temporary files a killed checkpoint write left behind (removed);
- the evaluation data, scored once with the initial model, and its labels against the
  model's classes (a wrong feature count fails here, not after the first round).

Task nonces (``task_nonce``) are an HMAC of (fleet, task round, device) under the
run's secret: the same after a restart (a re-sent task carries the same nonce), and
unknowable to anyone who does not hold the store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge import Layout, atomic_write
from cloud_aggregator._artifacts import (
    MANIFEST_NAME,
    ArtifactInfo,
    build_artifacts,
    initial_parameters,
    read_manifest,
)
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._retention import CHECKPOINT_FILE
from cloud_aggregator._store import Store, StoreError
from device_profiles import ConfigError

log = logging.getLogger(__name__)

RUN_BLOB = "run"
SOURCE_FILE = "source.json"
_RUN_FORMAT = "fleetlearn-run/1"


@dataclass(frozen=True, kw_only=True)
class ModelArtifacts:
    """The model being trained: its artifacts, layout and initial weights."""

    info: ArtifactInfo
    layout: Layout
    initial: np.ndarray

    @property
    def directory(self) -> Path:
        return self.info.directory


def model_identity(config: AggregatorConfig) -> str:
    """``reference:<name>``, or ``onnx:<sha256>`` of the user's model file."""
    if config.is_reference_model:
        return f"reference:{config.model}"
    try:
        digest = hashlib.sha256(Path(config.model).read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read model {config.model}: {exc}") from exc
    return f"onnx:{digest}"


def _describe(identity: str) -> str:
    kind, _, value = identity.partition(":")
    if kind == "reference":
        return f"the reference model {value!r}"
    return f"an ONNX model ({value[:12]}...)"


def prepare_artifacts(config: AggregatorConfig, directory: Path, *,
                      identity: str | None = None) -> ModelArtifacts:
    """Reuse the artifacts in ``directory`` (a resumed run) or build them there.

    Artifacts this function built record the model they came from (``source.json``);
    reusing them for another model is a ``ConfigError``.
    """
    identity = identity or model_identity(config)
    source = directory / SOURCE_FILE
    if (directory / MANIFEST_NAME).exists():
        recorded = _read_source(source)
        if recorded is not None and recorded != identity:
            raise ConfigError(
                f"{directory} holds artifacts of {_describe(recorded)}, not of "
                f"{_describe(identity)}: use another state dir (or the model of that run)")
    else:
        if config.is_reference_model:
            from cloud_aggregator._models import build_reference_model

            build_artifacts(build_reference_model(config.model, config.seed), directory,
                            backend=config.backend)
        else:
            build_artifacts(config.model, directory, backend=config.backend)
        atomic_write(source, json.dumps({"model": identity}).encode())
    info = read_manifest(directory)
    if info.backend != config.backend:
        raise ConfigError(
            f"{directory} holds {info.backend} artifacts, and this run asks for {config.backend}: "
            "use another state dir, or the backend of that run")
    layout = Layout(tensors=tuple((name, tuple(shape)) for name, shape in info.parameters))
    return ModelArtifacts(info=info, layout=layout,
                          initial=np.asarray(initial_parameters(directory), np.float32))


def _read_source(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); remove it to rebuild") from exc
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """Who this state dir belongs to: one run of one model."""

    run_id: str
    secret: bytes
    model: str

    def to_bytes(self) -> bytes:
        return json.dumps({"format": _RUN_FORMAT, "run_id": self.run_id,
                           "secret": self.secret.hex(), "model": self.model},
                          sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RunRecord:
        try:
            data = json.loads(raw)
            if data.get("format") != _RUN_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return cls(run_id=str(data["run_id"]), secret=bytes.fromhex(data["secret"]),
                       model=str(data["model"]))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise StoreError(f"the run record in the aggregator store is unreadable: {exc}") \
                from exc

    @classmethod
    def new(cls, model: str) -> RunRecord:
        return cls(run_id=secrets.token_hex(8), secret=secrets.token_bytes(32), model=model)


def check_state_dir(store: Store, *, config: AggregatorConfig, identity: str,
                    metrics_path: Path) -> RunRecord | None:
    """The run this state dir holds (None for a fresh one); ConfigError/StoreError when
    it holds another model's run, or a run whose database is gone."""
    raw = store.get_state(RUN_BLOB)
    if raw is not None:
        run = RunRecord.from_bytes(raw)
        if run.model != identity:
            raise ConfigError(
                f"the state dir holds a run of {_describe(run.model)}; --model "
                f"{config.model} asks for {_describe(identity)}. Use another --state-dir "
                "to start a new run, or the same model to resume this one")
        return run
    if store.checkpoint(config.fleet) is not None:
        return None  # written before run records existed: adopted in _restore
    versions = sorted(int(m["version"]) for p in store.checkpoint_dir.glob("*.npy")
                      if (m := CHECKPOINT_FILE.fullmatch(p.name)) is not None)
    lines = _count_lines(metrics_path)
    if (versions and versions[-1] > 0) or lines:
        found = ", ".join(filter(None, (
            f"checkpoints up to version {versions[-1]} in {store.checkpoint_dir}"
            if versions else "", f"{lines} metrics lines in {metrics_path}" if lines else "")))
        raise StoreError(
            f"{store.path} records no run, but the state dir holds {found}: the database "
            "was emptied or replaced. Restore aggregator.sqlite from a backup, or move those "
            "files away to start a new run (starting over would orphan them)")
    return None


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


def clean_stale_temp_files(directory: Path) -> int:
    """Remove what a killed atomic write left in ``directory`` (``.NAME.*.tmp``)."""
    removed = 0
    try:
        leftovers = [p for p in directory.iterdir()
                     if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()]
    except FileNotFoundError:
        return 0
    for path in leftovers:
        try:
            path.unlink()
            removed += 1
        except OSError as exc:
            log.warning("cannot remove stale temporary file %s: %s", path, exc)
    if removed:
        log.info("removed %d temporary files of interrupted writes in %s", removed, directory)
    return removed


def task_nonce(secret: bytes, *, fleet: str, task_round: int, device: str) -> str:
    """The nonce of the task ``task_round`` sent to ``device`` (stable across restarts)."""
    message = f"task/{fleet}/{task_round}/{device}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def output_classes(model_path: Path, *, loss: str) -> int | None:
    """How many classes a classification model outputs (its output's last axis)."""
    if loss != "cross_entropy":
        return None
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        shape = session.get_outputs()[0].shape
    except Exception as exc:  # a model ORT cannot load fails elsewhere, with its own error
        log.debug("cannot read the output shape of %s: %s", model_path, exc)
        return None
    last = shape[-1] if shape else None
    return last if isinstance(last, int) and last > 0 else None


def check_eval_data(evaluate: Any, params: np.ndarray, *, y: np.ndarray,
                    num_classes: int | None, path: Path) -> None:
    """Score the eval data once now: a wrong feature count or label range is a
    ConfigError at start-up, not a crash after the first round."""
    if num_classes is not None and len(y):
        low, high = int(np.min(y)), int(np.max(y))
        if low < 0 or high >= num_classes:
            raise ConfigError(f"eval data {path}: labels range over [{low}, {high}]; the model "
                              f"has {num_classes} classes")
    try:
        evaluate(params)
    except AggregatorError as exc:
        raise ConfigError(f"eval data {path} does not fit the model: {exc}") from exc
