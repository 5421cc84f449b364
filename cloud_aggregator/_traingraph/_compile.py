"""Compile an inference ONNX model into a portable training graph and an eval graph.

This module is longer than most (~430 lines) because it is the one place that
assembles the pieces into the two graphs and their input/output contract; splitting
the assembly would scatter that contract over several files.

The training graph runs a whole sequence of mini-batch steps in one ONNX ``Loop``:

    inputs   fl::x [N, ...]            every local sample (float32)
             fl::labels / fl::targets  the primary loss target per sample
             fl::soft_targets          teacher logits (distillation only)
             fl::sample_weight [N]     per-sample weights (ones for a plain mean)
             fl::order [T] int64       sample indices in visiting order (epochs concatenated)
             fl::starts, fl::ends [S]  step s trains on order[starts[s]:ends[s]]
             fl::lr, fl::step []       learning rate; steps taken so far (float32)
             fl::in/<p>                each exchanged tensor (trainable, then running stats)
             fl::state/<p>/<k>         optimizer state (zeros when a task starts)
             fl::global/<p>            the global weights (FedProx only)
             <frozen>                  frozen parameters, under their own names
    outputs  fl::out/<p>, fl::state_out/<p>/<k>, fl::step_out,
             fl::loss_sum (sum of batch loss x batch size), fl::correct_sum, fl::seen

Every node is a standard ``ai.onnx`` operator at the model's opset (at least 17), so
any ONNX Runtime build runs it with a plain inference session. The eval graph is the
inference model plus the primary loss and a correct-prediction count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph import _rules_act, _rules_math, _rules_nn, _rules_shape  # noqa: F401
from cloud_aggregator._traingraph._autodiff import FwdOp, differentiate
from cloud_aggregator._traingraph._builder import GraphBuilder
from cloud_aggregator._traingraph._losses import LABELS, SOFT_TARGETS, LossSpec, build_loss
from cloud_aggregator._traingraph._optim import OptimizerSpec
from cloud_aggregator._traingraph._train_forward import emit_forward

if TYPE_CHECKING:
    import onnx

from cloud_aggregator._traingraph._prepare import (
    MAX_IR_VERSION,
    MIN_OPSET,
    _Selection,
    constant_values,
    dims_of,
    infer_shapes,
    model_io,
    opset_of,
    prepare_model,
    select_parameters,
)

X, SAMPLE_WEIGHT = "fl::x", "fl::sample_weight"
ORDER, STARTS, ENDS, LR, STEP = "fl::order", "fl::starts", "fl::ends", "fl::lr", "fl::step"
STEP_OUT, LOSS_SUM, CORRECT_SUM, SEEN = (
    "fl::step_out",
    "fl::loss_sum",
    "fl::correct_sum",
    "fl::seen",
)
EVAL_LOSS, EVAL_CORRECT = "fl::loss", "fl::correct"
TARGET_INPUTS = {LABELS: "fl::labels", "targets": "fl::targets", SOFT_TARGETS: "fl::soft_targets"}


@dataclass(frozen=True, kw_only=True)
class StateTensor:
    """One optimizer state tensor: zeros of ``shape`` when a task starts."""

    input: str
    output: str
    shape: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class CompiledModel:
    """Both graphs and everything a trainer needs to drive them."""

    train: onnx.ModelProto
    eval: onnx.ModelProto
    opset: int
    exchanged: tuple[tuple[str, tuple[int, ...]], ...]
    """Tensors in the flat vector devices exchange: trainable, then running statistics."""
    buffers: tuple[str, ...]
    """Names among ``exchanged`` updated by the forward pass, not by gradients."""
    frozen: tuple[tuple[str, tuple[int, ...]], ...]
    initial: np.ndarray
    frozen_values: np.ndarray
    state: tuple[StateTensor, ...]
    prox: bool
    input_name: str
    input_shape: tuple[int | str, ...]
    output_name: str
    output_shape: tuple[int | str, ...]
    label_key: str
    label_dtype: str


# -- assembly --------------------------------------------------------------------------------


def _value_info(
    name: str, elem_type: int, shape: Sequence[int | str | None]
) -> onnx.ValueInfoProto:
    from onnx import helper

    return helper.make_tensor_value_info(
        name, elem_type, [d if d is not None else None for d in shape]
    )


def _forward_graph_shapes(
    model: onnx.ModelProto,
    b: GraphBuilder,
    inputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
) -> None:
    """Run shape inference over what ``b`` emitted so far; record the shapes in ``b``."""
    from onnx import helper

    graph = helper.make_graph(
        list(b.nodes), "forward", inputs, [], initializer=initializers + list(b.initializers)
    )
    probe = helper.make_model(
        graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )
    shapes, types = infer_shapes(probe)
    for name, shape in shapes.items():
        b.set_shape(name, shape)
    b._types.update(types)


def compile_training(
    model: onnx.ModelProto,
    *,
    loss: LossSpec,
    optimizer: OptimizerSpec,
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] = (),
) -> CompiledModel:
    """Compile ``model`` (one float input with a batch axis, one output) for training."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = prepare_model(model)
    graph = model.graph
    opset = max(opset_of(model), MIN_OPSET)
    data_input, output = model_io(model)
    in_shape, out_shape = dims_of(data_input), dims_of(output)
    sel = select_parameters(model, trainable, frozen)
    shapes, types = infer_shapes(model)
    params = {init.name: init for init in graph.initializer}
    param_shape = {n: tuple(int(d) for d in params[n].dims) for n in params}

    body = GraphBuilder(opset=opset, shapes=shapes, elem_types=types)
    body.values.update(constant_values(model, set(sel.exchanged) | set(sel.frozen)))
    ops, buffer_out = emit_forward(body, graph.node, frozenset(sel.trainable))
    # Loss on the model output.
    classes = out_shape[-1] if isinstance(out_shape[-1], int) else 0
    if loss.label_key == LABELS and classes < 1:
        raise ModelBuildError(f"output {output.name!r} needs a known class axis for cross-entropy")
    label_dtype = "int64" if loss.label_key == LABELS else "float32"
    batch_target = {
        LABELS: "fl::batch_labels",
        "targets": "fl::batch_targets",
        SOFT_TARGETS: "fl::batch_soft_targets",
    }
    batch_weight = "fl::batch_sample_weight"
    global_names = {p: f"fl::global/{p}" for p in sel.trainable} if loss.prox_mu > 0 else {}
    first_loss_node = len(body.nodes)
    loss_out = build_loss(
        body,
        loss,
        logits=output.name,
        output_rank=len(out_shape),
        classes=classes,
        targets=batch_target,
        sample_weight=batch_weight,
        prox=[(p, global_names[p]) for p in sel.trainable] if global_names else (),
    )
    ops += [FwdOp(node) for node in body.nodes[first_loss_node:]]
    # Shape inference over forward + loss, so the gradient rules know static shapes.
    probe_inputs = [_value_info(n, TensorProto.FLOAT, param_shape[n]) for n in sel.exchanged]
    probe_inputs += [_value_info(n, TensorProto.FLOAT, param_shape[n]) for n in sel.frozen]
    probe_inputs.append(_value_info(data_input.name, TensorProto.FLOAT, ["batch", *in_shape[1:]]))
    label_type = TensorProto.INT64 if label_dtype == "int64" else TensorProto.FLOAT
    label_shape = (
        ["batch", *out_shape[1:-1]] if label_dtype == "int64" else ["batch", *out_shape[1:]]
    )
    probe_inputs.append(_value_info(batch_target[loss.label_key], label_type, label_shape))
    if loss.needs_soft_targets:
        probe_inputs.append(
            _value_info(batch_target[SOFT_TARGETS], TensorProto.FLOAT, ["batch", *out_shape[1:]])
        )
    probe_inputs.append(_value_info(batch_weight, TensorProto.FLOAT, ["batch"]))
    probe_inputs += [
        _value_info(g, TensorProto.FLOAT, param_shape[p]) for p, g in global_names.items()
    ]
    fixed_inits = [
        init for init in graph.initializer if init.name not in set(sel.exchanged) | set(sel.frozen)
    ]
    _forward_graph_shapes(model, body, probe_inputs, fixed_inits)
    # Gradient, then the optimizer.
    grads = differentiate(
        ops, loss=loss_out.loss, wrt=sel.trainable, b=body, elem_types=body._types
    )
    step_next = body.op("Add", "fl::body_step", body.scalar(1.0))
    state_tensors: list[StateTensor] = []
    body_state_in: list[str] = []
    body_state_out: list[str] = []
    new_params: dict[str, str] = {}
    for p in sel.trainable:
        kinds = optimizer.state()
        ins = [f"fl::body_state/{p}/{k}" for k in kinds]
        new_p, outs = optimizer.step(body, p, grads[p], ins, "fl::body_lr", step_next)
        new_params[p] = new_p
        for k, i, o in zip(kinds, ins, outs, strict=True):
            state_tensors.append(
                StateTensor(
                    input=f"fl::state/{p}/{k}",
                    output=f"fl::state_out/{p}/{k}",
                    shape=param_shape[p],
                )
            )
            body_state_in.append(i)
            body_state_out.append(o)
    for buf in sel.buffers:
        new_params[buf] = buffer_out[buf]
    # Running totals.
    loss_total = body.op("Add", "fl::body_loss_sum", body.op("Mul", loss_out.loss, loss_out.count))
    correct_total = body.op("Add", "fl::body_correct_sum", loss_out.correct)
    seen_total = body.op("Add", "fl::body_seen", loss_out.count)
    # Batch gathering, placed before everything else in the body.
    gather = GraphBuilder(opset=opset, prefix="fl::g_")
    start = gather.unsqueeze(gather.op("Gather", STARTS, "fl::iter", axis=0), [0])
    end = gather.unsqueeze(gather.op("Gather", ENDS, "fl::iter", axis=0), [0])
    index = gather.op("Slice", ORDER, start, end, gather.ints([0]))
    gather.add("Gather", [X, index], outputs=[data_input.name], axis=0)
    target_inputs = {loss.label_key: TARGET_INPUTS[loss.label_key]}
    if loss.needs_soft_targets:
        target_inputs[SOFT_TARGETS] = TARGET_INPUTS[SOFT_TARGETS]
    for key, source in target_inputs.items():
        gather.add("Gather", [source, index], outputs=[batch_target[key]], axis=0)
    gather.add("Gather", [SAMPLE_WEIGHT, index], outputs=[batch_weight], axis=0)
    cond_out = helper.make_node("Identity", ["fl::cond"], ["fl::cond_out"], name="fl::cond")
    float_ = TensorProto.FLOAT
    body_inputs = [
        helper.make_tensor_value_info("fl::iter", TensorProto.INT64, []),
        helper.make_tensor_value_info("fl::cond", TensorProto.BOOL, []),
    ]
    body_inputs += [_value_info(n, float_, param_shape[n]) for n in sel.exchanged]
    body_inputs += [
        _value_info(i, float_, s.shape) for i, s in zip(body_state_in, state_tensors, strict=True)
    ]
    body_inputs += [
        _value_info(n, float_, [])
        for n in ("fl::body_step", "fl::body_loss_sum", "fl::body_correct_sum", "fl::body_seen")
    ]
    # Body outputs are the computed values themselves: an Identity to rename them would
    # copy every parameter once per step.
    body_outputs = [helper.make_tensor_value_info("fl::cond_out", TensorProto.BOOL, [])]
    body_outputs += [_value_info(new_params[n], float_, param_shape[n]) for n in sel.exchanged]
    body_outputs += [
        _value_info(o, float_, s.shape) for o, s in zip(body_state_out, state_tensors, strict=True)
    ]
    body_outputs += [
        _value_info(n, float_, []) for n in (step_next, loss_total, correct_total, seen_total)
    ]
    lr_alias = helper.make_node("Identity", [LR], ["fl::body_lr"], name="fl::body_lr")
    body_graph = helper.make_graph(
        [lr_alias, *gather.nodes, *body.nodes, cond_out], "fl_train_step", body_inputs, body_outputs
    )
    # The outer graph: one Loop over the steps.
    outer = GraphBuilder(opset=opset, prefix="fl::o_")
    trip = outer.op("Squeeze", outer.op("Shape", STARTS), outer.ints([0]))
    zero = outer.scalar(0.0)
    loop_in = (
        [f"fl::in/{n}" for n in sel.exchanged]
        + [s.input for s in state_tensors]
        + [STEP, zero, zero, zero]
    )
    loop_out = (
        [f"fl::out/{n}" for n in sel.exchanged]
        + [s.output for s in state_tensors]
        + [STEP_OUT, LOSS_SUM, CORRECT_SUM, SEEN]
    )
    outer.add("Loop", [trip, "", *loop_in], outputs=loop_out, body=body_graph)
    n_feat = list(in_shape[1:])
    train_inputs = [_value_info(X, float_, ["N", *n_feat])]
    for key, outer_name in target_inputs.items():
        if key == LABELS:
            train_inputs.append(_value_info(outer_name, TensorProto.INT64, ["N", *out_shape[1:-1]]))
        else:
            train_inputs.append(_value_info(outer_name, float_, ["N", *out_shape[1:]]))
    train_inputs.append(_value_info(SAMPLE_WEIGHT, float_, ["N"]))
    train_inputs += [
        _value_info(n, TensorProto.INT64, [d])
        for n, d in ((ORDER, "T"), (STARTS, "S"), (ENDS, "S"))
    ]
    train_inputs += [_value_info(LR, float_, []), _value_info(STEP, float_, [])]
    train_inputs += [_value_info(f"fl::in/{n}", float_, param_shape[n]) for n in sel.exchanged]
    train_inputs += [_value_info(s.input, float_, s.shape) for s in state_tensors]
    train_inputs += [_value_info(g, float_, param_shape[p]) for p, g in global_names.items()]
    train_inputs += [_value_info(n, float_, param_shape[n]) for n in sel.frozen]
    train_outputs = [_value_info(f"fl::out/{n}", float_, param_shape[n]) for n in sel.exchanged]
    train_outputs += [_value_info(s.output, float_, s.shape) for s in state_tensors]
    train_outputs += [_value_info(n, float_, []) for n in (STEP_OUT, LOSS_SUM, CORRECT_SUM, SEEN)]
    train_graph = helper.make_graph(
        outer.nodes,
        "fleetlearn_train",
        train_inputs,
        train_outputs,
        initializer=fixed_inits + body.initializers + outer.initializers + gather.initializers,
    )
    train = helper.make_model(
        train_graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=MAX_IR_VERSION,
        producer_name="fleetlearn",
    )
    eval_model = _eval_graph(
        model,
        sel,
        loss,
        opset,
        data_input.name,
        output.name,
        in_shape,
        out_shape,
        param_shape,
        label_dtype,
        classes,
    )
    for built, what in ((train, "training"), (eval_model, "eval")):
        try:
            onnx.checker.check_model(built, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ModelBuildError(
                f"the compiled {what} graph is invalid ({exc}); please report this model"
            ) from exc
    arrays = {
        init.name: numpy_helper.to_array(init).astype(np.float32) for init in graph.initializer
    }
    flat = [arrays[n].ravel() for n in sel.exchanged]
    fixed = [arrays[n].ravel() for n in sel.frozen]
    return CompiledModel(
        train=train,
        eval=eval_model,
        opset=opset,
        exchanged=tuple((n, param_shape[n]) for n in sel.exchanged),
        buffers=tuple(sel.buffers),
        frozen=tuple((n, param_shape[n]) for n in sel.frozen),
        initial=np.concatenate(flat) if flat else np.zeros(0, np.float32),
        frozen_values=np.concatenate(fixed) if fixed else np.zeros(0, np.float32),
        state=tuple(state_tensors),
        prox=bool(global_names),
        input_name=data_input.name,
        input_shape=in_shape,
        output_name=output.name,
        output_shape=out_shape,
        label_key=loss.label_key,
        label_dtype=label_dtype,
    )


def _eval_graph(
    model: onnx.ModelProto,
    sel: _Selection,
    loss: LossSpec,
    opset: int,
    input_name: str,
    output_name: str,
    in_shape: tuple[int | str, ...],
    out_shape: tuple[int | str, ...],
    param_shape: dict[str, tuple[int, ...]],
    label_dtype: str,
    classes: int,
) -> onnx.ModelProto:
    """Inference forward + the primary loss (mean) + the correct count, one batch per run."""
    from onnx import TensorProto, helper

    graph = model.graph
    b = GraphBuilder(opset=opset, prefix="fl::e_")
    label = TARGET_INPUTS[loss.label_key]
    result = build_loss(
        b,
        loss,
        logits=output_name,
        output_rank=len(out_shape),
        classes=classes,
        targets={loss.label_key: label},
        sample_weight=None,
        primary_only=True,
    )
    b.add("Identity", [result.loss], outputs=[EVAL_LOSS])
    b.add("Identity", [result.correct], outputs=[EVAL_CORRECT])
    float_ = TensorProto.FLOAT
    inputs = [_value_info(input_name, float_, ["batch", *in_shape[1:]])]
    if label_dtype == "int64":
        inputs.append(_value_info(label, TensorProto.INT64, ["batch", *out_shape[1:-1]]))
    else:
        inputs.append(_value_info(label, float_, ["batch", *out_shape[1:]]))
    inputs += [_value_info(n, float_, param_shape[n]) for n in (*sel.exchanged, *sel.frozen)]
    outputs = [
        _value_info(EVAL_LOSS, float_, []),
        _value_info(output_name, float_, ["batch", *out_shape[1:]]),
        _value_info(EVAL_CORRECT, float_, []),
    ]
    fixed = [
        init for init in graph.initializer if init.name not in set(sel.exchanged) | set(sel.frozen)
    ]
    eval_graph = helper.make_graph(
        [*graph.node, *b.nodes],
        "fleetlearn_eval",
        inputs,
        outputs,
        initializer=fixed + b.initializers,
    )
    return helper.make_model(
        eval_graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=MAX_IR_VERSION,
        producer_name="fleetlearn",
    )
