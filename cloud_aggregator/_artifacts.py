"""Turn a user's ONNX model into ONNX Runtime on-device training artifacts.

``build_artifacts`` checks the model first (IR version, ``onnx.checker``, one data
input, one output, float parameters to train), then calls ORT's
``generate_artifacts`` with the model's output added as an extra output of the
training and eval graphs (so a device can report accuracy, not only loss), and
writes ``artifacts.json``: the sha256 of every file a device loads, a combined
content hash the device verifies, and the flat-parameter layout in the order of
``Module.get_contiguous_parameters`` (the graph order of the parameters, which is
*not* the alphabetical order ``CheckpointState.parameters`` iterates in).

Manifest content hash: sha256 over the UTF-8 text ``"{name} {sha256}\\n"`` of each
device file, sorted by name (``edge_runtime._trainer`` computes the same).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from broker_bridge import content_hash, file_sha256
from cloud_aggregator._errors import ModelBuildError

if TYPE_CHECKING:
    import onnx

MANIFEST_NAME = "artifacts.json"
MANIFEST_FORMAT = "fleetlearn-artifacts/1"
MODEL_NAME = "model.onnx"
DEVICE_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
MAX_IR_VERSION = 10  # the newest IR onnxruntime-training 1.19.2 loads
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adamw")
_LABEL_NAMES = {"cross_entropy": "labels", "mse": "target"}

Loss = Literal["cross_entropy", "mse"]
Optim = Literal["sgd", "adamw"]
Dim = int | str


@dataclass(frozen=True, kw_only=True)
class ArtifactInfo:
    """What ``build_artifacts`` wrote, as recorded in ``artifacts.json``."""

    directory: Path
    files: dict[str, str]
    """Device file name -> sha256 hex."""
    content_hash: str
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    """Trainable parameters in the order of the flat vector a device exchanges."""
    frozen: tuple[tuple[str, tuple[int, ...]], ...]
    input_name: str
    input_shape: tuple[Dim, ...]
    label_name: str
    label_dtype: str
    output_name: str
    loss: Loss
    optimizer: Optim

    @property
    def num_parameters(self) -> int:
        """Length of the flat parameter vector."""
        return sum(int(np.prod(shape)) for _, shape in self.parameters)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``artifacts.json``."""
        return {
            "format": MANIFEST_FORMAT,
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
        """Parse a manifest written by :meth:`to_json`."""
        try:
            if data["format"] != MANIFEST_FORMAT:
                raise ModelBuildError(f"unknown manifest format {data['format']!r}")
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
                loss=data["loss"],
                optimizer=data["optimizer"],
            )
        except (KeyError, TypeError) as exc:
            raise ModelBuildError(f"malformed {MANIFEST_NAME} in {directory}: {exc!r}") from exc


def _onnx() -> types.ModuleType:
    """onnx, imported on use so the package imports without the cloud extra."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelBuildError(
            f"building artifacts needs the cloud extra: pip install 'fleetlearn[cloud]' ({exc})"
        ) from exc
    return onnx


def load_artifacts_module() -> types.ModuleType:
    """Import ``onnxruntime.training.artifacts`` without torch.

    Same stub as ``edge_runtime/_ort.py`` (see there why): ``onnxruntime.training``'s
    ``__init__`` imports torch, its ``artifacts`` submodule does not.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelBuildError(
            f"building artifacts needs onnxruntime-training-cpu==1.19.2 ({exc})"
        ) from exc
    onnxruntime.set_default_logger_severity(3)
    if "onnxruntime.training" not in sys.modules:
        stub = types.ModuleType("onnxruntime.training")
        stub.__path__ = [os.path.join(onnxruntime.__path__[0], "training")]
        sys.modules["onnxruntime.training"] = stub
    try:
        from onnxruntime.training import artifacts
    except ImportError as exc:
        raise ModelBuildError(
            f"onnxruntime has no training artifacts module ({exc}); "
            "pip install onnxruntime-training-cpu==1.19.2"
        ) from exc
    return artifacts


@contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture the C++ stderr ORT writes while building graphs (INFO lines, errors).

    ``set_default_logger_severity`` does not reach the gradient builder's logger, so
    the file descriptor itself is redirected; the text is kept for error messages.
    """
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode("utf-8", "replace").splitlines()
            captured.extend(line for line in lines if "[I:onnxruntime" not in line)


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


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return tuple(dims)


def _check_model(
    model: onnx.ModelProto,
) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto, dict[str, tuple[int, ...]]]:
    """Validate the model; return its data input, its output and its float parameters."""
    onnx = _onnx()
    float_type = onnx.TensorProto.FLOAT
    if model.ir_version > MAX_IR_VERSION:
        raise ModelBuildError(
            f"model has ONNX IR version {model.ir_version}; onnxruntime-training 1.19.2 loads "
            f"IR <= {MAX_IR_VERSION}: export it with onnx==1.17.0 (or set model.ir_version = 10 "
            "if it uses no newer IR feature)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelBuildError(f"model fails onnx.checker: {exc}") from exc
    init_names = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in init_names]
    if len(inputs) != 1:
        names = [value.name for value in inputs]
        raise ModelBuildError(f"model must have exactly one data input, it has {names}")
    if len(model.graph.output) != 1:
        names = [value.name for value in model.graph.output]
        raise ModelBuildError(f"model must have exactly one output (the logits), it has {names}")
    if inputs[0].type.tensor_type.elem_type != float_type:
        raise ModelBuildError(f"model input {inputs[0].name!r} must be float32")
    params = {
        init.name: tuple(int(d) for d in init.dims)
        for init in model.graph.initializer
        if init.data_type == float_type and len(init.dims) >= 1
    }
    return inputs[0], model.graph.output[0], params


def _choose_trainable(
    params: dict[str, tuple[int, ...]],
    trainable: Sequence[str] | None,
    frozen: Sequence[str],
) -> tuple[list[str], list[str]]:
    unknown = sorted(set(trainable or ()).union(frozen) - set(params))
    if unknown:
        raise ModelBuildError(
            f"no float parameter named {', '.join(unknown)} in the model; "
            f"its parameters are {', '.join(params) or 'none'}"
        )
    both = sorted(set(trainable or ()).intersection(frozen))
    if both:
        raise ModelBuildError(f"parameters both trainable and frozen: {', '.join(both)}")
    chosen = list(trainable) if trainable is not None else [n for n in params if n not in frozen]
    if not chosen:
        raise ModelBuildError("model has no float initializer (rank >= 1) left to train")
    # Graph order: the order ORT's Module lays the parameters out in its flat buffer.
    order = [name for name in params if name in set(chosen)]
    fixed = [name for name in params if name not in set(chosen)]
    return order, fixed


def build_artifacts(
    model: onnx.ModelProto | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    loss: Loss = "cross_entropy",
    optimizer: Optim = "sgd",
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] = (),
) -> ArtifactInfo:
    """Build training artifacts for ``model`` into ``out_dir`` and return their manifest.

    ``trainable`` defaults to every float initializer of rank >= 1 not in ``frozen``.
    Files are generated in a temporary directory and moved into place, the manifest
    last, so a reader never sees a half-written set.
    """
    if loss not in LOSSES:
        raise ModelBuildError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if optimizer not in OPTIMIZERS:
        raise ModelBuildError(
            f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    proto = _load_model(model)
    data_input, output, params = _check_model(proto)
    order, fixed = _choose_trainable(params, trainable, frozen)
    artifacts = load_artifacts_module()
    loss_type = {
        "cross_entropy": artifacts.LossType.CrossEntropyLoss,
        "mse": artifacts.LossType.MSELoss,
    }[loss]
    optim_type = {"sgd": artifacts.OptimType.SGD, "adamw": artifacts.OptimType.AdamW}[optimizer]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as tmp:
        work = Path(tmp)
        with _captured_stderr() as log:
            try:
                artifacts.generate_artifacts(
                    proto,
                    requires_grad=order,
                    frozen_params=fixed or None,
                    loss=loss_type,
                    optimizer=optim_type,
                    artifact_directory=work,
                    additional_output_names=[output.name],
                )
            except Exception as exc:  # ORT raises RuntimeError, Fail, InvalidGraph...
                failure: Exception | None = exc
            else:
                failure = None
        if failure is not None:
            detail = "\n".join(log[-10:])
            raise ModelBuildError(
                f"ONNX Runtime could not build a training graph for this model: {failure}"
                + (f"\n{detail}" if detail else "")
            ) from failure
        _onnx().save(proto, str(work / MODEL_NAME))
        files = {name: file_sha256(work / name) for name in DEVICE_FILES}
        info = ArtifactInfo(
            directory=out,
            files=files,
            content_hash=content_hash(files),
            parameters=tuple((name, params[name]) for name in order),
            frozen=tuple((name, params[name]) for name in fixed),
            input_name=data_input.name,
            input_shape=_dims(data_input),
            label_name=_LABEL_NAMES[loss],
            label_dtype="int64" if loss == "cross_entropy" else "float32",
            output_name=output.name,
            loss=loss,
            optimizer=optimizer,
        )
        (work / MANIFEST_NAME).write_text(json.dumps(info.to_json(), indent=2) + "\n")
        for name in (*DEVICE_FILES, MODEL_NAME, MANIFEST_NAME):
            os.replace(work / name, out / name)
    return info


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
