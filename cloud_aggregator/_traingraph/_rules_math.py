"""Gradient rules: elementwise arithmetic, MatMul/Gemm, reductions (activations and
softmax are in ``_rules_act``).

Each rule is a small function of the output gradients that emits standard ONNX nodes
(formulas as in the operators' definitions; ``y`` is the op's output, ``gy`` its
gradient). Broadcasting inputs get their gradient summed back to their own shape by
``unbroadcast``, statically when shape inference knows both shapes, else at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloud_aggregator._traingraph._autodiff import GradContext, rule
from cloud_aggregator._traingraph._builder import GraphBuilder

Grads = Sequence[str | None]


def unbroadcast(b: GraphBuilder, g: str, x: str, y: str) -> str:
    """Sum gradient ``g`` (shaped like ``y``) back to the shape of broadcast input ``x``."""
    sx, sy = b.shape(x), b.shape(y)
    if sx is not None and sy is not None and len(sx) <= len(sy):
        lead = len(sy) - len(sx)
        tail = sy[lead:]
        if all(dx == dy and dx is not None for dx, dy in zip(sx, tail, strict=True)):
            static_axes: list[int] | None = list(range(lead))
        elif all(dx == 1 or (dx == dy and dx is not None) for dx, dy in zip(sx, tail, strict=True)):
            static_axes = list(range(lead)) + [
                lead + i
                for i, (dx, dy) in enumerate(zip(sx, tail, strict=True))
                if dx == 1 and dy != 1
            ]
        else:
            static_axes = None
        if static_axes is not None:
            if not static_axes:
                return g
            inner = [a - lead for a in static_axes if a >= lead]
            if lead:  # drop the leading axes x lacks, then keep x's own
                g = b.op("ReduceSum", g, b.ints(list(range(lead))), keepdims=0)
            if inner:
                g = b.op("ReduceSum", g, b.ints(inner), keepdims=1)
            return g
    # Dynamic: drop leading axes, then sum every axis where x has extent 1.
    rx, ry = b.rank(x), b.rank(y)
    if rx is not None and ry is not None and ry > rx:
        g = b.op("ReduceSum", g, b.ints(list(range(ry - rx))), keepdims=0)
    ones = b.op("Equal", b.shape_of(x), b.ints([1]))
    axes = b.op("Reshape", b.op("NonZero", ones), b.ints([-1]))
    g = b.reduce_dynamic(g, axes, keepdims=True)
    return b.op("Reshape", g, b.shape_of(x))


# -- arithmetic -----------------------------------------------------------------------


@rule("Add")
def _add(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y = ctx.b, ctx.out()
    return [unbroadcast(b, gy, ctx.inp(i), y) if ctx.need(i) else None for i in range(2)]


@rule("Sub")
def _sub(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y = ctx.b, ctx.out()
    ga = unbroadcast(b, gy, ctx.inp(0), y) if ctx.need(0) else None
    gb = unbroadcast(b, b.op("Neg", gy), ctx.inp(1), y) if ctx.need(1) else None
    return [ga, gb]


@rule("Mul")
def _mul(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y, a, c = ctx.b, ctx.out(), ctx.inp(0), ctx.inp(1)
    ga = unbroadcast(b, b.op("Mul", gy, c), a, y) if ctx.need(0) else None
    gb = unbroadcast(b, b.op("Mul", gy, a), c, y) if ctx.need(1) else None
    return [ga, gb]


@rule("Div")
def _div(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y, a, c = ctx.b, ctx.out(), ctx.inp(0), ctx.inp(1)
    ga = unbroadcast(b, b.op("Div", gy, c), a, y) if ctx.need(0) else None
    gb = None
    if ctx.need(1):  # d(a/c)/dc = -y/c
        gb = unbroadcast(b, b.op("Neg", b.op("Div", b.op("Mul", gy, y), c)), c, y)
    return [ga, gb]


@rule("Neg")
def _neg(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [ctx.b.op("Neg", gys[0])]


@rule("Pow")
def _pow(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y, a, e = ctx.b, ctx.out(), ctx.inp(0), ctx.inp(1)
    ga = gb = None
    if ctx.need(0):  # e * a^(e-1)
        e1 = b.op("Sub", e, b.op("CastLike", b.scalar(1.0), e))
        da = b.op("Mul", b.op("CastLike", e, a), b.op("Pow", a, e1))
        ga = unbroadcast(b, b.op("Mul", gy, da), a, y)
    if ctx.need(1):  # y * log(a)
        gb = unbroadcast(b, b.op("Mul", gy, b.op("Mul", y, b.op("Log", a))), e, y)
    return [ga, gb]


@rule("Sqrt")
def _sqrt(ctx: GradContext, gys: Grads) -> Grads:
    b = ctx.b
    assert gys[0] is not None
    return [b.op("Div", b.op("Mul", gys[0], b.scalar(0.5)), ctx.out())]


@rule("Exp")
def _exp(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [ctx.b.op("Mul", gys[0], ctx.out())]


@rule("Log")
def _log(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [ctx.b.op("Div", gys[0], ctx.inp(0))]


@rule("Reciprocal")
def _reciprocal(ctx: GradContext, gys: Grads) -> Grads:
    b, y = ctx.b, ctx.out()
    assert gys[0] is not None
    return [b.op("Neg", b.op("Mul", gys[0], b.op("Mul", y, y)))]


@rule("Abs")
def _abs(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [ctx.b.op("Mul", gys[0], ctx.b.op("Sign", ctx.inp(0)))]


@rule("Identity")
def _identity(ctx: GradContext, gys: Grads) -> Grads:
    return [gys[0]]


@rule("Cast")
def _cast(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [ctx.b.op("CastLike", gys[0], ctx.inp(0))]


@rule("Sum")
def _sum(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y = ctx.b, ctx.out()
    return [
        unbroadcast(b, gy, name, y) if ctx.need(i) else None
        for i, name in enumerate(ctx.node.input)
    ]


@rule("Expand")
def _expand(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [unbroadcast(ctx.b, gys[0], ctx.inp(0), ctx.out()), None]


@rule("Where")
def _where(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y, cond = ctx.b, ctx.out(), ctx.inp(0)
    zero = b.scalar(0.0)
    ga = unbroadcast(b, b.op("Where", cond, gy, zero), ctx.inp(1), y) if ctx.need(1) else None
    gb = unbroadcast(b, b.op("Where", cond, zero, gy), ctx.inp(2), y) if ctx.need(2) else None
    return [None, ga, gb]


@rule("Max", "Min")
def _max_min(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, y = ctx.b, ctx.out()
    if len(ctx.node.input) != 2:
        from cloud_aggregator._errors import ModelBuildError

        raise ModelBuildError(f"{ctx.node.op_type} {ctx.node.name!r}: only two inputs train")
    a, c = ctx.inp(0), ctx.inp(1)
    # The gradient goes to the input that was chosen (the first one on a tie).
    first = b.op("GreaterOrEqual" if ctx.node.op_type == "Max" else "LessOrEqual", a, c)
    zero = b.scalar(0.0)
    ga = unbroadcast(b, b.op("Where", first, gy, zero), a, y) if ctx.need(0) else None
    gc = unbroadcast(b, b.op("Where", first, zero, gy), c, y) if ctx.need(1) else None
    return [ga, gc]


@rule("Clip")
def _clip(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, x = ctx.b, ctx.inp(0)
    inside = None
    low, high = ctx.input(1), ctx.input(2)
    if low is not None:
        inside = b.op("GreaterOrEqual", x, low)
    if high is not None:
        upper = b.op("LessOrEqual", x, high)
        inside = upper if inside is None else b.op("And", inside, upper)
    if inside is None:
        return [gy]
    return [b.op("Where", inside, gy, b.scalar(0.0)), None, None]


# -- matrix products --------------------------------------------------------------------


def _swap_last(b: GraphBuilder, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return b.op("Transpose", x, perm=perm)


@rule("MatMul")
def _matmul(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, a, c = ctx.b, ctx.inp(0), ctx.inp(1)
    ra, rc = b.rank(a), b.rank(c)
    if ra is None or rc is None:
        from cloud_aggregator._errors import ModelBuildError

        raise ModelBuildError(
            f"MatMul {ctx.node.name!r}: input ranks unknown after shape inference"
        )
    a2 = b.unsqueeze(a, [0]) if ra == 1 else a  # a row vector [1, K]
    c2 = b.unsqueeze(c, [1]) if rc == 1 else c  # a column vector [K, 1]
    if ra == 1 and rc == 1:
        g2 = b.op("Reshape", gy, b.ints([1, 1]))
    elif ra == 1:
        g2 = b.unsqueeze(gy, [-2])
    elif rc == 1:
        g2 = b.unsqueeze(gy, [-1])
    else:
        g2 = gy
    ra2, rc2 = max(ra, 2), max(rc, 2)
    rank = max(ra2, rc2)
    ga = gc = None
    if ctx.need(0):
        ga = _reduce_to(b, b.op("MatMul", g2, _swap_last(b, c2, rc2)), a, rank, ra2)
    if ctx.need(1):
        gc = _reduce_to(b, b.op("MatMul", _swap_last(b, a2, ra2), g2), c, rank, rc2)
    return [ga, gc]


def _reduce_to(b: GraphBuilder, g: str, operand: str, rank: int, rank2: int) -> str:
    """Sum a MatMul gradient (rank ``rank``) back to ``operand`` (rank ``rank2`` once a
    1-D operand is counted as a matrix): leading batch axes the operand lacks, then
    batch axes where the operand has extent 1, then its own shape."""
    if rank > rank2:
        g = b.op("ReduceSum", g, b.ints(list(range(rank - rank2))), keepdims=0)
    if rank2 > 2:
        so = b.shape(operand)
        if so is not None and all(d is not None for d in so[:-2]):
            ones = [i for i, d in enumerate(so[:-2]) if d == 1]
            if ones:
                g = b.op("ReduceSum", g, b.ints(ones), keepdims=1)
        else:
            batch = b.op("Slice", b.shape_of(operand), b.ints([0]), b.ints([-2]))
            ones_mask = b.op("Equal", batch, b.ints([1]))
            axes = b.op("Reshape", b.op("NonZero", ones_mask), b.ints([-1]))
            g = b.reduce_dynamic(g, axes, keepdims=True)
    if b.rank(operand) == 1:
        g = b.op("Reshape", g, b.shape_of(operand))
    return g


@rule("Gemm")
def _gemm(ctx: GradContext, gys: Grads) -> Grads:
    (gy,) = gys
    assert gy is not None
    b, a, w, y = ctx.b, ctx.inp(0), ctx.inp(1), ctx.out()
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    ga = gw = gc = None
    if ctx.need(0):
        # A' = op(A); dA' = gY B'^T. dA = dA' (ta=0) or dA'^T (ta=1).
        if ta == 0:
            ga = b.op("Gemm", gy, w, alpha=alpha, transB=0 if tb else 1)
        else:
            ga = b.op("Gemm", w, gy, alpha=alpha, transA=tb, transB=1)
    if ctx.need(1):
        # dB' = A'^T gY. dB = dB' (tb=0) or dB'^T = gY^T A' (tb=1).
        if tb == 0:
            gw = b.op("Gemm", a, gy, alpha=alpha, transA=0 if ta else 1)
        else:
            gw = b.op("Gemm", gy, a, alpha=alpha, transA=1, transB=ta)
    c = ctx.input(2)
    if c is not None and ctx.need(2):
        scaled = gy if beta == 1.0 else b.op("Mul", gy, b.scalar(beta))
        gc = unbroadcast(b, scaled, c, y)
    return [ga, gw, gc]


# -- reductions ------------------------------------------------------------------------


def _reduce_axes(ctx: GradContext, rank: int) -> list[int] | None:
    """The reduced axes (normalised, sorted) or None for 'all axes'."""
    axes = ctx.attr("axes")
    name = ctx.input(1)
    if axes is None and name is not None:
        value = ctx.b.value(name)
        if value is None:
            from cloud_aggregator._errors import ModelBuildError

            raise ModelBuildError(
                f"{ctx.node.op_type} {ctx.node.name!r}: its axes must be a constant to train"
            )
        axes = [int(v) for v in value.ravel()]
    if not axes:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            return []
        return None
    return sorted(a % rank for a in axes)


def _reduce_grad(ctx: GradContext, gy: str, mean: bool) -> str:
    b, x, y = ctx.b, ctx.inp(0), ctx.out()
    rank = b.rank(x)
    if rank is None:
        from cloud_aggregator._errors import ModelBuildError

        raise ModelBuildError(f"{ctx.node.op_type} {ctx.node.name!r}: input rank unknown")
    axes = _reduce_axes(ctx, rank)
    if axes == []:
        return gy
    full = list(range(rank)) if axes is None else axes
    if not int(ctx.attr("keepdims", 1)):
        gy = b.unsqueeze(gy, full)
    g = b.op("Expand", gy, b.shape_of(x))
    if mean:
        count = b.op("Div", b.to_float(b.op("Size", x)), b.to_float(b.op("Size", y)))
        g = b.op("Div", g, count)
    return g


@rule("ReduceSum")
def _reduce_sum(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [_reduce_grad(ctx, gys[0], mean=False), None]


@rule("ReduceMean")
def _reduce_mean(ctx: GradContext, gys: Grads) -> Grads:
    assert gys[0] is not None
    return [_reduce_grad(ctx, gys[0], mean=True), None]
