"""Turn a user's ONNX model into training artifacts for the fleet's devices.

Two backends, chosen with ``backend``:

- ``portable`` (the default): the compiler in ``_traingraph`` turns the inference
  model into a training graph and an eval graph made only of standard ONNX operators,
  which any ONNX Runtime build runs (plain ``onnxruntime`` on x86_64 and aarch64,
  Python 3.11-3.13). Manifest format ``fleetlearn-artifacts/2``; see
  ``_portable_build`` for the files.
- ``ort-training``: ONNX Runtime's own ``generate_artifacts`` (four files that only
  the ``onnxruntime-training-cpu`` 1.19.2 wheel loads: x86_64, Python <= 3.12).
  Manifest format ``fleetlearn-artifacts/1``. Cross-entropy or MSE, plain SGD or AdamW.

Both check the model first (IR version, ``onnx.checker``, one data input, one output,
float parameters to train) and write ``artifacts.json``: the SHA-256 of every file a
device loads, a combined content hash the device verifies, and the flat-parameter
layout devices exchange.

Manifest content hash: sha256 over the UTF-8 text ``"{name} {sha256}\\n"`` of each
device file, sorted by name (``edge_runtime._manifest`` computes the same).
"""

from __future__ import annotations

import json
import os
import tempfile
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from broker_bridge import content_hash, file_sha256
from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph import (
    SGD,
    AdamW,
    LossSpec,
    OptimizerSpec,
    parse_optimizer,
)

if TYPE_CHECKING:
    import onnx

MANIFEST_NAME = "artifacts.json"
FORMAT_ORT_TRAINING = "fleetlearn-artifacts/1"
FORMAT_PORTABLE = "fleetlearn-artifacts/2"
MODEL_NAME = "model.onnx"
ORT_TRAINING_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx",
                      "checkpoint")
BACKENDS = ("portable", "ort-training")

Backend = Literal["portable", "ort-training"]
Dim = int | str


@dataclass(frozen=True, kw_only=True)
class ArtifactInfo:
    """What ``build_artifacts`` wrote, as recorded in ``artifacts.json``."""

    directory: Path
    files: dict[str, str]
    """Device file name -> sha256 hex."""
    content_hash: str
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    """Tensors in the order of the flat vector a device exchanges."""
    frozen: tuple[tuple[str, tuple[int, ...]], ...]
    input_name: str
    input_shape: tuple[Dim, ...]
    label_name: str
    label_dtype: str
    output_name: str
    loss: str
    """The primary loss term: cross_entropy, mse, bce."""
    optimizer: str
    """sgd or adamw."""
    backend: Backend = "ort-training"
    buffers: tuple[str, ...] = ()
    """Exchanged tensors updated by the forward pass (BatchNorm running statistics)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The rest of a portable manifest (graph I/O, loss and optimizer settings)."""

    @property
    def num_parameters(self) -> int:
        """Length of the flat parameter vector."""
        return sum(int(np.prod(shape)) for _, shape in self.parameters)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``artifacts.json``."""
        if self.backend == "portable":
            return {"format": FORMAT_PORTABLE, "files": dict(sorted(self.files.items())),
                    "content_hash": self.content_hash, **self.extra, "model": MODEL_NAME}
        return {
            "format": FORMAT_ORT_TRAINING,
            "files": dict(sorted(self.files.items())),
            "content_hash": self.content_hash,
            "parameters": [{"name": n, "shape": list(s)} for n, s in self.parameters],
            "frozen": [{"name": n, "shape": list(s)} for n, s in self.frozen],
            "num_parameters": self.num_parameters,
            "input": {"name": self.input_name, "shape": list(self.input_shape), "dtype": "float32"},
            "label": {"name": self.label_name, "dtype": self.label_dtype},
            # Both graphs output [loss, model output] in that order.
            "output": {"name": self.output_name},
            "loss": self.loss,
            "optimizer": self.optimizer,
            "model": MODEL_NAME,
        }

    @classmethod
    def from_json(cls, directory: Path, data: dict[str, Any]) -> ArtifactInfo:
        """Parse a manifest written by :meth:`to_json` (either format)."""
        try:
            fmt = data["format"]
            if fmt not in (FORMAT_ORT_TRAINING, FORMAT_PORTABLE):
                raise ModelBuildError(f"unknown manifest format {fmt!r}")
            portable = fmt == FORMAT_PORTABLE
            loss = (LossSpec.from_json(data["loss"]).summary() if portable
                    else str(data["loss"]))
            optimizer = str(data["optimizer"]["kind"]) if portable else str(data["optimizer"])
            extra = {k: v for k, v in data.items()
                     if k not in ("format", "files", "content_hash", "model")} if portable else {}
            return cls(
                directory=directory,
                files=dict(data["files"]),
                content_hash=str(data["content_hash"]),
                parameters=tuple((p["name"], tuple(p["shape"])) for p in data["parameters"]),
                frozen=tuple((p["name"], tuple(p["shape"])) for p in data["frozen"]),
                input_name=str(data["input"]["name"]),
                input_shape=tuple(data["input"]["shape"]),
                label_name=str(data["label"]["name"]),
                label_dtype=str(data["label"]["dtype"]),
                output_name=str(data["output"]["name"]),
                loss=loss,
                optimizer=optimizer,
                backend="portable" if portable else "ort-training",
                buffers=tuple(data.get("buffers", ())) if portable else (),
                extra=extra,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ModelBuildError(f"malformed {MANIFEST_NAME} in {directory}: {exc!r}") from exc

    @property
    def device_files(self) -> tuple[str, ...]:
        """Files a device downloads (besides the manifest)."""
        return tuple(sorted(self.files))


def _onnx() -> types.ModuleType:
    """onnx, imported on use so the package imports without the cloud extra."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelBuildError(
            f"building artifacts needs the cloud extra: pip install 'fleetlearn[cloud]' ({exc})"
        ) from exc
    return onnx


def _load_model(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    try:
        return onnx.load(str(path))
    except FileNotFoundError as exc:
        raise ModelBuildError(f"ONNX model not found: {path}") from exc
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelBuildError(f"cannot read ONNX model {path}: {exc}") from exc


def _loss_spec(loss: str | LossSpec) -> LossSpec:
    return loss if isinstance(loss, LossSpec) else LossSpec.parse(loss)


def _optimizer_spec(optimizer: str | OptimizerSpec) -> OptimizerSpec:
    return optimizer if isinstance(optimizer, SGD | AdamW) else parse_optimizer(optimizer)


def build_artifacts(
    model: onnx.ModelProto | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    loss: str | LossSpec = "cross_entropy",
    optimizer: str | OptimizerSpec = "sgd",
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] = (),
    backend: Backend = "portable",
) -> ArtifactInfo:
    """Build training artifacts for ``model`` into ``out_dir`` and return their manifest.

    ``loss`` is a ``LossSpec`` or its text form (``cross_entropy``,
    ``cross_entropy:label_smoothing=0.1+prox:mu=0.01``, ``mse``, ``bce``...);
    ``optimizer`` an ``SGD``/``AdamW`` or its text form (``sgd:momentum=0.9``).
    ``trainable`` defaults to every float initializer of rank >= 1 not in ``frozen``.
    Files are generated in a temporary directory and moved into place, the manifest
    last, so a reader never sees a half-written set.
    """
    if backend not in BACKENDS:
        raise ModelBuildError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    loss_spec = _loss_spec(loss)
    optim_spec = _optimizer_spec(optimizer)
    proto = _load_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as tmp:
        work = Path(tmp)
        if backend == "portable":
            info = _build_portable(proto, work, out, loss_spec, optim_spec, trainable, frozen)
        else:
            from cloud_aggregator._ort_artifacts import build_ort_training

            info = build_ort_training(proto, work, out, loss_spec, optim_spec, trainable, frozen)
        _onnx().save(proto, str(work / MODEL_NAME))
        (work / MANIFEST_NAME).write_text(json.dumps(info.to_json(), indent=2) + "\n")
        for name in (*info.files, MODEL_NAME, MANIFEST_NAME):
            os.replace(work / name, out / name)
    return info


def _build_portable(
    proto: onnx.ModelProto, work: Path, out: Path, loss: LossSpec, optimizer: OptimizerSpec,
    trainable: Sequence[str] | None, frozen: Sequence[str],
) -> ArtifactInfo:
    from cloud_aggregator._portable_build import write_portable

    compiled, sections, names = write_portable(proto, work, loss=loss, optimizer=optimizer,
                                               trainable=trainable, frozen=frozen)
    files = {name: file_sha256(work / name) for name in names}
    return ArtifactInfo(
        directory=out, files=files, content_hash=content_hash(files),
        parameters=compiled.exchanged, frozen=compiled.frozen,
        input_name=compiled.input_name, input_shape=compiled.input_shape,
        label_name=sections["label"]["name"], label_dtype=compiled.label_dtype,
        output_name=compiled.output_name, loss=loss.summary(), optimizer=optimizer.kind,
        backend="portable", buffers=compiled.buffers, extra=sections,
    )


def read_manifest(directory: str | os.PathLike[str]) -> ArtifactInfo:
    """Read ``artifacts.json`` from an artifacts directory."""
    path = Path(directory) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelBuildError(f"no {MANIFEST_NAME} in {directory}") from exc
    except (OSError, ValueError) as exc:
        raise ModelBuildError(f"cannot read {path}: {exc}") from exc
    return ArtifactInfo.from_json(Path(directory), data)


def initial_parameters(directory: str | os.PathLike[str]) -> np.ndarray:
    """The flat float32 parameter vector of the built model (the global model at round 0).

    Laid out as ``ArtifactInfo.parameters``: the vector devices exchange.
    """
    info = read_manifest(directory)
    onnx = _onnx()
    model = onnx.load(str(info.directory / MODEL_NAME))
    tensors = {init.name: init for init in model.graph.initializer}
    parts = [
        onnx.numpy_helper.to_array(tensors[name]).astype(np.float32).ravel()
        for name, _ in info.parameters
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
