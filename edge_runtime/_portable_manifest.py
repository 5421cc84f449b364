"""The portable manifest (format 2) read whole and checked against its graphs, at load.

Only the files a manifest lists are covered by its content hash; the rest of it (graph
input and output names, tensor shapes, which file holds what) is not. So before the
trainer allocates or runs anything, :func:`read_portable` checks the manifest's own
consistency (every file it opens is a listed one, every dimension a non-negative
integer, every optimizer state tensor shaped like a parameter, every FedProx anchor
naming a parameter) and :func:`check_graphs` checks it against the verified graphs
(every input and output it names exists, the declared shapes and the label type
agree). Whatever does not fit is an ``ArtifactError`` naming the artifacts, never a
failure later that blames the device's data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime._errors import ArtifactError

Shape = tuple[int, ...]
Shapes = tuple[tuple[str, Shape], ...]

_TRAIN_INPUTS = ("x", "y", "sample_weight", "order", "starts", "ends", "lr", "step")
_TRAIN_OUTPUTS = ("step_out", "loss_sum", "correct_sum", "seen")
_ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}


@dataclass(frozen=True, kw_only=True)
class PortableSpec:
    """What the portable trainer needs from a format-2 manifest, checked."""

    shapes: Shapes
    """Exchanged tensors in flat-vector order."""
    frozen_shapes: Shapes
    label_dtype: str
    metric: str | None
    train_file: str
    eval_file: str
    initial_file: str
    frozen_file: str | None
    train: dict[str, str]
    """The training graph's fixed input and output names (``x``, ``loss_sum``...)."""
    soft_targets: str | None
    param_io: tuple[tuple[str, str], ...]
    """(input, output) of each exchanged tensor in the training graph."""
    state_io: tuple[tuple[str, str, Shape], ...]
    anchors: tuple[tuple[str, str], ...]
    """(training graph input, parameter name) of each FedProx anchor."""
    eval: dict[str, str]
    """The eval graph's ``x``, ``y``, ``loss`` and ``correct`` names."""
    eval_params: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def frozen_size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.frozen_shapes)

    def train_outputs(self) -> list[str]:
        """The outputs a training run asks for, in the order it reads them."""
        return ([o for _, o in self.param_io] + [o for _, o, _ in self.state_io]
                + [self.train[k] for k in _TRAIN_OUTPUTS])


def _shape(value: object, where: str) -> Shape:
    if not isinstance(value, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ArtifactError(f"{where}: shape {value!r} is not a list of integers >= 0")
    return tuple(value)


def _tensors(items: object, where: str) -> Shapes:
    if not isinstance(items, list):
        raise ArtifactError(f"{where} is not a list")
    return tuple((_name(p["name"], where), _shape(p["shape"], f"{where} {p['name']!r}"))
                 for p in items)


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{where}: {value!r} is not a name")
    return value


def _listed(files: Mapping[str, str], key: str, value: object, where: str) -> str:
    """``value`` when it names one of the manifest's ``files`` (plain names, each checked
    against its SHA-256 by ``verify_files``): a path elsewhere would load a file nothing
    verified."""
    if not isinstance(value, str) or value not in files:
        raise ArtifactError(
            f"{where}: {key} {value!r} is not one of the files it lists (and verifies)")
    return value


def read_portable(manifest: Mapping[str, Any], directory: Path) -> PortableSpec:
    """Parse and check a format-2 manifest on its own (``ArtifactError`` if it is broken)."""
    where = f"manifest in {directory}"
    try:
        return _read(manifest, where)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"malformed portable {where}: {exc!r}") from exc


def _read(manifest: Mapping[str, Any], where: str) -> PortableSpec:
    files = manifest["files"]
    shapes = _tensors(manifest["parameters"], f"{where}: parameters")
    if not shapes:
        raise ArtifactError(f"{where}: no trainable parameters")
    frozen_shapes = _tensors(manifest.get("frozen", []), f"{where}: frozen")
    label_dtype = str(manifest["label"]["dtype"])
    if label_dtype not in _ORT_TYPES:
        raise ArtifactError(f"{where}: label dtype {label_dtype!r} is neither int64 nor float32")
    train, ev = dict(manifest["train"]), dict(manifest["eval"])
    names = [n for n, _ in shapes]
    param_io = tuple((_name(p["in"], where), _name(p["out"], where))
                     for p in train["parameters"])
    if len(param_io) != len(shapes):
        raise ArtifactError(f"{where}: {len(param_io)} training graph parameter inputs for "
                            f"{len(shapes)} parameters")
    by_shape = {shape for _, shape in shapes}
    state_io = []
    for s in train["state"]:
        shape = _shape(s["shape"], f"{where}: state {s.get('in')!r}")
        if shape not in by_shape:
            raise ArtifactError(f"{where}: optimizer state {s.get('in')!r} has shape "
                                f"{list(shape)}, which no parameter has")
        state_io.append((_name(s["in"], where), _name(s["out"], where), shape))
    anchors = []
    for g in train["global"]:
        if g["parameter"] not in names:
            raise ArtifactError(f"{where}: FedProx global input {g['input']!r} names "
                                f"{g['parameter']!r}, which is not a parameter")
        anchors.append((_name(g["input"], where), str(g["parameter"])))
    eval_params = tuple(_name(p, where) for p in ev["parameters"])
    if len(eval_params) != len(shapes):
        raise ArtifactError(f"{where}: the eval graph takes {len(eval_params)} parameters, "
                            f"the manifest lists {len(shapes)}")
    if list(eval_params) != names:
        raise ArtifactError(f"{where}: the eval graph's parameters {list(eval_params)[:5]} "
                            f"are not the manifest's {names[:5]}")
    frozen_file = None
    if any(math.prod(shape) for _, shape in frozen_shapes):
        frozen_file = _listed(files, "frozen_values", manifest.get("frozen_values"), where)
    soft = train.get("soft_targets")
    return PortableSpec(
        shapes=shapes, frozen_shapes=frozen_shapes, label_dtype=label_dtype,
        metric=manifest["loss"].get("metric"),
        train_file=_listed(files, "train.file", train.get("file"), where),
        eval_file=_listed(files, "eval.file", ev.get("file"), where),
        initial_file=_listed(files, "initial", manifest.get("initial", "parameters.f32"), where),
        frozen_file=frozen_file,
        train={k: _name(train[k], where) for k in (*_TRAIN_INPUTS, *_TRAIN_OUTPUTS)},
        soft_targets=_name(soft, where) if soft else None,
        param_io=param_io, state_io=tuple(state_io), anchors=tuple(anchors),
        eval={k: _name(ev[k], where) for k in ("x", "y", "loss", "correct")},
        eval_params=eval_params,
    )


def _declared(values: Sequence[Any]) -> dict[str, tuple[tuple[Any, ...], str]]:
    return {v.name: (tuple(v.shape or ()), str(v.type)) for v in values}


def _same_shape(declared: tuple[Any, ...], shape: Shape) -> bool:
    """The graph's declared shape admits ``shape`` (a named or unknown dim admits any)."""
    return len(declared) == len(shape) and all(
        not isinstance(d, int) or d == s for d, s in zip(declared, shape, strict=True))


def check_graphs(spec: PortableSpec, train: Any, ev: Any, directory: Path) -> None:
    """Check the manifest's names, shapes and label type against the loaded sessions."""
    t_in, t_out = _declared(train.get_inputs()), _declared(train.get_outputs())
    want = {i for i, _ in spec.param_io} | {i for i, _, _ in spec.state_io}
    want |= {spec.train[k] for k in _TRAIN_INPUTS}
    want |= {a for a, _ in spec.anchors} | {n for n, _ in spec.frozen_shapes}
    if spec.soft_targets:
        want.add(spec.soft_targets)
    if set(t_in) != want:
        raise ArtifactError(
            f"training graph in {directory} does not match its manifest: inputs "
            f"{sorted(set(t_in) ^ want)[:5]} differ")
    missing = [o for o in spec.train_outputs() if o not in t_out]
    if missing:
        raise ArtifactError(f"training graph in {directory} does not match its manifest: "
                            f"it has no outputs {missing[:5]}")
    e_in, e_out = _declared(ev.get_inputs()), _declared(ev.get_outputs())
    e_want = {spec.eval["x"], spec.eval["y"], *spec.eval_params}
    e_want |= {n for n, _ in spec.frozen_shapes}
    if set(e_in) != e_want:
        raise ArtifactError(f"eval graph in {directory} does not match its manifest: inputs "
                            f"{sorted(set(e_in) ^ e_want)[:5]} differ")
    missing = [spec.eval[k] for k in ("loss", "correct") if spec.eval[k] not in e_out]
    if missing:
        raise ArtifactError(f"eval graph in {directory} does not match its manifest: it has "
                            f"no outputs {missing}")
    checks = [(t_in, i, shape, name) for (name, shape), (i, _) in zip(spec.shapes,
                                                                      spec.param_io, strict=True)]
    checks += [(t_out, o, shape, name) for (name, shape), (_, o) in zip(spec.shapes,
                                                                       spec.param_io, strict=True)]
    checks += [(t_in, i, shape, i) for i, _, shape in spec.state_io]
    checks += [(t_out, o, shape, o) for _, o, shape in spec.state_io]
    checks += [(e_in, p, shape, name) for (name, shape), p in zip(spec.shapes, spec.eval_params,
                                                                  strict=True)]
    checks += [(t_in, n, shape, n) for n, shape in spec.frozen_shapes]
    for declared, io_name, shape, what in checks:
        if not _same_shape(declared[io_name][0], shape):
            raise ArtifactError(
                f"artifacts in {directory}: the manifest gives {what!r} the shape "
                f"{list(shape)}, its graph {list(declared[io_name][0])} ({io_name})")
    label_type = _ORT_TYPES[spec.label_dtype]
    for graph, declared, name in ((("training", t_in, spec.train["y"])),
                                  ("eval", e_in, spec.eval["y"])):
        if declared[name][1] != label_type:
            raise ArtifactError(f"{graph} graph in {directory} takes {declared[name][1]} "
                                f"labels, the manifest says label dtype {spec.label_dtype}")


def file_size_is(path: Path, size: int) -> None:
    """``ArtifactError`` unless ``path`` holds ``size`` float32 values (checked before
    reading it)."""
    try:
        nbytes = path.stat().st_size
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if nbytes != 4 * size:
        raise ArtifactError(f"{path} holds {nbytes / 4:g} floats, the manifest needs {size}")


def read_f32(path: Path, size: int) -> np.ndarray:
    """The ``size`` little-endian float32 values of ``path``."""
    file_size_is(path, size)
    try:
        data = np.fromfile(path, dtype="<f4")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if data.size != size:
        raise ArtifactError(f"{path} holds {data.size} floats, the manifest needs {size}")
    return data.astype(np.float32)
