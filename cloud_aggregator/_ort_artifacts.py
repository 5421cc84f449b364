"""The onnxruntime-training backend of the artifact builder (manifest format 1).

ONNX Runtime's ``generate_artifacts`` writes four files (training, eval and optimizer
graphs with ``com.microsoft`` gradient ops, and a checkpoint) that only the
``onnxruntime-training-cpu`` wheel loads: x86_64 (and macOS/Windows), Python <= 3.12,
last released as 1.19.2. The portable backend (``_portable_build``) is the default;
this one stays for comparison and for fleets that already run it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from broker_bridge import content_hash, file_sha256
from cloud_aggregator._artifacts import (
    MAX_IR_VERSION,
    ORT_TRAINING_FILES,
    ArtifactInfo,
    _dims,
    _onnx,
)
from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph import (
    SGD,
    AdamW,
    CrossEntropy,
    LossSpec,
    MeanSquaredError,
    OptimizerSpec,
    optimizer_to_json,
)

if TYPE_CHECKING:
    import onnx

_LABEL_NAMES = {"cross_entropy": "labels", "mse": "target"}


def load_artifacts_module() -> types.ModuleType:
    """Import ``onnxruntime.training.artifacts`` without torch.

    Same stub as ``edge_runtime/_ort.py`` (see there why): ``onnxruntime.training``'s
    ``__init__`` imports torch, its ``artifacts`` submodule does not.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelBuildError(
            f"the ort-training backend needs onnxruntime-training-cpu==1.19.2 ({exc}); the "
            "default portable backend does not"
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
            f"onnxruntime has no training artifacts module ({exc}): the ort-training backend "
            "needs onnxruntime-training-cpu==1.19.2 in place of onnxruntime; the default "
            "portable backend does not"
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


def build_ort_training(
    proto: onnx.ModelProto, work: Path, out: Path, loss: LossSpec, optimizer: OptimizerSpec,
    trainable: Sequence[str] | None, frozen: Sequence[str],
) -> ArtifactInfo:
    plain_loss = (len(loss.terms) == 1 and loss.prox_mu == 0
                  and loss.primary in (CrossEntropy(), MeanSquaredError()))
    plain_optim = optimizer in (SGD(), AdamW(eps=1e-6, weight_decay=0.0, mode="hf"))
    if not plain_loss or not plain_optim:
        raise ModelBuildError(
            "the onnxruntime-training backend supports plain cross_entropy or mse with plain "
            "sgd or adamw:eps=1e-6,weight_decay=0,mode=hf only; use the portable backend for "
            f"{loss.to_json()['terms']} / {optimizer_to_json(optimizer)}")
    data_input, output, params = _check_model(proto)
    order, fixed = _choose_trainable(params, trainable, frozen)
    artifacts = load_artifacts_module()
    loss_name = loss.summary()
    loss_type = {"cross_entropy": artifacts.LossType.CrossEntropyLoss,
                 "mse": artifacts.LossType.MSELoss}[loss_name]
    optim_type = {"sgd": artifacts.OptimType.SGD, "adamw": artifacts.OptimType.AdamW}[
        optimizer.kind]
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
    files = {name: file_sha256(work / name) for name in ORT_TRAINING_FILES}
    return ArtifactInfo(
        directory=out,
        files=files,
        content_hash=content_hash(files),
        parameters=tuple((name, params[name]) for name in order),
        frozen=tuple((name, params[name]) for name in fixed),
        input_name=data_input.name,
        input_shape=_dims(data_input),
        label_name=_LABEL_NAMES[loss_name],
        label_dtype="int64" if loss_name == "cross_entropy" else "float32",
        output_name=output.name,
        loss=loss_name,
        optimizer=optimizer.kind,
        backend="ort-training",
    )
