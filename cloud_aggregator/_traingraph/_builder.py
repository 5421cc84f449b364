"""Emitting standard ONNX nodes for the training-graph compiler.

``GraphBuilder`` appends nodes to one graph (the forward pass, then its gradient, then
the optimizer, all inside the body of the training ``Loop``) and keeps constants as
initializers of the *outer* graph, deduplicated by value, so the body reads them from
its outer scope instead of rebuilding them every step. It knows the shapes that ONNX
shape inference found for the forward values (dims are ints, symbolic names such as
``batch``, or None when unknown) and gives the opset-dependent forms of a few operators
(``ReduceMean`` takes its axes as an attribute before opset 18 and as an input after).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

Dim = int | str | None
Shape = tuple[Dim, ...]

RESERVED_PREFIX = "fl::"
"""Names the compiler creates start with this; a model may not use it."""

# Reductions whose ``axes`` moved from an attribute to an input at opset 18
# (ReduceSum moved at opset 13, which is below the compiler's minimum).
_AXES_INPUT_AT_18 = frozenset(
    {
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)


class GraphBuilder:
    """Appends nodes; owns fresh names, deduplicated constants and known shapes."""

    def __init__(
        self,
        *,
        opset: int,
        shapes: Mapping[str, Shape] | None = None,
        elem_types: Mapping[str, int] | None = None,
        prefix: str = RESERVED_PREFIX,
        float_type: int = 1,
    ) -> None:
        self.opset = opset
        self.float_type = float_type
        """ONNX element type of the graph's floats: 1 (float32), or 11 (float64, for tests)."""
        self.np_float: Any = np.float64 if float_type == 11 else np.float32
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._shapes: dict[str, Shape] = dict(shapes or {})
        self._types: dict[str, int] = dict(elem_types or {})
        self._prefix = prefix
        self._counter = itertools.count()
        self._consts: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self.values: dict[str, np.ndarray] = {}
        """Values known at build time (the model's constant initializers and Constant nodes)."""

    # -- names and shapes ---------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        """A new unique value name."""
        return f"{self._prefix}{hint}_{next(self._counter)}"

    def shape(self, name: str) -> Shape | None:
        """The shape shape inference found for ``name`` (None when unknown)."""
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self._shapes.get(name)
        return None if shape is None else len(shape)

    def set_shape(self, name: str, shape: Shape) -> None:
        self._shapes[name] = tuple(shape)

    def value(self, name: str) -> np.ndarray | None:
        """The build-time value of ``name`` when it is a constant, else None."""
        return self.values.get(name)

    def elem_type(self, name: str) -> int | None:
        """The ONNX element type of ``name`` when known."""
        return self._types.get(name)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """``name``'s shape when every dim is a known integer."""
        shape = self._shapes.get(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]

    # -- nodes --------------------------------------------------------------------------

    def add(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        outputs: int | Sequence[str] = 1,
        hint: str | None = None,
        **attrs: Any,
    ) -> list[str]:
        """Append one node; return its output names (fresh unless given)."""
        from onnx import helper

        if isinstance(outputs, int):
            names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        else:
            names = list(outputs)
        clean = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type), **clean)
        )
        return names

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs: Any) -> str:
        """Append a one-output node and return its output."""
        return self.add(op_type, inputs, hint=hint, **attrs)[0]

    def const(self, value: Any, dtype: Any = None) -> str:
        """An outer-graph initializer holding ``value`` (floats by default)."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=self.np_float if dtype is None else dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        name = self._consts.get(key)
        if name is None:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
            self._shapes[name] = tuple(int(d) for d in array.shape)
            self.values[name] = array
        return name

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant."""
        return self.const(list(values), np.int64)

    def scalar(self, value: float) -> str:
        """A float scalar constant (the graph's float type)."""
        return self.const(value)

    # -- opset-aware helpers ------------------------------------------------------------

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, *, keepdims: bool) -> str:
        """``op_type`` (ReduceSum, ReduceMean, ...) over ``axes`` (None: every axis)."""
        keep = 1 if keepdims else 0
        axes_list = None if axes is None else [int(a) for a in axes]
        if op_type == "ReduceSum" or (op_type in _AXES_INPUT_AT_18 and self.opset >= 18):
            if axes_list is None:
                return self.op(op_type, x, keepdims=keep)
            return self.op(op_type, x, self.ints(axes_list), keepdims=keep)
        return self.op(op_type, x, axes=axes_list, keepdims=keep)

    def reduce_dynamic(self, x: str, axes: str, *, keepdims: bool) -> str:
        """``ReduceSum`` over a runtime list of axes (an empty list reduces nothing)."""
        return self.op("ReduceSum", x, axes, keepdims=1 if keepdims else 0, noop_with_empty_axes=1)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.ints(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", x, self.ints(axes))

    def transpose(self, x: str, perm: Sequence[int], shape: Shape | None = None) -> str:
        """``Transpose``, or a free ``Reshape`` when only axes of extent 1 move."""
        known = shape if shape is not None else self.shape(x)
        if known is not None and len(known) == len(perm):
            moved = [known[p] for p in perm]
            big = [i for i in perm if known[i] != 1]
            unknown = [d for d in moved if not isinstance(d, int)]
            if big == sorted(big) and len(unknown) <= 1:
                target = [d if isinstance(d, int) else -1 for d in moved]
                out = self.op("Reshape", x, self.ints(target))
                self.set_shape(out, tuple(moved))
                return out
        out = self.op("Transpose", x, perm=list(perm))
        if known is not None and len(known) == len(perm):
            self.set_shape(out, tuple(known[p] for p in perm))
        return out

    def shape_of(self, x: str) -> str:
        return self.op("Shape", x)

    def zeros_like(self, x: str) -> str:
        """Zeros of ``x``'s shape (float32), static when the shape is known."""
        static = self.static_shape(x)
        if static is not None:
            return self.const(np.zeros(static))
        return self.op("ConstantOfShape", self.shape_of(x), value=self.zero_tensor())

    def zero_tensor(self) -> onnx.TensorProto:
        """A one-element zero of the graph's float type (``ConstantOfShape``'s value)."""
        from onnx import helper

        return helper.make_tensor("value", self.float_type, [1], [0.0])

    def to_float(self, x: str) -> str:
        """``Cast`` to the graph's float type."""
        return self.op("Cast", x, to=self.float_type)

    def total(self, terms: Sequence[str]) -> str:
        """The sum of gradient contributions (one term is returned as is)."""
        if len(terms) == 1:
            return terms[0]
        return self.op("Sum", *terms)
