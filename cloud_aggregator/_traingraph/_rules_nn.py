"""Gradient rules of the neural-network operators.

Conv: the input gradient is a ``ConvTranspose`` of the output gradient with the same
weights (padded at the start only, then cut or zero-extended to the input's extent),
the weight gradient a ``Conv`` with the roles swapped (the input's channels become the
batch, the batch becomes the channels, strides and dilations trade places; groups are
kept by ordering channels group-major). Pools reuse the same pieces: MaxPool routes
each gradient to its argmax through the op's own ``Indices`` output, AveragePool is a
depthwise ``ConvTranspose`` of ones divided by each window's element count (computed
here, from the static shapes, exactly as the op counts them). The training-mode forward
passes these rules rely on (batch statistics, dropout masks, argmax indices) are in
``_train_forward``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph._autodiff import GradContext, rule
from cloud_aggregator._traingraph._builder import GraphBuilder
from cloud_aggregator._traingraph._rules_math import unbroadcast
from cloud_aggregator._traingraph._rules_shape import scatter_add

Grads = Sequence[str | None]


@dataclass(frozen=True)
class Window:
    """A sliding window's geometry over the spatial axes of an NC... tensor."""

    spatial: tuple[int, ...]
    """The input's spatial extents."""
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    out: tuple[int, ...]
    """The output's spatial extents."""


def window(
    ctx_node_name: str,
    attrs: dict[str, object],
    x_shape: Sequence[object] | None,
    kernel: Sequence[int],
) -> Window:
    """Resolve strides, dilations and pads (``auto_pad`` included) from static shapes."""
    if x_shape is None or not all(isinstance(d, int) for d in x_shape[2:]):
        raise ModelBuildError(
            f"{ctx_node_name}: spatial input extents must be known at build time to train"
        )
    spatial = tuple(int(d) for d in x_shape[2:])  # type: ignore[call-overload]
    n = len(spatial)
    strides = tuple(int(s) for s in attrs.get("strides") or [1] * n)  # type: ignore[attr-defined]
    dilations = tuple(int(s) for s in attrs.get("dilations") or [1] * n)  # type: ignore[attr-defined]
    ceil = bool(attrs.get("ceil_mode", 0))
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = [math.ceil(size / s) for size, s in zip(spatial, strides, strict=True)]
        total = [
            max(0, (o - 1) * s + k - size)
            for o, s, k, size in zip(out, strides, span, spatial, strict=True)
        ]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = [int(p) for p in attrs.get("pads") or [0] * (2 * n)]  # type: ignore[attr-defined]
        begin, end = pads[:n], pads[n:]
    outs = []
    for size, k, s, b0, e0 in zip(spatial, span, strides, begin, end, strict=True):
        full = size + b0 + e0 - k
        o = (math.ceil(full / s) if ceil else full // s) + 1
        if ceil and (o - 1) * s >= size + b0:  # the last window must start inside the input
            o -= 1
        outs.append(o)
    return Window(spatial, tuple(kernel), strides, dilations, tuple(begin), tuple(end), tuple(outs))


def _attrs(ctx: GradContext) -> dict[str, object]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in ctx.node.attribute}


def _fit(b: GraphBuilder, g: str, produced: Sequence[int], wanted: Sequence[int]) -> str:
    """Cut or zero-extend the spatial axes of ``g`` from ``produced`` to ``wanted``."""
    axes = [2 + i for i in range(len(wanted))]
    if any(p > w for p, w in zip(produced, wanted, strict=True)):
        ends = [min(p, w) for p, w in zip(produced, wanted, strict=True)]
        g = b.op("Slice", g, b.ints([0] * len(axes)), b.ints(ends), b.ints(axes))
    extra = [max(0, w - p) for p, w in zip(produced, wanted, strict=True)]
    if any(extra):
        pads = [0, 0] + [0] * len(axes) + [0, 0] + extra
        g = b.op("Pad", g, b.ints(pads))
    return g


def _transpose_grad(b: GraphBuilder, g: str, weight: str, win: Window, group: int) -> str:
    """The input gradient of a sliding-window op: ``ConvTranspose`` padded at the start."""
    full = b.op(
        "ConvTranspose",
        g,
        weight,
        strides=list(win.strides),
        dilations=list(win.dilations),
        group=group,
        pads=list(win.begin) + [0] * len(win.begin),
    )
    produced = [
        (o - 1) * s + (k - 1) * d + 1 - p
        for o, s, k, d, p in zip(
            win.out, win.strides, win.kernel, win.dilations, win.begin, strict=True
        )
    ]
    return _fit(b, full, produced, win.spatial)


def _conv_weight_grad(
    b: GraphBuilder, x: str, gy: str, win: Window, group: int, out_ch: int, cg: int, og: int
) -> str:
    """dW as a Conv with the roles swapped: the input's channels become the batch, the
    batch becomes the channels (group-major, so groups are kept) and strides and
    dilations trade places; the first ``kernel`` outputs are the weight gradient.
    (Measured against an im2col Gather + GEMM and a one-hot depthwise im2col: fastest.)"""
    nsp = len(win.kernel)
    sp = list(range(3, 3 + nsp))
    if group == 1:
        xs = b.transpose(x, [1, 0, *range(2, 2 + nsp)])
        gs = b.transpose(gy, [1, 0, *range(2, 2 + nsp)], shape=(None, out_ch, *win.out))
    else:
        x5 = b.op("Reshape", x, b.ints([0, group, cg, *win.spatial]))
        xs = b.op(
            "Reshape", b.op("Transpose", x5, perm=[2, 1, 0, *sp]), b.ints([cg, -1, *win.spatial])
        )
        g5 = b.op("Reshape", gy, b.ints([0, group, og, *win.out]))
        gs = b.op(
            "Reshape", b.op("Transpose", g5, perm=[1, 2, 0, *sp]), b.ints([out_ch, -1, *win.out])
        )
    swapped = b.op(
        "Conv",
        xs,
        gs,
        strides=list(win.dilations),
        dilations=list(win.strides),
        pads=list(win.begin) + list(win.end),
        group=group,
    )
    cut = b.op(
        "Slice",
        swapped,
        b.ints([0] * nsp),
        b.ints(list(win.kernel)),
        b.ints(list(range(2, 2 + nsp))),
    )
    return b.transpose(cut, [1, 0, *range(2, 2 + nsp)], shape=(cg, out_ch, *win.kernel))


@rule("Conv")
def _conv(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b = ctx.b
    x, w = ctx.input(0), ctx.input(1)
    assert x is not None and w is not None
    w_shape = b.static_shape(w)
    x_shape = b.shape(x)
    if w_shape is None or x_shape is None:
        raise ModelBuildError(f"Conv {ctx.node.name!r}: weight and input shapes must be known")
    kernel = tuple(w_shape[2:])
    win = window(f"Conv {ctx.node.name!r}", _attrs(ctx), x_shape, kernel)
    group = int(ctx.attr("group", 1))
    nsp = len(kernel)
    out_ch, cg = w_shape[0], w_shape[1]
    og = out_ch // group
    gx = gw = gb = None
    if ctx.need(0):
        gx = _transpose_grad(b, gy, w, win, group)
    if ctx.need(1):
        gw = _conv_weight_grad(b, x, gy, win, group, out_ch, cg, og)
    if ctx.input(2) is not None and ctx.need(2):
        gb = b.op("ReduceSum", gy, b.ints([0, *range(2, 2 + nsp)]), keepdims=0)
    return [gx, gw, gb]


@rule("MaxPool")
def _max_pool(ctx: GradContext, gys: Grads) -> Grads:
    gy = gys[0]
    assert gy is not None
    b = ctx.b
    x = ctx.input(0)
    assert x is not None
    # Indices are flat positions in the whole input (batch and channels included).
    return [scatter_add(b, x, ctx.op.saved["indices"], gy)]


def pool_counts(win: Window, include_pad: bool) -> np.ndarray:
    """How many elements each AveragePool window divides by, per output position."""
    per_axis = []
    for size, k, s, d, b0, e0, o in zip(
        win.spatial,
        win.kernel,
        win.strides,
        win.dilations,
        win.begin,
        win.end,
        win.out,
        strict=True,
    ):
        counts = []
        for i in range(o):
            start = i * s - b0
            taps = [start + j * d for j in range(k)]
            if include_pad:
                counts.append(sum(1 for t in taps if -b0 <= t < size + e0))
            else:
                counts.append(sum(1 for t in taps if 0 <= t < size))
        per_axis.append(np.array(counts, np.float64))
    grid = per_axis[0]
    for axis in per_axis[1:]:
        grid = np.multiply.outer(grid, axis)
    return np.maximum(grid, 1.0)


@rule("AveragePool")
def _average_pool(ctx: GradContext, gys: Grads) -> Grads:
    gy = gys[0]
    assert gy is not None
    b = ctx.b
    x = ctx.input(0)
    assert x is not None
    x_shape = b.shape(x)
    attrs = _attrs(ctx)
    kernel = tuple(int(k) for k in attrs["kernel_shape"])  # type: ignore[attr-defined]
    win = window(f"AveragePool {ctx.node.name!r}", attrs, x_shape, kernel)
    assert x_shape is not None
    channels = x_shape[1]
    if not isinstance(channels, int):
        raise ModelBuildError(f"AveragePool {ctx.node.name!r}: channel count must be known")
    counts = pool_counts(win, bool(attrs.get("count_include_pad", 0)))
    scaled = b.op("Div", gy, b.const(counts))
    ones = b.const(np.ones((channels, 1, *kernel)))
    return [_transpose_grad(b, scaled, ones, win, channels)]


@rule("GlobalAveragePool")
def _global_average_pool(ctx: GradContext, gys: Grads) -> Grads:
    gy = gys[0]
    assert gy is not None
    b = ctx.b
    x = ctx.input(0)
    assert x is not None
    shape = b.shape(x)
    expanded = b.op("Expand", gy, b.shape_of(x))
    if shape is not None and all(isinstance(d, int) for d in shape[2:]):
        return [b.op("Mul", expanded, b.scalar(1.0 / max(1, math.prod(shape[2:]))))]  # type: ignore[arg-type]
    count = b.op(
        "Div",
        b.to_float(b.op("Size", x)),
        b.to_float(b.op("Size", ctx.node.output[0])),
    )
    return [b.op("Div", expanded, count)]


@rule("fl.BatchNormTrain")
def _batch_norm_train(ctx: GradContext, gys: Grads) -> Grads:
    gy = gys[0]
    assert gy is not None
    b, saved = ctx.b, ctx.op.saved
    axes = [int(a) for a in saved["axes"].split(",")]
    xhat, invstd, scale_b = saved["xhat"], saved["invstd"], saved["scale_b"]
    gx = gs = gbias = None
    if ctx.need(1):
        gs = b.op("ReduceSum", b.op("Mul", gy, xhat), b.ints(axes), keepdims=0)
    if ctx.need(2):
        gbias = b.op("ReduceSum", gy, b.ints(axes), keepdims=0)
    if ctx.need(0):
        mean_g = b.reduce("ReduceMean", gy, axes, keepdims=True)
        mean_gx = b.reduce("ReduceMean", b.op("Mul", gy, xhat), axes, keepdims=True)
        centred = b.op("Sub", b.op("Sub", gy, mean_g), b.op("Mul", xhat, mean_gx))
        gx = b.op("Mul", b.op("Mul", scale_b, invstd), centred)
    return [gx, gs, gbias]


@rule("LayerNormalization")
def _layer_norm(ctx: GradContext, gys: Grads) -> Grads:
    gy = gys[0]
    assert gy is not None
    b = ctx.b
    x, scale = ctx.input(0), ctx.input(1)
    assert x is not None and scale is not None
    y = ctx.node.output[0]
    rank = b.rank(x)
    if rank is None:
        raise ModelBuildError(f"LayerNormalization {ctx.node.name!r}: input rank unknown")
    axis = int(ctx.attr("axis", -1)) % rank
    axes = list(range(axis, rank))
    mean, invstd = ctx.op.saved["mean"], ctx.op.saved["invstd"]
    if b.float_type != 1:  # the statistics are stashed in float32 (stash_type=1)
        mean, invstd = b.op("CastLike", mean, x), b.op("CastLike", invstd, x)
    xhat = b.op("Mul", b.op("Sub", x, mean), invstd)
    gx = gs = gbias = None
    if ctx.need(1):
        gs = unbroadcast(b, b.op("Mul", gy, xhat), scale, y)
    bias = ctx.input(2)
    if bias is not None and ctx.need(2):
        gbias = unbroadcast(b, gy, bias, y)
    if ctx.need(0):
        dxhat = b.op("Mul", gy, scale)
        m1 = b.reduce("ReduceMean", dxhat, axes, keepdims=True)
        m2 = b.reduce("ReduceMean", b.op("Mul", dxhat, xhat), axes, keepdims=True)
        gx = b.op("Mul", invstd, b.op("Sub", b.op("Sub", dxhat, m1), b.op("Mul", xhat, m2)))
    return [gx, gs, gbias]


@rule("fl.DropoutTrain")
def _dropout_train(ctx: GradContext, gys: Grads) -> Grads:
    gy = gys[0]
    assert gy is not None
    b, saved = ctx.b, ctx.op.saved
    return [b.op("Where", saved["keep"], b.op("Mul", gy, saved["scale"]), b.scalar(0.0))]
