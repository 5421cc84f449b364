"""Checking a model before compiling it: opset, IR version, operators, parameters, shapes.

``prepare_model`` refuses what cannot be compiled (a newer IR or opset, a custom-domain
operator, a subgraph, a name in the compiler's reserved ``fl::`` namespace, a parameter
named twice) and converts opsets below 17 up. ``select_parameters`` decides what is
trained, what is frozen and which running statistics travel with the weights;
``infer_shapes`` runs ONNX shape inference so the gradient rules know static shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph._builder import RESERVED_PREFIX, Shape

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 17
MAX_OPSET = 21
"""Graphs are written at the model's opset, raised to 17; 21 is the newest ONNX Runtime
1.19 (the oldest runtime fleetlearn supports) runs."""

MAX_IR_VERSION = 10


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelBuildError("model imports no ai.onnx opset")


def prepare_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Check the model and bring it to an opset the compiler writes (17..21)."""
    import onnx
    from onnx import version_converter

    if model.ir_version > MAX_IR_VERSION:
        raise ModelBuildError(
            f"model has ONNX IR version {model.ir_version}; fleetlearn writes IR <= "
            f"{MAX_IR_VERSION} so that every supported ONNX Runtime loads it: export it with "
            "onnx==1.17.0 (or set model.ir_version = 10 if it uses no newer IR feature)"
        )
    names = [init.name for init in model.graph.initializer]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ModelBuildError(f"parameter(s) named twice in the model: {', '.join(twice)}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelBuildError(f"model fails onnx.checker: {exc}") from exc
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ModelBuildError(
                f"node {node.name!r} ({node.domain}:{node.op_type}) is not a standard ONNX "
                "operator; a portable training graph uses the ai.onnx domain only"
            )
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ModelBuildError(
                f"node {node.name!r} ({node.op_type}) holds a subgraph; control flow "
                "inside the model cannot be trained"
            )
        for name in (*node.input, *node.output):
            if name.startswith(RESERVED_PREFIX):
                raise ModelBuildError(f"model value {name!r} uses the reserved prefix 'fl::'")
    opset = opset_of(model)
    if opset > MAX_OPSET:
        raise ModelBuildError(
            f"model opset {opset} is newer than {MAX_OPSET}, the newest "
            "fleetlearn compiles; export it at opset 17-21"
        )
    if opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise ModelBuildError(
                f"cannot convert the model from opset {opset} to {MIN_OPSET}: {exc}"
            ) from exc
    return model


def dims_of(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for dim in value.type.tensor_type.shape.dim:
        dims.append(int(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return tuple(dims)


def infer_shapes(model: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    """Shapes and element types of every value shape inference can name."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        raise ModelBuildError(f"ONNX shape inference fails on the model: {exc}") from exc
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        tensor = value.type.tensor_type
        types[value.name] = int(tensor.elem_type)
        if tensor.HasField("shape"):
            shapes[value.name] = tuple(
                int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor.shape.dim
            )
    for init in graph.initializer:
        types[init.name] = int(init.data_type)
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes, types


def constant_values(model: onnx.ModelProto, skip: set[str]) -> dict[str, np.ndarray]:
    from onnx import helper, numpy_helper

    values = {
        init.name: numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.name not in skip
    }
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(helper.get_attribute_value(attr))
    return values


@dataclass(frozen=True)
class _Selection:
    trainable: list[str]
    buffers: list[str]
    frozen: list[str]
    exchanged: list[str]


def select_parameters(
    model: onnx.ModelProto, trainable: Sequence[str] | None, frozen: Sequence[str]
) -> _Selection:
    """Trainable (default: every float initializer of rank >= 1 not frozen), running
    statistics of trainable BatchNormalization layers, and frozen parameters."""
    from onnx import TensorProto

    floats = [
        init.name
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= 1
    ]
    running = set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            running.update(node.input[3:5])
    candidates = [n for n in floats if n not in running]
    unknown = sorted(set(trainable or ()).union(frozen) - set(candidates))
    if unknown:
        raise ModelBuildError(
            f"no trainable float parameter named {', '.join(unknown)} in the model; "
            f"its parameters are {', '.join(candidates) or 'none'}"
        )
    both = sorted(set(trainable or ()).intersection(frozen))
    if both:
        raise ModelBuildError(f"parameters both trainable and frozen: {', '.join(both)}")
    chosen = set(trainable) if trainable is not None else {n for n in candidates if n not in frozen}
    if not chosen:
        raise ModelBuildError("model has no float initializer (rank >= 1) left to train")
    buffers: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and chosen.intersection(node.input[1:3]):
            missing = [n for n in node.input[3:5] if n not in floats]
            if missing:
                raise ModelBuildError(
                    f"BatchNormalization {node.name!r}: running statistics "
                    f"{missing} must be float initializers"
                )
            buffers.update(node.input[3:5])
    order_trainable = [n for n in floats if n in chosen]
    order_buffers = [n for n in floats if n in buffers]
    fixed = [n for n in floats if n not in chosen and n not in buffers]
    return _Selection(order_trainable, order_buffers, fixed, order_trainable + order_buffers)


def model_io(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    """The model's one float32 data input with a batch axis, and its one output."""
    from onnx import TensorProto

    graph = model.graph
    init_names = {init.name for init in graph.initializer}
    data_inputs = [v for v in graph.input if v.name not in init_names]
    if len(data_inputs) != 1:
        raise ModelBuildError(
            f"model must have exactly one data input, it has {[v.name for v in data_inputs]}"
        )
    if len(graph.output) != 1:
        raise ModelBuildError(
            "model must have exactly one output (the logits), it has "
            f"{[v.name for v in graph.output]}"
        )
    data_input, output = data_inputs[0], graph.output[0]
    if data_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelBuildError(f"model input {data_input.name!r} must be float32")
    in_shape, out_shape = dims_of(data_input), dims_of(output)
    if not in_shape:
        raise ModelBuildError(f"model input {data_input.name!r} has no batch axis (rank 0)")
    if isinstance(in_shape[0], int) and in_shape[0] != -1:
        raise ModelBuildError(
            f"model input {data_input.name!r} has a fixed batch size {in_shape[0]}: the "
            "training graph cannot batch it. Export the model with a dynamic first axis"
        )
    if not out_shape:
        raise ModelBuildError(f"model output {output.name!r} has no batch axis")
    return data_input, output
