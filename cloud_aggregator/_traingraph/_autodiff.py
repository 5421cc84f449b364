"""Reverse-mode differentiation of an ONNX forward pass, one gradient rule per operator.

The forward pass is a list of ``FwdOp``: a node as a rule sees it (inputs, outputs,
attributes) and what the forward pass saved for the rule (MaxPool's argmax indices,
a normalisation's inverse standard deviation). Most ops are their own ONNX node; a
few are rewritten for training (``_train_forward.TRAIN_FORWARD``), and then ``node`` is a
pseudo node in the ``fleetlearn`` domain that is never emitted.

``differentiate`` walks the forward pass backwards from the scalar loss and, for every
op through which the loss depends on a trainable parameter, calls the rule registered
for its type in ``RULES``. A rule gets the output gradients (None where an output does
not reach the loss) and returns one gradient per input (None where none is needed);
every rule emits standard ``ai.onnx`` nodes only. Contributions to a value used twice
are summed. An op on a gradient path without a rule is a ``ModelBuildError`` naming the
node and its type, raised here at build time and never on a device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph._builder import GraphBuilder

if TYPE_CHECKING:
    import onnx

FLOAT_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16

# Ops whose outputs never carry a gradient: shapes, comparisons, indices, constants,
# and steps that are flat almost everywhere (Floor, Round, Sign).
NON_DIFFERENTIABLE = frozenset(
    {
        "Shape",
        "Size",
        "Constant",
        "ConstantOfShape",
        "Range",
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "Not",
        "And",
        "Or",
        "Xor",
        "ArgMax",
        "ArgMin",
        "NonZero",
        "OneHot",
        "IsNaN",
        "IsInf",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "EyeLike",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Bernoulli",
    }
)


@dataclass
class FwdOp:
    """One step of the forward pass as the gradient pass sees it."""

    node: onnx.NodeProto
    saved: dict[str, str] = field(default_factory=dict)


@dataclass
class GradContext:
    """What a rule may use: the builder, the op, which inputs need a gradient."""

    b: GraphBuilder
    op: FwdOp
    needs: tuple[bool, ...]

    @property
    def node(self) -> onnx.NodeProto:
        return self.op.node

    def attr(self, name: str, default: Any = None) -> Any:
        """A node attribute's Python value (``default`` when absent)."""
        from onnx import helper

        for attribute in self.op.node.attribute:
            if attribute.name == name:
                return helper.get_attribute_value(attribute)
        return default

    def input(self, index: int) -> str | None:
        """The node's ``index``-th input name (None when absent or empty)."""
        inputs = self.op.node.input
        return inputs[index] if index < len(inputs) and inputs[index] else None

    def need(self, index: int) -> bool:
        return index < len(self.needs) and self.needs[index]

    def inp(self, index: int) -> str:
        """The ``index``-th input, which must be present."""
        name = self.input(index)
        assert name is not None, f"{self.node.op_type} has no input {index}"
        return name

    def out(self, index: int = 0) -> str:
        """The ``index``-th output."""
        return self.node.output[index]


GradRule = Callable[[GradContext, Sequence[str | None]], Sequence[str | None]]

RULES: dict[str, GradRule] = {}
"""Op type -> gradient rule. Filled by the ``_rules_*`` modules when they are imported."""


def rule(*op_types: str) -> Callable[[GradRule], GradRule]:
    """Register a gradient rule for one or more op types."""

    def register(fn: GradRule) -> GradRule:
        for op_type in op_types:
            if op_type in RULES:
                raise RuntimeError(f"two gradient rules for {op_type}")
            RULES[op_type] = fn
        return fn

    return register


def supported_ops() -> list[str]:
    """Every op type that has a gradient rule, plus the non-differentiable ones."""
    return sorted(set(RULES) | NON_DIFFERENTIABLE)


def _describe(node: onnx.NodeProto) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"


def requires_grad(
    ops: Sequence[FwdOp], wrt: Sequence[str], elem_types: Mapping[str, int]
) -> set[str]:
    """Values that depend on a trainable parameter through differentiable ops."""
    live = set(wrt)
    for op in ops:
        node = op.node
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if any(name in live for name in node.input if name):
            for out in node.output:
                if out and elem_types.get(out, 1) in FLOAT_TYPES:
                    live.add(out)
    return live


def differentiate(
    ops: Sequence[FwdOp],
    *,
    loss: str,
    wrt: Sequence[str],
    b: GraphBuilder,
    elem_types: Mapping[str, int],
) -> dict[str, str]:
    """Emit the gradient of scalar ``loss`` w.r.t. each of ``wrt``; return name -> gradient."""
    live = requires_grad(ops, wrt, elem_types)
    if loss not in live:
        raise ModelBuildError("the loss does not depend on any trainable parameter")
    grads: dict[str, list[str]] = {loss: [b.scalar(1.0)]}
    for op in reversed(ops):
        node = op.node
        if not any(out in grads for out in node.output if out):
            continue
        needs = tuple(bool(name) and name in live for name in node.input)
        if not any(needs):
            continue
        fn = RULES.get(node.op_type)
        if fn is None:
            raise ModelBuildError(
                f"{_describe(node)} is on the path from a trainable parameter to the loss, "
                f"and fleetlearn has no gradient rule for {node.op_type}; supported operators: "
                f"{', '.join(sorted(RULES))}. Freeze the parameters before it, or rewrite "
                "the model with supported operators"
            )
        gys = [b.total(grads.pop(out)) if out in grads else None for out in node.output]
        gxs = fn(GradContext(b, op, needs), gys)
        for name, need, g in zip(node.input, needs, gxs, strict=False):
            if need and g is not None:
                grads.setdefault(name, []).append(g)
    result: dict[str, str] = {}
    unused = [name for name in wrt if name not in grads]
    if unused:
        raise ModelBuildError(
            f"trainable parameter(s) {', '.join(unused)} do not affect the loss; freeze them"
        )
    for name in wrt:
        result[name] = b.total(grads[name])
    return result
