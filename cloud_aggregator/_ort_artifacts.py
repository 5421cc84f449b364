"""The onnxruntime-training backend of the artifact builder (manifest format 1).

ONNX Runtime's ``generate_artifacts`` writes four files (training, eval and optimizer
graphs with ``com.microsoft`` gradient ops, and a checkpoint) that only the
``onnxruntime-training-cpu`` wheel loads: x86_64 (and macOS/Windows), Python <= 3.12,
last released as 1.19.2. The portable backend (``_portable_build``) is the default;
this one stays for comparison and for fleets that already run it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from broker_bridge import content_hash, file_sha256
from cloud_aggregator._artifacts import ORT_TRAINING_FILES, ArtifactInfo
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
from cloud_aggregator._traingraph._prepare import (
    dims_of,
    model_io,
    prepare_model,
    select_parameters,
)

if TYPE_CHECKING:
    import onnx

_LABEL_NAMES = {"cross_entropy": "labels", "mse": "target"}


def load_artifacts_module() -> types.ModuleType:
    """Import ``onnxruntime.training.artifacts`` without running ``onnxruntime.training``'s
    ``__init__`` (which imports its ``optim`` and ``amp`` subpackages, and torch).

    The same stub as ``edge_runtime/_ort.py`` (see there why; the two packages never
    import each other), installed the same way: before ``import onnxruntime``, whose
    start-up validation would otherwise run that ``__init__`` through
    ``onnxruntime.training.ortmodule``. Where torch is installed, ``artifacts`` still
    imports it through ``onnxruntime.tools``; the cloud side may have it, a device never
    runs this.
    """
    if "onnxruntime" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is not None and spec.submodule_search_locations:
            _install_training_stub(os.path.join(spec.submodule_search_locations[0], "training"))
            sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelBuildError(
            f"the ort-training backend needs onnxruntime-training-cpu==1.19.2 ({exc}); the "
            "default portable backend does not"
        ) from exc
    onnxruntime.set_default_logger_severity(3)
    _install_training_stub(os.path.join(onnxruntime.__path__[0], "training"))
    try:
        from onnxruntime.training import artifacts
    except ImportError as exc:
        raise ModelBuildError(
            f"onnxruntime has no training artifacts module ({exc}): the ort-training backend "
            "needs onnxruntime-training-cpu==1.19.2 in place of onnxruntime; the default "
            "portable backend does not"
        ) from exc
    return artifacts


def _install_training_stub(training_dir: str) -> None:
    """Register ``onnxruntime.training`` as a bare package (no ``__init__`` code)."""
    if "onnxruntime.training" in sys.modules:
        return
    stub = types.ModuleType("onnxruntime.training")
    stub.__path__ = [training_dir]
    stub.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = stub


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
    proto = prepare_model(proto)
    data_input, output = model_io(proto)
    sel = select_parameters(proto, trainable, frozen)
    order, fixed = sel.trainable, sel.frozen + sel.buffers
    params = {i.name: tuple(int(d) for d in i.dims) for i in proto.graph.initializer}
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
        input_shape=dims_of(data_input),
        label_name=_LABEL_NAMES[loss_name],
        label_dtype="int64" if loss_name == "cross_entropy" else "float32",
        output_name=output.name,
        loss=loss_name,
        optimizer=optimizer.kind,
        backend="ort-training",
    )
