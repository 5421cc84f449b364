"""Gradient rules: reshaping, transposing, joining, slicing and gathering.

Reshape-like ops send the gradient back through ``Reshape`` to the input's run-time
shape. ``Slice`` and ``Gather`` use one general construction: the same op applied to
a tensor of flat element indices tells where every output element came from, and
``ScatterElements`` with ``reduction="add"`` sends each output gradient there (repeated
indices, as an embedding lookup has, add up). That covers negative steps, clamped
bounds and any gather axis with two standard ops and no special cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph._autodiff import GradContext, rule
from cloud_aggregator._traingraph._builder import GraphBuilder

Grads = Sequence[str | None]


def _x(ctx: GradContext) -> str:
    name = ctx.input(0)
    assert name is not None
    return name


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    x = _x(ctx)
    g = ctx.b.op("Reshape", gys[0], ctx.b.shape_of(x))
    return [g] + [None] * (len(ctx.node.input) - 1)


@rule("Transpose")
def _transpose(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    perm = ctx.attr("perm")
    if perm is None:
        rank = ctx.b.rank(_x(ctx))
        if rank is None:
            raise ModelBuildError(f"Transpose {ctx.node.name!r}: input rank unknown")
        perm = list(reversed(range(rank)))
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[int(p)] = i
    return [ctx.b.op("Transpose", gys[0], perm=inverse)]


def _sizes_along(b: GraphBuilder, names: Sequence[str], axis: int) -> str:
    """A 1-D int64 tensor of each input's extent along ``axis`` (static when known)."""
    static = []
    for name in names:
        shape = b.shape(name)
        dim = None if shape is None else shape[axis]
        static.append(dim if isinstance(dim, int) else None)
    if all(d is not None for d in static):
        return b.ints([int(d) for d in static])  # type: ignore[arg-type]
    parts = [b.op("Gather", b.shape_of(n), b.ints([axis]), axis=0) for n in names]
    return parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=0)


@rule("Concat")
def _concat(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b = ctx.b
    names = list(ctx.node.input)
    rank = b.rank(names[0])
    if rank is None:
        raise ModelBuildError(f"Concat {ctx.node.name!r}: input rank unknown")
    axis = int(ctx.attr("axis")) % rank
    sizes = _sizes_along(b, names, axis)
    parts = b.add("Split", [gy, sizes], outputs=len(names), axis=axis)
    return [part if ctx.need(i) else None for i, part in enumerate(parts)]


@rule("Split")
def _split(ctx: GradContext, gys: Grads) -> Grads:
    b = ctx.b
    x = _x(ctx)
    rank = b.rank(x)
    if rank is None:
        raise ModelBuildError(f"Split {ctx.node.name!r}: input rank unknown")
    axis = int(ctx.attr("axis", 0)) % rank
    pieces = [
        g if g is not None else b.zeros_like(out)
        for g, out in zip(gys, ctx.node.output, strict=True)
    ]
    return [b.op("Concat", *pieces, axis=axis)] + [None] * (len(ctx.node.input) - 1)


def _flat_index_grad(ctx: GradContext, gy: str, forward: str, extra: Sequence[str]) -> str:
    """Scatter-add ``gy`` to where ``forward`` (Slice or Gather) took each element from."""
    b = ctx.b
    x = _x(ctx)
    flat = b.op("Range", b.const(0, np.int64), b.op("Size", x), b.const(1, np.int64))
    positions = b.op("Reshape", flat, b.shape_of(x))
    attrs: dict[str, Any] = {}
    if forward == "Gather":
        attrs["axis"] = int(ctx.attr("axis", 0))
    picked = b.op(forward, positions, *extra, **attrs)
    return scatter_add(b, x, picked, gy)


def scatter_add(b: GraphBuilder, x: str, positions: str, g: str) -> str:
    """A tensor shaped like ``x`` where each element of ``g`` is added at the flat
    position of ``x`` that ``positions`` gives for it (repeats add up)."""
    size = b.op("Size", x)
    zeros = b.op("ConstantOfShape", b.unsqueeze(size, [0]), value=b.zero_tensor())
    scattered = b.op(
        "ScatterElements",
        zeros,
        b.op("Reshape", positions, b.ints([-1])),
        b.op("Reshape", g, b.ints([-1])),
        axis=0,
        reduction="add",
    )
    return b.op("Reshape", scattered, b.shape_of(x))


@rule("Slice")
def _slice(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    extra = list(ctx.node.input[1:])
    return [_flat_index_grad(ctx, gys[0], "Slice", extra)] + [None] * len(extra)


@rule("Gather")
def _gather(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    indices = ctx.input(1)
    assert indices is not None
    return [_flat_index_grad(ctx, gys[0], "Gather", [indices]), None]


@rule("Pad")
def _pad(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    mode = ctx.attr("mode", "constant")
    if mode not in ("constant", b"constant"):
        raise ModelBuildError(f"Pad {ctx.node.name!r}: only constant padding can be trained")
    b = ctx.b
    pads_name = ctx.input(1)
    pads_value = b.value(pads_name) if pads_name else None
    if pads_value is None:
        raise ModelBuildError(f"Pad {ctx.node.name!r}: its pads must be a constant to train")
    axes_name = ctx.input(3)
    rank = b.rank(_x(ctx))
    if rank is None:
        raise ModelBuildError(f"Pad {ctx.node.name!r}: input rank unknown")
    if axes_name:
        axes_value = b.value(axes_name)
        if axes_value is None:
            raise ModelBuildError(f"Pad {ctx.node.name!r}: its axes must be a constant to train")
        axes = [int(a) % rank for a in axes_value.ravel()]
    else:
        axes = list(range(rank))
    pads = [int(p) for p in pads_value.ravel()]
    n = len(axes)
    starts = [pads[i] for i in range(n)]
    ends = [-pads[n + i] if pads[n + i] > 0 else np.iinfo(np.int64).max for i in range(n)]
    # A negative pad crops: its gradient would need padding back (not supported).
    if any(p < 0 for p in pads):
        raise ModelBuildError(f"Pad {ctx.node.name!r}: negative pads cannot be trained")
    g = b.op("Slice", gy, b.ints(starts), b.ints(ends), b.ints(axes))
    return [g] + [None] * (len(ctx.node.input) - 1)
