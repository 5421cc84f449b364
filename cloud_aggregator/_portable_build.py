"""Write portable training artifacts (manifest format 2) from a compiled model.

Files (all listed with their SHA-256 in ``artifacts.json``):

- ``train.onnx``: the training graph (one ``Loop`` over mini-batch steps);
- ``eval.onnx``: inference + primary loss + correct count, one batch per run;
- ``parameters.f32``: the exchanged parameters at round 0, raw little-endian float32
  in the manifest's ``parameters`` order (the flat vector devices exchange);
- ``frozen.f32``: the frozen parameters in ``frozen`` order (only when some are frozen).

The manifest's ``train`` and ``eval`` sections name every input and output of the two
graphs, so an agent in another language drives them from the manifest alone
(docs/PROTOCOL.md describes the contract). Before anything is written the graphs are
run once, two steps on random data, with this machine's ONNX Runtime: a graph that a
runtime refuses fails here, at build time, never on a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph import (
    CompiledModel,
    LossSpec,
    OptimizerSpec,
    compile_training,
    optimizer_to_json,
)
from cloud_aggregator._traingraph import _compile as io

TRAIN_FILE, EVAL_FILE, INITIAL_FILE, FROZEN_FILE = (
    "train.onnx",
    "eval.onnx",
    "parameters.f32",
    "frozen.f32",
)


def _json_dims(shape: tuple[int | str, ...]) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in shape]


def manifest_sections(
    compiled: CompiledModel, loss: LossSpec, optimizer: OptimizerSpec
) -> dict[str, Any]:
    """Everything of the format-2 manifest except ``files`` and ``content_hash``."""
    label_input = io.TARGET_INPUTS[compiled.label_key]
    state = [{"in": s.input, "out": s.output, "shape": list(s.shape)} for s in compiled.state]
    trainable = [n for n, _ in compiled.exchanged if n not in set(compiled.buffers)]
    return {
        "backend": "portable",
        "opset": compiled.opset,
        "parameters": [{"name": n, "shape": list(s)} for n, s in compiled.exchanged],
        "buffers": list(compiled.buffers),
        "frozen": [{"name": n, "shape": list(s)} for n, s in compiled.frozen],
        "num_parameters": int(compiled.initial.size),
        "input": {
            "name": compiled.input_name,
            "shape": _json_dims(compiled.input_shape),
            "dtype": "float32",
        },
        "label": {"name": label_input, "dtype": compiled.label_dtype, "kind": compiled.label_key},
        "output": {"name": compiled.output_name, "shape": _json_dims(compiled.output_shape)},
        "loss": loss.to_json(),
        "optimizer": optimizer_to_json(optimizer),
        "initial": INITIAL_FILE,
        "frozen_values": FROZEN_FILE if compiled.frozen else None,
        "train": {
            "file": TRAIN_FILE,
            "x": io.X,
            "y": label_input,
            "sample_weight": io.SAMPLE_WEIGHT,
            "soft_targets": io.TARGET_INPUTS["soft_targets"] if loss.needs_soft_targets else None,
            "order": io.ORDER,
            "starts": io.STARTS,
            "ends": io.ENDS,
            "lr": io.LR,
            "step": io.STEP,
            "step_out": io.STEP_OUT,
            "parameters": [
                {"in": f"fl::in/{n}", "out": f"fl::out/{n}"} for n, _ in compiled.exchanged
            ],
            "state": state,
            "global": [{"input": f"fl::global/{n}", "parameter": n} for n in trainable]
            if compiled.prox
            else [],
            "frozen": [n for n, _ in compiled.frozen],
            "loss_sum": io.LOSS_SUM,
            "correct_sum": io.CORRECT_SUM,
            "seen": io.SEEN,
        },
        "eval": {
            "file": EVAL_FILE,
            "x": compiled.input_name,
            "y": label_input,
            "parameters": [n for n, _ in compiled.exchanged],
            "frozen": [n for n, _ in compiled.frozen],
            "loss": io.EVAL_LOSS,
            "output": compiled.output_name,
            "correct": io.EVAL_CORRECT,
        },
    }


def smoke_run(compiled: CompiledModel, sections: dict[str, Any]) -> None:
    """Two training steps and one evaluation on random data with this machine's ORT."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a base dependency
        return
    rng = np.random.default_rng(0)
    n = 4
    dims = [d if isinstance(d, int) else 1 for d in compiled.input_shape[1:]]
    x = rng.standard_normal((n, *dims)).astype(np.float32)
    out_dims = [d if isinstance(d, int) else 1 for d in compiled.output_shape[1:]]
    if compiled.label_dtype == "int64":
        classes = out_dims[-1] if out_dims else 1
        y: np.ndarray = rng.integers(0, max(1, classes), (n, *out_dims[:-1])).astype(np.int64)
    else:
        y = rng.random((n, *out_dims)).astype(np.float32)
    train, ev = sections["train"], sections["eval"]
    feeds: dict[str, np.ndarray] = {
        train["x"]: x,
        train["y"]: y,
        train["sample_weight"]: np.ones(n, np.float32),
        train["order"]: np.arange(n, dtype=np.int64),
        train["starts"]: np.array([0, 2], np.int64),
        train["ends"]: np.array([2, 4], np.int64),
        train["lr"]: np.array(0.01, np.float32),
        train["step"]: np.array(0.0, np.float32),
    }
    if train["soft_targets"]:
        feeds[train["soft_targets"]] = rng.standard_normal((n, *out_dims)).astype(np.float32)
    pos = 0
    params: dict[str, np.ndarray] = {}
    for (name, shape), pio in zip(compiled.exchanged, train["parameters"], strict=True):
        size = int(np.prod(shape))
        params[name] = compiled.initial[pos : pos + size].reshape(shape)
        feeds[pio["in"]] = params[name]
        pos += size
    for s in compiled.state:
        feeds[s.input] = np.zeros(s.shape, np.float32)
    for g in train["global"]:
        feeds[g["input"]] = params[g["parameter"]]
    pos = 0
    frozen: dict[str, np.ndarray] = {}
    for name, shape in compiled.frozen:
        size = int(np.prod(shape))
        frozen[name] = compiled.frozen_values[pos : pos + size].reshape(shape)
        pos += size
    feeds.update(frozen)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            compiled.train.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        result = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
        )
        evaluation = ort.InferenceSession(
            compiled.eval.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        eval_feeds = {ev["x"]: x, ev["y"]: y, **params, **frozen}
        evaluation.run(None, eval_feeds)
    except Exception as exc:  # ORT's own error types
        raise ModelBuildError(
            f"ONNX Runtime {ort.__version__} refuses the compiled graphs: {exc}"
        ) from exc
    if float(result[train["seen"]]) != n or not np.isfinite(float(result[train["loss_sum"]])):
        raise ModelBuildError(
            "the compiled training graph gives a non-finite loss on random "
            "data; check the model's initial weights"
        )


def write_portable(
    model: Any,
    work: Path,
    *,
    loss: LossSpec,
    optimizer: OptimizerSpec,
    trainable: Any,
    frozen: Any,
) -> tuple[CompiledModel, dict[str, Any], tuple[str, ...]]:
    """Compile and write the device files into ``work``; return the manifest sections."""
    import onnx

    compiled = compile_training(
        model, loss=loss, optimizer=optimizer, trainable=trainable, frozen=frozen
    )
    sections = manifest_sections(compiled, loss, optimizer)
    smoke_run(compiled, sections)
    onnx.save(compiled.train, str(work / TRAIN_FILE))
    onnx.save(compiled.eval, str(work / EVAL_FILE))
    compiled.initial.astype("<f4").tofile(work / INITIAL_FILE)
    files = [TRAIN_FILE, EVAL_FILE, INITIAL_FILE]
    if compiled.frozen:
        compiled.frozen_values.astype("<f4").tofile(work / FROZEN_FILE)
        files.append(FROZEN_FILE)
    return compiled, sections, tuple(files)
