"""Gradient rules: activations and softmax (``y`` is the op's output, ``gy`` its gradient)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cloud_aggregator._traingraph._autodiff import GradContext, rule

Grads = Sequence[str | None]


@rule("Relu")
def _relu(ctx: GradContext, gys: Grads) -> Grads:
    b = ctx.b
    assert gys[0] is not None
    # gy * (y > 0): a float mask and Mul run about 4x faster than Where on ORT's CPU.
    positive = b.to_float(b.op("Greater", ctx.out(), b.scalar(0.0)))
    return [b.op("Mul", gys[0], positive)]


@rule("LeakyRelu")
def _leaky_relu(ctx: GradContext, gys: Grads) -> Grads:
    b, x = ctx.b, ctx.inp(0)
    (gy,) = gys
    assert gy is not None
    alpha = float(ctx.attr("alpha", 0.01))
    positive = b.op("Greater", x, b.scalar(0.0))
    return [b.op("Where", positive, gy, b.op("Mul", gy, b.scalar(alpha)))]


@rule("Sigmoid")
def _sigmoid(ctx: GradContext, gys: Grads) -> Grads:
    b, y = ctx.b, ctx.out()
    assert gys[0] is not None
    return [b.op("Mul", gys[0], b.op("Mul", y, b.op("Sub", b.scalar(1.0), y)))]


@rule("Tanh")
def _tanh(ctx: GradContext, gys: Grads) -> Grads:
    b, y = ctx.b, ctx.out()
    assert gys[0] is not None
    return [b.op("Mul", gys[0], b.op("Sub", b.scalar(1.0), b.op("Mul", y, y)))]


@rule("Erf")
def _erf(ctx: GradContext, gys: Grads) -> Grads:
    b, x = ctx.b, ctx.inp(0)
    assert gys[0] is not None
    bell = b.op("Exp", b.op("Neg", b.op("Mul", x, x)))
    return [b.op("Mul", gys[0], b.op("Mul", bell, b.scalar(2.0 / math.sqrt(math.pi))))]


@rule("Gelu")
def _gelu(ctx: GradContext, gys: Grads) -> Grads:
    b, x = ctx.b, ctx.inp(0)
    (gy,) = gys
    assert gy is not None
    if ctx.attr("approximate", "none") in ("tanh", b"tanh"):
        # y = 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3), c = sqrt(2/pi)
        c = math.sqrt(2.0 / math.pi)
        x2 = b.op("Mul", x, x)
        u = b.op(
            "Mul", b.scalar(c), b.op("Add", x, b.op("Mul", b.scalar(0.044715), b.op("Mul", x2, x)))
        )
        t = b.op("Tanh", u)
        du = b.op(
            "Mul", b.scalar(c), b.op("Add", b.scalar(1.0), b.op("Mul", b.scalar(3 * 0.044715), x2))
        )
        sech2 = b.op("Sub", b.scalar(1.0), b.op("Mul", t, t))
        d = b.op(
            "Add",
            b.op("Mul", b.scalar(0.5), b.op("Add", b.scalar(1.0), t)),
            b.op("Mul", b.op("Mul", b.scalar(0.5), x), b.op("Mul", sech2, du)),
        )
        return [b.op("Mul", gy, d)]
    # y = x Phi(x): dy/dx = Phi(x) + x phi(x)
    cdf = b.op(
        "Mul",
        b.scalar(0.5),
        b.op("Add", b.scalar(1.0), b.op("Erf", b.op("Mul", x, b.scalar(1 / math.sqrt(2))))),
    )
    pdf = b.op(
        "Mul",
        b.scalar(1 / math.sqrt(2 * math.pi)),
        b.op("Exp", b.op("Mul", b.scalar(-0.5), b.op("Mul", x, x))),
    )
    return [b.op("Mul", gy, b.op("Add", cdf, b.op("Mul", x, pdf)))]


@rule("Softmax")
def _softmax(ctx: GradContext, gys: Grads) -> Grads:
    b, y = ctx.b, ctx.out()
    (gy,) = gys
    assert gy is not None
    axis = int(ctx.attr("axis", -1))
    inner = b.reduce("ReduceSum", b.op("Mul", gy, y), [axis], keepdims=True)
    return [b.op("Mul", y, b.op("Sub", gy, inner))]


@rule("LogSoftmax")
def _log_softmax(ctx: GradContext, gys: Grads) -> Grads:
    b, y = ctx.b, ctx.out()
    (gy,) = gys
    assert gy is not None
    axis = int(ctx.attr("axis", -1))
    total = b.reduce("ReduceSum", gy, [axis], keepdims=True)
    return [b.op("Sub", gy, b.op("Mul", b.op("Exp", y), total))]
