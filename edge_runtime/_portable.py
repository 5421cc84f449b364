"""The portable training backend: compiled training graphs run by plain ``onnxruntime``.

The artifacts (manifest format 2, built by the aggregator's compiler) hold a training
graph made of standard ONNX operators whose one ``Loop`` runs many mini-batch steps
per ``run()``, and an eval graph. No training build of ONNX Runtime is needed: any
build that runs inference runs these, on x86_64 and aarch64, Python 3.11 to 3.13.

Between calls the parameters and the optimizer state stay inside ONNX Runtime as
``OrtValue`` s (each run's outputs are the next run's inputs, never copied through
numpy); the local data is wrapped once per ``train`` call. A call runs the schedule in
chunks sized to about ``CHUNK_S`` seconds (the first chunk is one step, to measure),
so a deadline or a cancelled round stops training between chunks, and the number of
samples really trained on is exact.

The optimizer state (momentum, Adam's moments) starts at zero whenever a new global
model is loaded with ``set_parameters``, and carries across ``train`` calls in between.
With FedProx the weights given to ``set_parameters`` are the proximal anchor.

The manifest is checked whole, against the graphs, before anything is allocated or run
(``_portable_manifest``): a broken one is an ``ArtifactError`` at load.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import EllipsisType
from typing import Any

import numpy as np

from edge_runtime._errors import ArtifactError
from edge_runtime._manifest import FORMAT_PORTABLE, verify_files
from edge_runtime._ort import import_onnxruntime, session_options
from edge_runtime._portable_manifest import check_graphs, read_f32, read_portable
from edge_runtime._training import (
    EvalResult,
    ParameterShapes,
    TrainerBase,
    TrainResult,
    checked_rate,
    given_or_read,
)

CHUNK_S = 0.25
"""Target duration of one ``run()`` of the training graph."""
MAX_CHUNK_STEPS = 1 << 16


class PortableTrainer(TrainerBase):
    """Trains format-2 (portable) artifacts with an ONNX Runtime inference session."""

    backend = "portable"

    # What set_parameters (re)sets: the tensors a training run feeds and gets back.
    _params: list[Any]
    _state: list[Any]
    _step: Any
    _anchor_values: dict[str, Any]

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
        it); by default it is read here. Its files are verified here either way."""
        self._dir = Path(artifacts_dir)
        manifest = given_or_read(manifest, self._dir)
        if manifest is None:
            raise ArtifactError(f"no artifacts.json in {self._dir}")
        if manifest["format"] != FORMAT_PORTABLE:
            raise ArtifactError(f"artifacts in {self._dir} are not portable artifacts")
        verify_files(self._dir, manifest, expected_hash)
        self._manifest = manifest
        spec = read_portable(manifest, self._dir)
        self._spec = spec
        self._shapes = spec.shapes
        self._frozen_shapes = spec.frozen_shapes
        self._label_dtype: type[np.generic] = (
            np.int64 if spec.label_dtype == "int64" else np.float32)
        self._metric = spec.metric
        self._size = spec.size
        self._ort = import_onnxruntime()
        options = session_options(
            intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads
        )
        self._train = self._session(spec.train_file, options)
        self._eval = self._session(spec.eval_file, options)
        check_graphs(spec, self._train, self._eval, self._dir)
        initial = read_f32(self._dir / spec.initial_file, self._size)
        frozen = None
        if spec.frozen_file is not None:
            frozen = read_f32(self._dir / spec.frozen_file, spec.frozen_size)
        self._frozen: dict[str, Any] = {}
        if frozen is not None:
            for (name, _), part in zip(
                self._frozen_shapes, self._split(frozen, self._frozen_shapes), strict=True
            ):
                self._frozen[name] = self._value(part)
        self._lr = 0.01
        self.set_parameters(initial)

    # -- loading -----------------------------------------------------------------------------

    def _session(self, name: str, options: Any) -> Any:
        try:
            return self._ort.InferenceSession(
                str(self._dir / name), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises Fail, InvalidGraph, NotImplemented...
            raise ArtifactError(
                f"ONNX Runtime {self._ort.__version__} cannot load {self._dir / name}: {exc}"
            ) from exc

    def _value(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))

    @staticmethod
    def _split(flat: np.ndarray, shapes: ParameterShapes) -> list[np.ndarray]:
        """Views of ``flat``, one per tensor of ``shapes``, reshaped."""
        parts, pos = [], 0
        for _, shape in shapes:
            size = math.prod(shape)
            parts.append(flat[pos : pos + size].reshape(shape))
            pos += size
        return parts

    @property
    def needs_soft_targets(self) -> bool:
        return self._spec.soft_targets is not None

    # -- parameters --------------------------------------------------------------------------

    def get_parameters(self) -> np.ndarray:
        """The current exchanged parameters as a fresh flat float32 vector."""
        return np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in self._params])

    def set_parameters(self, flat: np.ndarray) -> None:
        """Load a flat vector (the global model); resets the optimizer state."""
        values = self._checked_flat(flat).copy()  # a private copy the OrtValues point into
        parts = self._split(values, self._shapes)
        self._params = [self._value(p) for p in parts]  # each keeps its view of values alive
        self._state = [self._value(np.zeros(shape, np.float32))
                       for _, _, shape in self._spec.state_io]
        self._step = self._value(np.zeros((), np.float32))
        by_name = {name: part for (name, _), part in zip(self._shapes, parts, strict=True)}
        self._anchor_values = {a: self._value(by_name[p]) for a, p in self._spec.anchors}

    @property
    def learning_rate(self) -> float:
        return self._lr

    def set_learning_rate(self, lr: float) -> None:
        self._lr = checked_rate(lr)

    # -- training ----------------------------------------------------------------------------

    def _labels_dtype(self, y: np.ndarray) -> type[np.generic]:
        return self._label_dtype

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
        sample_weight: np.ndarray | None = None,
        soft_targets: np.ndarray | None = None,
    ) -> TrainResult:
        """Run ``epochs`` shuffled passes in mini-batches (each epoch's last one may be short).

        ``deadline_s`` (a budget from this call) and ``should_stop`` are checked between
        chunks of steps; ``max_steps`` caps the steps. ``sample_weight`` weights each
        sample's loss (default: all 1); ``soft_targets`` are a teacher's logits when the
        loss has a distillation term.
        """
        xs, ys, plan = self._plan(x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                  max_steps=max_steps)
        spec = self._spec
        io = spec.train
        fixed = {
            io["x"]: self._value(xs),
            io["y"]: self._value(ys),
            io["sample_weight"]: self._value(self._weights(sample_weight, len(xs))),
            io["lr"]: self._value(np.array(self._lr, np.float32)),
            **self._frozen,
            **self._anchor_values,
        }
        if spec.soft_targets is not None:
            if soft_targets is None or len(soft_targets) != len(xs):
                raise ValueError("this loss distils: pass soft_targets (one row per sample)")
            fixed[spec.soft_targets] = self._value(np.asarray(soft_targets, np.float32))
        outputs = spec.train_outputs()
        start = time.monotonic()
        deadline = None if deadline_s is None else start + deadline_s
        total = plan.total
        done = samples = 0
        loss_sum = 0.0
        stopped = False
        per_step: float | None = None
        while done < total:
            now = time.monotonic()
            if (deadline is not None and now >= deadline) or (
                should_stop is not None and should_stop()
            ):
                stopped = True
                break
            if per_step is None:
                chunk = 1
            else:
                chunk = int(CHUNK_S / max(per_step, 1e-7))
                if deadline is not None:
                    chunk = min(chunk, int((deadline - now) / max(per_step, 1e-7)))
                chunk = max(1, min(chunk, MAX_CHUNK_STEPS))
            chunk = min(chunk, total - done)
            feeds = dict(fixed)
            order, starts, ends = plan.chunk(done, done + chunk)
            feeds[io["order"]] = self._value(order)
            feeds[io["starts"]] = self._value(starts)
            feeds[io["ends"]] = self._value(ends)
            feeds[io["step"]] = self._step
            feeds.update({i: v for (i, _), v in zip(spec.param_io, self._params, strict=True)})
            feeds.update({i: v for (i, _, _), v in zip(spec.state_io, self._state, strict=True)})
            began = time.monotonic()
            try:
                result = self._train.run_with_ort_values(outputs, feeds)
            except Exception as exc:  # ORT's own failures (bad shapes, out of memory)
                raise RuntimeError(f"ONNX Runtime training step failed: {exc}") from exc
            elapsed = time.monotonic() - began
            per_step = elapsed / chunk
            n_params, n_state = len(self._params), len(self._state)
            self._params = list(result[:n_params])
            self._state = list(result[n_params : n_params + n_state])
            self._step = result[n_params + n_state]
            loss_part, _, seen = (float(v.numpy()) for v in result[n_params + n_state + 1 :])
            loss_sum += loss_part
            samples += round(seen)
            done += chunk
        return TrainResult(
            samples_seen=samples,
            steps=done,
            mean_loss=loss_sum / samples if samples else math.nan,
            seconds=time.monotonic() - start,
            stopped_early=stopped,
        )

    @staticmethod
    def _weights(sample_weight: np.ndarray | None, n: int) -> np.ndarray:
        if sample_weight is None:
            return np.ones(n, np.float32)
        weights = np.ascontiguousarray(sample_weight, dtype=np.float32)
        if weights.shape != (n,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("sample_weight must be one finite, non-negative value per sample")
        return weights

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> EvalResult:
        """Mean loss and accuracy of the current parameters on ``(x, y)``; no update."""
        xs, ys = self._check_xy(x, y)
        if len(xs) == 0:
            return EvalResult(math.nan, math.nan)
        io = self._spec.eval
        params: Mapping[str, Any] = {
            name: value for name, value in zip(self._spec.eval_params, self._params, strict=True)
        }
        names = [io["loss"], io["correct"]]
        loss_sum = correct = 0.0
        for first in range(0, len(xs), batch_size):
            bx, by = xs[first : first + batch_size], ys[first : first + batch_size]
            feeds = {
                io["x"]: self._value(bx),
                io["y"]: self._value(by),
                **params,
                **self._frozen,
            }
            try:
                loss, hits = self._eval.run_with_ort_values(names, feeds)
            except Exception as exc:
                raise RuntimeError(f"ONNX Runtime evaluation failed: {exc}") from exc
            loss_sum += float(loss.numpy()) * len(bx)
            correct += float(hits.numpy())
        accuracy = correct / len(xs) if self._metric == "accuracy" else math.nan
        return EvalResult(loss_sum / len(xs), accuracy)
