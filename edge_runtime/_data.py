"""Local data adapters: a device's own samples as ``(x float32, y int64 | float32)``.

``LocalData`` holds a device's samples (and its held-out evaluation split). Three
sources, each named in the agent's configuration: an ``.npz`` file, a CSV file,
or the user's own Python callable (``module:function``) returning ``(x, y)``. Labels
are int64 class indices for classification and float32 targets for regression.
:func:`validate_for_model` then says in plain words when the data does not fit the
model, before any training step fails deep inside ONNX Runtime.
"""

from __future__ import annotations

import csv
import importlib
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from device_profiles import ConfigError
from edge_runtime._errors import DataError

Task = Literal["classification", "regression"]
Dim = int | str | None


@dataclass(frozen=True, kw_only=True, eq=False)
class LocalData:
    """A device's own samples; ``x_eval``/``y_eval`` are held out for federated evaluation."""

    x: np.ndarray
    y: np.ndarray
    x_eval: np.ndarray | None = None
    y_eval: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @classmethod
    def split(
        cls, x: np.ndarray, y: np.ndarray, *, holdout_fraction: float = 0.0, seed: int = 0
    ) -> LocalData:
        """Hold out ``holdout_fraction`` of the samples (seeded) for evaluation."""
        if not 0.0 <= holdout_fraction < 1.0:
            raise ConfigError("holdout_fraction must be within [0, 1)")
        n_eval = int(len(y) * holdout_fraction)
        if n_eval == 0:
            return cls(x=x, y=y)
        order = np.random.default_rng(seed).permutation(len(y))
        ev, tr = np.sort(order[:n_eval]), np.sort(order[n_eval:])
        return cls(x=x[tr], y=y[tr], x_eval=x[ev], y_eval=y[ev])


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """Where a device's local data lives (parsed once from configuration).

    ``kind`` is ``npz`` (keys ``x_key``/``y_key``), ``csv`` (``label_column`` by index
    or header name; ``header`` None detects it) or ``callable`` (``location`` is
    ``module:function``, called with ``kwargs``).
    """

    kind: Literal["npz", "csv", "callable"]
    location: str
    task: Task = "classification"
    x_key: str = "x"
    y_key: str = "y"
    label_column: int | str = -1
    header: bool | None = None
    delimiter: str = ","
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Read the data as ``(x, y)`` (see :func:`load_data`)."""
        return load_data(self)


def _finish(x: Any, y: Any, task: Task, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        xs = np.asarray(x, dtype=np.float32)
        ys_raw = np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: cannot convert data to arrays: {exc}") from exc
    if xs.ndim < 1 or ys_raw.ndim < 1:
        raise DataError(
            f"{where}: x and y must have a sample axis, got {xs.shape} and {ys_raw.shape}"
        )
    if len(xs) != len(ys_raw):
        raise DataError(f"{where}: x has {len(xs)} samples but y has {len(ys_raw)}")
    if task == "classification":
        if ys_raw.ndim != 1:
            raise DataError(
                f"{where}: class labels must be one per sample, got shape {ys_raw.shape}"
            )
        if ys_raw.size and not np.issubdtype(ys_raw.dtype, np.integer):
            as_float = np.asarray(ys_raw, dtype=np.float64)
            if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
                raise DataError(f"{where}: class labels must be whole numbers, got {ys_raw.dtype}")
        ys = np.asarray(ys_raw, dtype=np.int64)
    else:
        try:
            ys = np.asarray(ys_raw, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: regression targets must be numbers: {exc}") from exc
    return np.ascontiguousarray(xs), np.ascontiguousarray(ys)


def load_npz(
    path: str | os.PathLike[str],
    *,
    x_key: str = "x",
    y_key: str = "y",
    task: Task = "classification",
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x_key`` and ``y_key`` from an ``.npz`` file (no pickles are loaded)."""
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in (x_key, y_key) if key not in archive.files]
            if missing:
                raise DataError(
                    f"{where}: no array named {', '.join(missing)}; "
                    f"it has {', '.join(archive.files)}"
                )
            x, y = archive[x_key], archive[y_key]
    except FileNotFoundError as exc:
        raise DataError(f"data file not found: {where}") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # a truncated archive is a BadZipFile or an EOFError, neither an OSError
        raise DataError(f"{where}: not a readable .npz file: {exc}") from exc
    return _finish(x, y, task, where)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_csv(
    path: str | os.PathLike[str],
    *,
    label_column: int | str = -1,
    header: bool | None = None,
    delimiter: str = ",",
    task: Task = "classification",
) -> tuple[np.ndarray, np.ndarray]:
    """Read a CSV file: one sample per row, features plus one label column.

    ``header`` None treats the first row as a header when any of its fields is not a
    number. A label column given by name needs a header.
    """
    where = str(path)
    try:
        with open(path, newline="") as fh:
            rows = [row for row in csv.reader(fh, delimiter=delimiter) if row]
    except FileNotFoundError as exc:
        raise DataError(f"data file not found: {where}") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{where}: cannot read CSV: {exc}") from exc
    if not rows:
        raise DataError(f"{where}: empty CSV file")
    has_header = header if header is not None else not all(_is_number(f) for f in rows[0])
    names = [name.strip() for name in rows[0]] if has_header else []
    body = rows[1:] if has_header else rows
    width = len(rows[0])
    if isinstance(label_column, str):
        if label_column not in names:
            raise DataError(
                f"{where}: no column named {label_column!r}; "
                f"columns are {', '.join(names) or '(no header)'}"
            )
        index = names.index(label_column)
    else:
        if not -width <= label_column < width:
            raise DataError(
                f"{where}: label column {label_column} out of range for {width} columns"
            )
        index = label_column % width
    for number, row in enumerate(body, start=2 if has_header else 1):
        if len(row) != width:
            raise DataError(f"{where}: row {number} has {len(row)} fields, expected {width}")
    try:
        table = np.array(body, dtype=np.float64).reshape(len(body), width)
    except ValueError as exc:
        raise DataError(f"{where}: non-numeric value in data rows: {exc}") from exc
    x = np.delete(table, index, axis=1)
    return _finish(x, table[:, index], task, where)


def load_callable(
    spec: str, *, task: Task = "classification", kwargs: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Call the user's ``module:function`` (importable on this device), which returns ``(x, y)``."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise DataError(f"data callable must be written 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"cannot import data module {module_name!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"{module_name!r} has no callable named {func_name!r}")
    result = func(**(kwargs or {}))
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise DataError(f"{spec} must return (x, y), got {type(result).__name__}")
    return _finish(result[0], result[1], task, spec)


def load_data(source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    """Read a :class:`DataSource`."""
    if source.kind == "npz":
        return load_npz(
            Path(source.location), x_key=source.x_key, y_key=source.y_key, task=source.task
        )
    if source.kind == "csv":
        return load_csv(
            Path(source.location),
            label_column=source.label_column,
            header=source.header,
            delimiter=source.delimiter,
            task=source.task,
        )
    if source.kind == "callable":
        return load_callable(source.location, task=source.task, kwargs=source.kwargs)
    raise DataError(f"unknown data source kind {source.kind!r}; use npz, csv or callable")


def _show(shape: Sequence[Dim]) -> str:
    return (
        "["
        + ", ".join(
            "batch" if i == 0 and not isinstance(d, int) else str(d) for i, d in enumerate(shape)
        )
        + "]"
    )


def validate_for_model(
    x: np.ndarray,
    y: np.ndarray,
    input_shape: Sequence[Dim],
    *,
    input_name: str = "input",
    num_classes: int | None = None,
    task: Task = "classification",
) -> None:
    """Raise :class:`DataError` unless ``(x, y)`` fits a model input of ``input_shape``.

    ``input_shape`` includes the batch axis; named or None dims match any size.
    """
    if x.dtype != np.float32:
        raise DataError(f"features must be float32, got {x.dtype}")
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise DataError("no local samples")
    expected = list(input_shape)[1:]
    per_sample = x.shape[1:]
    fits = len(per_sample) == len(expected) and all(
        not isinstance(want, int) or want == got
        for want, got in zip(expected, per_sample, strict=True)
    )
    if not fits:
        if len(per_sample) == 1 and len(expected) == 1:
            what = f"data has {per_sample[0]} features per sample"
        else:
            what = f"data samples have shape {list(per_sample)}"
        raise DataError(f"{what}; the model's input {input_name!r} takes {_show(input_shape)}")
    if not np.all(np.isfinite(x)):
        raise DataError("features contain NaN or infinity")
    if task == "classification":
        if y.dtype != np.int64 or y.ndim != 1:
            raise DataError(
                f"class labels must be int64 of shape [n], got {y.dtype} {list(y.shape)}"
            )
        problem = label_range_problem(y, num_classes)
        if problem is not None:
            raise DataError(problem)
    else:
        if y.dtype != np.float32:
            raise DataError(f"regression targets must be float32, got {y.dtype}")
        if not np.all(np.isfinite(y)):
            raise DataError("regression targets contain NaN or infinity")


def label_range_problem(y: np.ndarray, num_classes: int | None) -> str | None:
    """Why integer class labels ``y`` cannot train a model of ``num_classes`` classes (a
    label below 0, or at or past ``num_classes`` when it is known), if they cannot."""
    if not len(y) or not np.issubdtype(y.dtype, np.integer):
        return None
    low, high = int(y.min()), int(y.max())
    if low >= 0 and (num_classes is None or high < num_classes):
        return None
    if num_classes is None:
        return f"class labels range over [{low}, {high}]; they must be >= 0"
    return f"class labels range over [{low}, {high}]; the model has {num_classes} classes"
