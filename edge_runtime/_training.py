"""What every training backend shares: results, the batch schedule, the ``Trainer`` protocol.

``open_trainer`` picks the backend from the artifacts' manifest: the portable backend
(``_portable``, plain ``onnxruntime``, any machine) for format 2, the onnxruntime-training
backend (``_ort_training``) for format 1. Both visit samples in the same order for the
same seed (``batch_schedule``), so their results can be compared step for step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any, NamedTuple, Protocol

import numpy as np

from edge_runtime._errors import ArtifactError
from edge_runtime._manifest import backend_of, read_manifest_file

ParameterShapes = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What one call to ``Trainer.train`` did."""

    samples_seen: int
    """Samples actually trained on (counting repeats over epochs): the FedAvg weight."""
    steps: int
    mean_loss: float
    """Sample-weighted mean training loss over the steps taken (NaN if none)."""
    seconds: float
    stopped_early: bool
    """True when the deadline or ``should_stop`` cut training short."""


class EvalResult(NamedTuple):
    """Mean loss and accuracy (NaN for regression) over the evaluated samples."""

    loss: float
    accuracy: float


class Schedule:
    """Which samples each step trains on: ``epochs`` shuffled passes in mini-batches (each
    epoch's last batch may be short), up to ``total`` steps.

    Epochs are drawn from ``rng`` one after the other as training reaches them, so a task
    of many epochs costs nothing up front: its deadline holds and its memory is a chunk's
    (drawn all at once, 100,000 epochs of 320 samples were 256 MB and many seconds before
    the first step). The steps are the same as drawing every epoch first.
    """

    def __init__(self, n: int, *, batch_size: int, total: int,
                 rng: np.random.Generator) -> None:
        self.n, self.batch_size, self.total = n, batch_size, total
        self.per_epoch = math.ceil(n / batch_size) if n else 0
        self._rng = rng
        self._epochs: dict[int, np.ndarray] = {}
        self._drawn = 0

    def _epoch(self, e: int) -> np.ndarray:
        while self._drawn <= e:
            self._epochs[self._drawn] = self._rng.permutation(self.n).astype(np.int64)
            self._drawn += 1
        if e not in self._epochs:
            raise ValueError(f"epoch {e} was passed already: chunks are asked for in order")
        return self._epochs[e]

    def chunk(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps ``first`` to ``last`` (exclusive) as ``(order, starts, ends)``: step ``s``
        trains on ``order[starts[s - first]:ends[s - first]]``. Chunks are asked for in
        order; epochs before ``first``'s are forgotten."""
        if not 0 <= first < last <= self.total:
            raise ValueError(f"steps {first}..{last} are outside 0..{self.total}")
        e0, e1 = first // self.per_epoch, (last - 1) // self.per_epoch
        for old in [e for e in self._epochs if e < e0]:
            del self._epochs[old]
        order = np.concatenate([self._epoch(e) for e in range(e0, e1 + 1)])
        steps = np.arange(first, last, dtype=np.int64)
        base = (steps // self.per_epoch - e0) * self.n
        pos = (steps % self.per_epoch) * self.batch_size
        return order, base + pos, base + np.minimum(pos + self.batch_size, self.n)

    def batch(self, step: int) -> np.ndarray:
        """The sample indices of one step."""
        order, starts, ends = self.chunk(step, step + 1)
        return order[int(starts[0]):int(ends[0])]

    def _whole(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every step at once (for inspection: it draws every epoch)."""
        if self.total == 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        return self.chunk(0, self.total)

    @property
    def order(self) -> np.ndarray:
        return self._whole()[0]

    @property
    def starts(self) -> np.ndarray:
        return self._whole()[1]

    @property
    def ends(self) -> np.ndarray:
        return self._whole()[2]


def batch_schedule(
    n: int, *, epochs: int, batch_size: int, rng: np.random.Generator, max_steps: int | None
) -> Schedule:
    """``epochs`` shuffled passes in mini-batches (each epoch's last batch may be short),
    at most ``max_steps`` steps; drawn lazily (see ``Schedule``)."""
    if epochs < 0 or batch_size < 1:
        raise ValueError("epochs must be >= 0 and batch_size >= 1")
    per_epoch = math.ceil(n / batch_size) if n else 0
    total = per_epoch * epochs
    if max_steps is not None:
        total = min(total, max(0, int(max_steps)))
    return Schedule(n, batch_size=batch_size, total=total, rng=rng)


class TrainerBase:
    """What both backends share: the layout, the manifest, and the checks and set-up every
    ``set_parameters``, ``train`` and ``evaluate`` starts with."""

    _shapes: ParameterShapes
    _size: int
    _manifest: dict[str, Any] | None

    def set_learning_rate(self, lr: float) -> None:
        raise NotImplementedError

    def _labels_dtype(self, y: np.ndarray) -> type[np.generic]:
        """The dtype labels ``y`` are given to the graphs as."""
        raise NotImplementedError

    def _checked_flat(self, flat: np.ndarray) -> np.ndarray:
        """``flat`` as this model's parameter vector (float32, contiguous; may be ``flat``
        itself), or ``ArtifactError`` when it is of another length or not floating point."""
        values = np.asarray(flat)
        if values.ndim != 1 or values.size != self._size:
            raise ArtifactError(
                f"parameter vector has shape {values.shape}; this model has {self._size} "
                "parameters")
        if not np.issubdtype(values.dtype, np.floating):
            raise ArtifactError(f"parameter vector must be floating point, got {values.dtype}")
        return np.ascontiguousarray(values, dtype=np.float32)

    def _check_xy(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples as contiguous float32 features and labels of the graphs' dtype."""
        xs = np.ascontiguousarray(x, dtype=np.float32)
        ys = np.ascontiguousarray(y, dtype=self._labels_dtype(y))
        if xs.ndim < 1 or len(xs) != len(ys):
            raise ValueError(f"x has {len(xs)} samples, y has {len(ys)}")
        return xs, ys

    def _plan(
        self, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, lr: float | None,
        seed: int | np.random.Generator | None, max_steps: int | None,
    ) -> tuple[np.ndarray, np.ndarray, Schedule]:
        """What ``train`` starts with: the checked samples, the learning rate set (when
        given), and the batch schedule drawn from ``seed``."""
        xs, ys = self._check_xy(x, y)
        if lr is not None:
            self.set_learning_rate(lr)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        plan = batch_schedule(
            len(xs), epochs=epochs, batch_size=batch_size, rng=rng, max_steps=max_steps
        )
        return xs, ys, plan

    def parameter_shapes(self) -> ParameterShapes:
        """Exchanged tensors as ``(name, shape)`` in flat-vector order."""
        return self._shapes

    @property
    def num_parameters(self) -> int:
        """Length of the flat parameter vector."""
        return self._size

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The parsed ``artifacts.json`` (already verified), or None when absent."""
        return self._manifest

    @property
    def input_shape(self) -> tuple[int | str, ...] | None:
        """The model input's shape from the manifest (dims may be names like ``batch``)."""
        if self._manifest is None:
            return None
        return tuple(self._manifest["input"]["shape"])

    @property
    def label_dtype(self) -> str | None:
        """``int64`` (class indices) or ``float32`` (regression targets, BCE's 0/1 rows),
        as the manifest says; None without a manifest (or one that does not say)."""
        label = self._manifest.get("label") if self._manifest is not None else None
        dtype = label.get("dtype") if isinstance(label, dict) else None
        return dtype if dtype in ("int64", "float32") else None

    @property
    def needs_soft_targets(self) -> bool:
        """The loss distils from a teacher: ``train`` needs ``soft_targets``."""
        return False


class Trainer(Protocol):
    """A training backend: one model's artifacts, trained on local arrays."""

    backend: str

    def parameter_shapes(self) -> ParameterShapes: ...

    @property
    def num_parameters(self) -> int: ...

    @property
    def manifest(self) -> dict[str, Any] | None: ...

    @property
    def input_shape(self) -> tuple[int | str, ...] | None: ...

    @property
    def label_dtype(self) -> str | None: ...

    @property
    def needs_soft_targets(self) -> bool: ...

    def get_parameters(self) -> np.ndarray: ...

    def set_parameters(self, flat: np.ndarray) -> None: ...

    @property
    def learning_rate(self) -> float: ...

    def set_learning_rate(self, lr: float) -> None: ...

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float | None = None,
        seed: int | np.random.Generator | None = None,
        deadline_s: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        max_steps: int | None = None,
    ) -> TrainResult: ...

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> EvalResult: ...


def open_trainer(
    artifacts_dir: str | os.PathLike[str],
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    expected_hash: str | None = None,
) -> Trainer:
    """Load artifacts with the backend their manifest names (a folder with no manifest
    is taken as onnxruntime-training artifacts, as older versions wrote them)."""
    directory = Path(artifacts_dir)
    manifest = read_manifest_file(directory)
    if manifest is not None and backend_of(manifest) == "portable":
        from edge_runtime._portable import PortableTrainer

        return PortableTrainer(
            artifacts_dir=directory,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            expected_hash=expected_hash,
            manifest=manifest,
        )
    if manifest is None and (directory / "train.onnx").exists():
        raise ArtifactError(f"{directory} has portable artifacts but no artifacts.json")
    from edge_runtime._ort_training import OrtTrainingTrainer

    return OrtTrainingTrainer(
        artifacts_dir=directory,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        expected_hash=expected_hash,
        manifest=manifest,
    )


def given_or_read(manifest: dict[str, Any] | EllipsisType | None,
                  directory: Path) -> dict[str, Any] | None:
    """A trainer's manifest: the one ``open_trainer`` read and checked (None: the folder
    has none), or, when the trainer is built directly (``...``), the folder's."""
    return read_manifest_file(directory) if manifest is ... else manifest


def checked_rate(lr: float) -> float:
    """A learning rate that is positive and finite, else ValueError."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be positive and finite, got {lr}")
    return float(lr)
