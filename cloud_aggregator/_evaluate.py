"""Evaluation of global models: on a held-out set at the server, and as devices report it.

Server-side evaluation runs the plain inference model (``model.onnx`` beside the
training artifacts) with ONNX Runtime's ``InferenceSession``, the global parameters
overriding the model's initializers through ``SessionOptions.add_initializer``: no
graph rewriting, no training API, nothing from the device agent.

Federated evaluation is what devices measured on their own data
(``UpdateMeta.eval_loss``/``eval_accuracy``/``eval_samples``), averaged weighted by
their sample counts.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge import Layout
from cloud_aggregator._errors import AggregatorError
from device_profiles import ConfigError


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    loss: float
    accuracy: float
    samples: int


def load_eval_data(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """An ``.npz`` with arrays ``x`` (features) and ``y`` (labels), checked."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"], np.float32), np.asarray(npz["y"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"eval data {path}: need an .npz with arrays x and y ({exc})") from exc
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"eval data {path}: x has {len(x)} rows, y has {len(y)}")
    return x, y


class ServerEvaluator:
    """Loss and accuracy of a flat parameter vector on a held-out ``(x, y)``."""

    def __init__(
        self, *, model_path: str | os.PathLike[str], layout: Layout, x: np.ndarray,
        y: np.ndarray, input_name: str | None = None, loss: str = "cross_entropy",
        batch_size: int = 1024,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._model = Path(model_path).read_bytes()
        self._layout = layout
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        self._y = np.asarray(y)
        self._loss = loss
        self._batch = batch_size
        probe = ort.InferenceSession(self._model, providers=["CPUExecutionProvider"])
        self._input = input_name or probe.get_inputs()[0].name
        self._output = probe.get_outputs()[0].name

    def evaluate(self, params: np.ndarray) -> EvalResult:
        """Build a session with ``params`` as its initializers and score the held-out set."""
        ort = self._ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        # The OrtValues must outlive the session: keep them referenced until it is done.
        values: list[Any] = []
        for name, tensor in self._layout.unflatten(np.asarray(params, np.float32)).items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor))
            values.append(value)
            options.add_initializer(name, value)
        try:
            session = ort.InferenceSession(self._model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises Fail/InvalidArgument for bad overrides
            raise AggregatorError(f"cannot evaluate the global model: {exc}") from exc
        loss_sum, correct = 0.0, 0
        for start in range(0, len(self._x), self._batch):
            xb = self._x[start:start + self._batch]
            yb = self._y[start:start + self._batch]
            try:
                out = np.asarray(session.run([self._output], {self._input: xb})[0], np.float64)
            except Exception as exc:  # ORT's InvalidArgument: data that does not fit
                raise AggregatorError(
                    f"the model cannot run on the eval data (x {list(self._x.shape)}): "
                    f"{str(exc).splitlines()[0][:300]}") from exc
            if self._loss == "cross_entropy":
                labels = yb.astype(np.int64)
                if out.ndim != 2 or (len(labels) and (labels.min() < 0
                                                      or labels.max() >= out.shape[1])):
                    raise AggregatorError(
                        f"eval labels range over [{labels.min()}, {labels.max()}]; the model "
                        f"outputs {list(out.shape)}")
                shifted = out - out.max(axis=1, keepdims=True)
                logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
                loss_sum += float(-logp[np.arange(len(labels)), labels].sum())
                correct += int((out.argmax(axis=1) == labels).sum())
            else:
                target = yb.astype(np.float64).reshape(out.shape)
                loss_sum += float(((out - target) ** 2).mean(axis=tuple(range(1, out.ndim))).sum())
        del values
        n = len(self._x)
        accuracy = correct / n if self._loss == "cross_entropy" else math.nan
        return EvalResult(loss=loss_sum / n, accuracy=accuracy, samples=n)


def federated_eval(reports: Iterable[tuple[float | None, float | None, int]]) -> EvalResult | None:
    """Sample-weighted mean of ``(eval_loss, eval_accuracy, eval_samples)`` device reports."""
    loss_sum = acc_sum = 0.0
    loss_n = acc_n = 0
    for loss, accuracy, samples in reports:
        if samples <= 0:
            continue
        if loss is not None and math.isfinite(loss):
            loss_sum += loss * samples
            loss_n += samples
        if accuracy is not None and math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0:
            acc_sum += accuracy * samples
            acc_n += samples
    if loss_n == 0 and acc_n == 0:
        return None
    return EvalResult(
        loss=loss_sum / loss_n if loss_n else math.nan,
        accuracy=acc_sum / acc_n if acc_n else math.nan,
        samples=max(loss_n, acc_n),
    )
