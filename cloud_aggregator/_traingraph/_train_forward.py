"""Training-mode forward passes: the ops that behave differently in training.

BatchNormalization (with a trainable scale or bias) normalises with the batch's
statistics and updates its running mean and variance (ONNX semantics: population
variance, ``running = running*momentum + batch*(1-momentum)``); Dropout drops at its
ratio with ``RandomUniformLike`` (a standard op, so it runs on every build); MaxPool and
LayerNormalization keep the outputs their gradients need (argmax indices; mean and
inverse standard deviation). Each rewrite emits its nodes and returns the ``FwdOp``
the gradient pass sees (a pseudo node in the ``fleetlearn`` domain for the first two,
whose rules live in ``_rules_nn``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph._autodiff import FwdOp
from cloud_aggregator._traingraph._builder import GraphBuilder

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class TrainForwardContext:
    """What a training-mode rewrite needs besides the node."""

    b: GraphBuilder
    trainable: frozenset[str]
    buffers: dict[str, str]
    """Running-statistics input name -> the name of its updated value (filled here)."""


TrainForward = Callable[[TrainForwardContext, "onnx.NodeProto"], FwdOp | None]


def _node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pseudo(op_type: str, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.NodeProto:
    from onnx import helper

    return helper.make_node(op_type, list(inputs), list(outputs), domain="fleetlearn")


def _batch_norm_forward(tc: TrainForwardContext, node: onnx.NodeProto) -> FwdOp | None:
    b = tc.b
    inputs = list(node.input)
    x, scale, bias, mean_in, var_in = inputs[:5]
    if scale not in tc.trainable and bias not in tc.trainable:
        return None  # frozen: inference mode, running statistics untouched
    attrs = _node_attrs(node)
    eps = float(attrs.get("epsilon", 1e-5))
    momentum = float(attrs.get("momentum", 0.9))
    rank = b.rank(x)
    if rank is None or rank < 2:
        raise ModelBuildError(f"BatchNormalization {node.name!r}: input rank unknown")
    axes = [0, *range(2, rank)]
    bshape = [1, -1] + [1] * (rank - 2)
    mu = b.reduce("ReduceMean", x, axes, keepdims=True)
    xc = b.op("Sub", x, mu)
    var = b.reduce("ReduceMean", b.op("Mul", xc, xc), axes, keepdims=True)
    invstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.scalar(eps))))
    xhat = b.op("Mul", xc, invstd)
    scale_b = b.op("Reshape", scale, b.ints(bshape))
    y = node.output[0]
    b.add("Add", [b.op("Mul", xhat, scale_b), b.op("Reshape", bias, b.ints(bshape))], outputs=[y])
    keep, take = b.scalar(momentum), b.scalar(1.0 - momentum)
    for running, batch in ((mean_in, mu), (var_in, var)):
        flat = b.op("Reshape", batch, b.ints([-1]))
        tc.buffers[running] = b.op("Add", b.op("Mul", running, keep), b.op("Mul", flat, take))
    saved = {
        "xhat": xhat,
        "invstd": invstd,
        "scale_b": scale_b,
        "axes": ",".join(str(a) for a in axes),
    }
    return FwdOp(_pseudo("fl.BatchNormTrain", [x, scale, bias], [y]), saved)


def _dropout_forward(tc: TrainForwardContext, node: onnx.NodeProto) -> FwdOp | None:
    b = tc.b
    inputs = list(node.input)
    x = inputs[0]
    ratio = 0.5
    attrs = _node_attrs(node)
    if "ratio" in attrs:
        ratio = float(attrs["ratio"])
    if len(inputs) > 1 and inputs[1]:
        value = b.value(inputs[1])
        if value is None:
            raise ModelBuildError(f"Dropout {node.name!r}: its ratio must be a constant")
        ratio = float(value)
    if not 0.0 <= ratio < 1.0:
        raise ModelBuildError(f"Dropout {node.name!r}: ratio {ratio} outside [0, 1)")
    outputs = list(node.output)
    scale = b.scalar(1.0 / (1.0 - ratio))
    # Seeded from the node's name: a session draws the same masks for the same calls.
    seed = float(zlib.crc32(f"{node.name}/{x}".encode()) % (1 << 24))
    noise = b.op("RandomUniformLike", x, dtype=b.float_type, seed=seed)
    keep = b.op("GreaterOrEqual", noise, b.scalar(ratio))
    zero = b.scalar(0.0)
    b.add("Where", [keep, b.op("Mul", x, scale), zero], outputs=[outputs[0]])
    if len(outputs) > 1 and outputs[1]:
        b.add("Identity", [keep], outputs=[outputs[1]])
    return FwdOp(_pseudo("fl.DropoutTrain", [x], [outputs[0]]), {"keep": keep, "scale": scale})


def _max_pool_forward(tc: TrainForwardContext, node: onnx.NodeProto) -> FwdOp | None:
    from onnx import helper

    outputs = list(node.output)
    if len(outputs) < 2 or not outputs[1]:
        indices = tc.b.fresh("maxpool_indices")
        clone = helper.make_node(
            "MaxPool",
            list(node.input),
            [outputs[0], indices],
            name=node.name or tc.b.fresh("MaxPool"),
        )
        clone.attribute.extend(node.attribute)
        node = clone
    else:
        indices = outputs[1]
    tc.b.nodes.append(node)
    return FwdOp(node, {"indices": indices})


def _layer_norm_forward(tc: TrainForwardContext, node: onnx.NodeProto) -> FwdOp | None:
    from onnx import helper

    outputs = list(node.output)
    while len(outputs) < 3:
        outputs.append("")
    mean = outputs[1] or tc.b.fresh("ln_mean")
    invstd = outputs[2] or tc.b.fresh("ln_invstd")
    clone = helper.make_node(
        "LayerNormalization",
        list(node.input),
        [outputs[0], mean, invstd],
        name=node.name or tc.b.fresh("LayerNorm"),
    )
    clone.attribute.extend(node.attribute)
    tc.b.nodes.append(clone)
    return FwdOp(clone, {"mean": mean, "invstd": invstd})


TRAIN_FORWARD: dict[str, TrainForward] = {
    "BatchNormalization": _batch_norm_forward,
    "Dropout": _dropout_forward,
    "MaxPool": _max_pool_forward,
    "LayerNormalization": _layer_norm_forward,
}
"""Op type -> its training-mode forward pass (None: the node runs as in inference)."""


def emit_forward(
    b: GraphBuilder, nodes: Sequence[onnx.NodeProto], trainable: frozenset[str]
) -> tuple[list[FwdOp], dict[str, str]]:
    """Emit a model's nodes in training mode; return the forward ops and the updated
    running statistics (input name -> new value)."""
    buffers: dict[str, str] = {}
    tc = TrainForwardContext(b, trainable, buffers)
    ops: list[FwdOp] = []
    for node in nodes:
        rewrite = TRAIN_FORWARD.get(node.op_type)
        op = rewrite(tc, node) if rewrite is not None else None
        if op is None:
            b.nodes.append(node)
            op = FwdOp(node)
        ops.append(op)
    return ops, buffers
