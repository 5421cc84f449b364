"""A gradient graph for any small model, to check the gradient rules numerically.

``gradient_model`` turns a model with one output ``y`` into a model that outputs the
scalar ``sum(y * probe)`` (``probe`` is a new input shaped like ``y``) and its gradient
with respect to the chosen inputs or initializers, built with the same forward
rewrites and rules as the training graph. Comparing those gradients with central
finite differences of the same scalar checks every rule on the path, in float64 where
ONNX Runtime has float64 kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cloud_aggregator._traingraph import _rules_act, _rules_math, _rules_nn, _rules_shape  # noqa: F401
from cloud_aggregator._traingraph._autodiff import FwdOp, differentiate
from cloud_aggregator._traingraph._builder import GraphBuilder
from cloud_aggregator._traingraph._compile import _forward_graph_shapes
from cloud_aggregator._traingraph._prepare import (
    constant_values,
    infer_shapes,
    opset_of,
    prepare_model,
)
from cloud_aggregator._traingraph._train_forward import emit_forward

if TYPE_CHECKING:
    import onnx

PROBE, LOSS = "fl::probe", "fl::loss"


def grad_name(name: str) -> str:
    """The output holding the gradient with respect to ``name``."""
    return f"fl::grad/{name}"


def gradient_model(
    model: onnx.ModelProto, *, wrt: Sequence[str], float_type: int = 1
) -> onnx.ModelProto:
    """``model`` plus ``fl::loss = sum(output * fl::probe)`` and its gradients."""
    from onnx import helper

    model = prepare_model(model)
    graph = model.graph
    opset = opset_of(model)
    shapes, types = infer_shapes(model)
    b = GraphBuilder(opset=opset, shapes=shapes, elem_types=types, float_type=float_type)
    b.values.update(constant_values(model, set(wrt)))
    ops, _ = emit_forward(b, graph.node, frozenset(wrt))
    output = graph.output[0]
    first = len(b.nodes)
    b.add("ReduceSum", [b.op("Mul", output.name, PROBE)], outputs=[LOSS], keepdims=0)
    ops += [FwdOp(node) for node in b.nodes[first:]]
    inputs = [v for v in graph.input if v.name not in {i.name for i in graph.initializer}]
    as_inputs = [
        helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
        for i in graph.initializer
        if i.name in set(wrt)
    ]
    probe = helper.make_tensor_value_info(PROBE, output.type.tensor_type.elem_type, None)
    probe.type.tensor_type.shape.CopyFrom(output.type.tensor_type.shape)
    fixed = [i for i in graph.initializer if i.name not in set(wrt)]
    _forward_graph_shapes(model, b, [*inputs, *as_inputs, probe], fixed)
    grads = differentiate(ops, loss=LOSS, wrt=list(wrt), b=b, elem_types=b._types)
    for name, g in grads.items():
        b.add("Identity", [g], outputs=[grad_name(name)])
    outputs = [helper.make_tensor_value_info(LOSS, float_type, [])]
    outputs += [helper.make_tensor_value_info(grad_name(n), float_type, None) for n in wrt]
    out_graph = helper.make_graph(
        b.nodes,
        "gradcheck",
        [*inputs, *as_inputs, probe],
        outputs,
        initializer=fixed + b.initializers,
    )
    return helper.make_model(
        out_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )
