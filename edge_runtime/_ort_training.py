"""The onnxruntime-training backend: ORT's ``CheckpointState``/``Module``/``Optimizer``.

Kept for artifacts built with ``--backend ort-training`` (manifest format 1) on
machines where the ``onnxruntime-training-cpu`` wheel exists (x86_64, Python <= 3.12);
the portable backend (``_portable``) is the default and runs everywhere.

A device exchanges one flat float32 vector with the fleet: the trainable parameters
in the order of ``Module.get_contiguous_parameters(trainable_only=True)``. That order
is the graph order of the parameters and differs from the (alphabetical) order in
which ``CheckpointState.parameters`` iterates, so the trainer measures it at load time
(each parameter filled with its own marker value, then read back through the flat
buffer) instead of assuming it, and checks it against ``artifacts.json`` when present.

Artifacts are four files: ``training_model.onnx``, ``eval_model.onnx``,
``optimizer_model.onnx`` and ``checkpoint``. Both graphs take ``(input, labels)`` and
output ``(loss, model output)``; the second output gives accuracy. With
``artifacts.json`` (written by the aggregator's artifact builder) every file's sha256
is checked and its combined content hash can be pinned by the task.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import EllipsisType
from typing import Any

import numpy as np

from edge_runtime._errors import ArtifactError
from edge_runtime._manifest import (
    FORMAT_ORT_TRAINING,
    MANIFEST_NAME,
    ORT_TRAINING_FILES,
    verify_files,
)
from edge_runtime._ort import load_training_api, session_options
from edge_runtime._training import (
    EvalResult,
    ParameterShapes,
    TrainerBase,
    TrainResult,
    checked_rate,
    given_or_read,
)


class OrtTrainingTrainer(TrainerBase):
    """Trains onnxruntime-training artifacts on local arrays; exchanges flat parameters."""

    backend = "ort-training"

    def __init__(
        self,
        *,
        artifacts_dir: str | os.PathLike[str],
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        expected_hash: str | None = None,
        manifest: dict[str, Any] | EllipsisType | None = ...,
    ) -> None:
        """``manifest``: the folder's, already read and checked (``open_trainer`` passes
        it; None when there is none); by default it is read here."""
        self._dir = Path(artifacts_dir)
        missing = [name for name in ORT_TRAINING_FILES if not (self._dir / name).is_file()]
        if missing:
            raise ArtifactError(f"training artifacts missing in {self._dir}: {', '.join(missing)}")
        self._manifest = given_or_read(manifest, self._dir)
        if self._manifest is not None and self._manifest["format"] != FORMAT_ORT_TRAINING:
            raise ArtifactError(f"artifacts in {self._dir} are not onnxruntime-training artifacts")
        verify_files(self._dir, self._manifest, expected_hash)
        api = load_training_api()
        options = session_options(
            intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads
        )
        try:
            self._state = api.CheckpointState.load_checkpoint(str(self._dir / "checkpoint"))
            self._module = api.Module(
                str(self._dir / "training_model.onnx"),
                self._state,
                str(self._dir / "eval_model.onnx"),
                session_options=options,
            )
            self._optimizer = api.Optimizer(str(self._dir / "optimizer_model.onnx"), self._module)
        except Exception as exc:  # ORT raises Fail / InvalidProtobuf / RuntimeError
            raise ArtifactError(
                f"ONNX Runtime cannot load artifacts in {self._dir}: {exc}"
            ) from exc
        self._shapes = self._measure_layout()
        self._size = sum(math.prod(shape) for _, shape in self._shapes)
        self._check_manifest_layout()
        loss = self._manifest.get("loss") if self._manifest else None
        self._classification: bool | None = None if loss is None else loss == "cross_entropy"

    # -- artifacts ---------------------------------------------------------------------------

    def _measure_layout(self) -> ParameterShapes:
        """Find the order of the flat buffer by filling each parameter with a marker value."""
        params = [(name, p) for name, p in self._state.parameters if p.requires_grad]
        if not params:
            raise ArtifactError(f"artifacts in {self._dir} have no trainable parameters")
        if len(params) >= 1 << 24:
            raise ArtifactError("too many parameter tensors to lay out")
        saved = {name: np.array(p.data, dtype=np.float32, copy=True) for name, p in params}
        names = [name for name, _ in params]
        try:
            for marker, name in enumerate(names, start=1):
                self._state.parameters[name] = np.full(saved[name].shape, marker, np.float32)
            flat = self._flat()
        finally:
            for name in names:
                self._state.parameters[name] = saved[name]
        order: list[tuple[str, tuple[int, ...]]] = []
        pos = 0
        while pos < flat.size:
            marker = int(flat[pos])
            if not 1 <= marker <= len(names):
                raise ArtifactError(f"cannot lay out parameters of {self._dir}")
            name = names[marker - 1]
            shape = tuple(int(d) for d in saved[name].shape)
            order.append((name, shape))
            pos += max(1, math.prod(shape))
        if sorted(n for n, _ in order) != sorted(names) or pos != flat.size:
            raise ArtifactError(
                f"flat parameter buffer of {self._dir} does not match its checkpoint"
            )
        return tuple(order)

    def _check_manifest_layout(self) -> None:
        if self._manifest is None:
            return
        try:
            listed = tuple(
                (str(p["name"]), tuple(int(d) for d in p["shape"]))
                for p in self._manifest["parameters"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed parameter list in {MANIFEST_NAME}: {exc!r}") from exc
        if listed != self._shapes:
            raise ArtifactError(
                f"{MANIFEST_NAME} lists parameters {[n for n, _ in listed]}, "
                f"the artifacts lay them out as {[n for n, _ in self._shapes]}"
            )

    # -- parameters --------------------------------------------------------------------------

    def _flat(self) -> np.ndarray:
        buffer = self._module.get_contiguous_parameters(trainable_only=True)
        return np.array(buffer.numpy(), dtype=np.float32, copy=True)

    def get_parameters(self) -> np.ndarray:
        """The current trainable parameters as a fresh flat float32 vector."""
        return self._flat()

    def set_parameters(self, flat: np.ndarray) -> None:
        """Load a flat vector (e.g. the global model) into the trainable parameters."""
        from onnxruntime import OrtValue

        values = self._checked_flat(flat)
        self._module.copy_buffer_to_parameters(
            OrtValue.ortvalue_from_numpy(values)._ortvalue, trainable_only=True
        )

    @property
    def learning_rate(self) -> float:
        """The optimizer's current learning rate."""
        return float(self._optimizer.get_learning_rate())

    def set_learning_rate(self, lr: float) -> None:
        """Set the optimizer's learning rate (must be positive and finite)."""
        self._optimizer.set_learning_rate(checked_rate(lr))

    # -- training ----------------------------------------------------------------------------

    def _labels_dtype(self, y: np.ndarray) -> type[np.generic]:
        classification = self._classification
        if classification is None:
            classification = bool(np.issubdtype(np.asarray(y).dtype, np.integer))
        return np.int64 if classification else np.float32

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
    ) -> TrainResult:
        """Run ``epochs`` passes over shuffled mini-batches (the last one may be short).

        ``deadline_s`` is a budget in seconds from this call; it and ``should_stop`` are
        checked before every batch, so a cancelled round stops within one step and
        ``samples_seen`` is the number really trained on. ``max_steps`` caps the steps.
        """
        xs, ys, plan = self._plan(x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                  max_steps=max_steps)
        start = time.monotonic()
        deadline = None if deadline_s is None else start + deadline_s
        samples = steps = 0
        loss_sum = 0.0
        stopped = False
        self._module.train()
        for step in range(plan.total):
            if (deadline is not None and time.monotonic() >= deadline) or (
                should_stop is not None and should_stop()
            ):
                stopped = True
                break
            index = plan.batch(step)
            bx = np.ascontiguousarray(xs[index])
            by = np.ascontiguousarray(ys[index])
            self._module.lazy_reset_grad()
            outputs = self._module(bx, by)
            self._optimizer.step()
            loss = outputs[0] if isinstance(outputs, tuple) else outputs
            loss_sum += float(loss) * len(index)
            samples += len(index)
            steps += 1
        return TrainResult(
            samples_seen=samples,
            steps=steps,
            mean_loss=loss_sum / samples if samples else math.nan,
            seconds=time.monotonic() - start,
            stopped_early=stopped,
        )

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> EvalResult:
        """Mean loss and accuracy of the current parameters on ``(x, y)``; no update."""
        xs, ys = self._check_xy(x, y)
        if len(xs) == 0:
            return EvalResult(math.nan, math.nan)
        classification = ys.dtype == np.int64
        loss_sum = 0.0
        correct = 0
        self._module.eval()
        try:
            for first in range(0, len(xs), batch_size):
                bx = np.ascontiguousarray(xs[first : first + batch_size])
                by = np.ascontiguousarray(ys[first : first + batch_size])
                outputs = self._module(bx, by)
                if not isinstance(outputs, tuple) or len(outputs) < 2:
                    raise ArtifactError(
                        "eval graph does not output the model's logits; rebuild the artifacts "
                        "with fleetlearn (it adds them)"
                    )
                loss_sum += float(outputs[0]) * len(bx)
                if classification:
                    correct += int(np.count_nonzero(outputs[1].argmax(axis=-1) == by))
        finally:
            self._module.train()
        accuracy = correct / len(xs) if classification else math.nan
        return EvalResult(loss_sum / len(xs), accuracy)
