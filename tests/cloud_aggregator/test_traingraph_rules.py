"""Every gradient rule against central finite differences, on real ONNX Runtime.

Each case is a tiny model; ``gradient_model`` adds ``L = sum(y * probe)`` and its
gradient with respect to the listed inputs or initializers. The gradient is compared
with ``(L(v + h) - L(v - h)) / 2h`` at up to 24 coordinates of each.

Tolerances: float64 (where ONNX Runtime has float64 kernels): h = 1e-6,
|analytic - numeric| <= 1e-6 + 1e-5 |numeric|. Ops with float32-only kernels (Conv,
ConvTranspose, the pools, Erf, Gelu): h = 1e-2 in float32, <= 2e-3 + 2e-2 |numeric|
(the float32 rounding of L is about 1e-6 |L|, divided by 2h).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud_aggregator import ModelBuildError
from cloud_aggregator._traingraph._gradcheck import LOSS, PROBE, grad_name, gradient_model

F64, F32 = TensorProto.DOUBLE, TensorProto.FLOAT


@dataclass
class Case:
    """A one-or-few-node model: ``nodes`` map inputs (and ``params``) to output ``y``."""

    nodes: list[Any]
    inputs: dict[str, np.ndarray]
    out_shape: list[Any]
    params: dict[str, np.ndarray] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    wrt: list[str] | None = None
    opset: int = 17
    float64: bool = True
    loose: bool = False
    """float32-level step and tolerance even in float64 (a float32 value on the path)."""


def _model(case: Case, dtype: int) -> Any:
    np_t = np.float64 if dtype == F64 else np.float32
    inputs = [
        helper.make_tensor_value_info(n, dtype, list(v.shape)) for n, v in case.inputs.items()
    ]
    inits = [numpy_helper.from_array(v.astype(np_t), n) for n, v in case.params.items()]
    inits += [numpy_helper.from_array(v, n) for n, v in case.consts.items()]
    graph = helper.make_graph(
        case.nodes, "case", inputs, [helper.make_tensor_value_info("y", dtype, case.out_shape)],
        initializer=inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", case.opset)], ir_version=10
    )


def check(case: Case, seed: int = 0) -> None:
    """Analytic gradients of ``sum(y * probe)`` against central differences."""
    dtype = F64 if case.float64 else F32
    np_t = np.float64 if dtype == F64 else np.float32
    h, atol, rtol = (1e-6, 1e-6, 1e-5) if dtype == F64 else (1e-2, 2e-3, 2e-2)
    if case.loose:
        h, atol, rtol = 1e-2, 2e-3, 2e-2
    wrt = case.wrt or [*case.inputs, *case.params]
    forward = _model(case, dtype)
    model = gradient_model(forward, wrt=wrt, float_type=dtype)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain = ort.InferenceSession(forward.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    values = {n: np.array(v, dtype=np_t) for n, v in {**case.inputs, **case.params}.items()}
    y = plain.run(["y"], {n: values[n] for n in case.inputs})[0]
    probe = rng.standard_normal(y.shape).astype(np_t)
    feeds = {n: values[n] for n in dict.fromkeys([*case.inputs, *wrt])}
    feeds[PROBE] = probe
    outputs = session.run([LOSS, *(grad_name(n) for n in wrt)], feeds)
    if not {n.op_type for n in case.nodes} & {"BatchNormalization"}:  # batch statistics
        assert float(outputs[0]) == pytest.approx(float((y * probe).sum()), rel=1e-4, abs=1e-5)
    for name, grad in zip(wrt, outputs[1:], strict=True):
        value = values[name]
        assert grad.shape == value.shape, name
        flat = value.reshape(-1)
        picks = rng.choice(flat.size, size=min(24, flat.size), replace=False)
        for i in picks:
            plus, minus = dict(feeds), dict(feeds)
            up, down = flat.copy(), flat.copy()
            up[i] += h
            down[i] -= h
            plus[name], minus[name] = up.reshape(value.shape), down.reshape(value.shape)
            lp = float(session.run([LOSS], plus)[0])
            lm = float(session.run([LOSS], minus)[0])
            numeric = (lp - lm) / (2 * h)
            analytic = float(grad.reshape(-1)[i])
            assert abs(analytic - numeric) <= atol + rtol * abs(numeric), (
                f"d/d{name}[{i}]: analytic {analytic}, numeric {numeric}"
            )


def r(*shape: int, low: float | None = None, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed + sum(shape))
    x = rng.standard_normal(shape)
    if low is not None:
        x = np.abs(x) + low
    return x


def node(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> Any:
    return helper.make_node(op, inputs, outputs or ["y"], **attrs)


def ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


CASES: dict[str, Callable[[], Case]] = {
    # -- arithmetic with broadcasting
    "add_broadcast": lambda: Case([node("Add", ["a", "b"])], {"a": r(2, 3, 4)}, [2, 3, 4],
                                  params={"b": r(3, 1)}),
    "sub_broadcast": lambda: Case([node("Sub", ["a", "b"])], {"a": r(4)}, [2, 3, 4],
                                  params={"b": r(2, 3, 4)}),
    "mul_broadcast": lambda: Case([node("Mul", ["a", "b"])], {"a": r(2, 3, 4)}, [2, 3, 4],
                                  params={"b": r(1, 3, 1)}),
    "mul_scalar": lambda: Case([node("Mul", ["a", "b"])], {"a": r(2, 3)}, [2, 3],
                               params={"b": np.array(1.5)}),
    "div_broadcast": lambda: Case([node("Div", ["a", "b"])], {"a": r(3, 4)}, [3, 4],
                                  params={"b": r(4, low=0.5)}),
    "neg": lambda: Case([node("Neg", ["a"])], {"a": r(3, 2)}, [3, 2]),
    "pow_const": lambda: Case([node("Pow", ["a", "e"])], {"a": r(3, 2, low=0.3)}, [3, 2],
                              params={"e": np.array(3.0)}, wrt=["a", "e"]),
    "sqrt": lambda: Case([node("Sqrt", ["a"])], {"a": r(3, 4, low=0.2)}, [3, 4]),
    "exp": lambda: Case([node("Exp", ["a"])], {"a": r(3, 4)}, [3, 4]),
    "log": lambda: Case([node("Log", ["a"])], {"a": r(3, 4, low=0.2)}, [3, 4]),
    "reciprocal": lambda: Case([node("Reciprocal", ["a"])], {"a": r(3, 4, low=0.5)}, [3, 4]),
    "abs": lambda: Case([node("Abs", ["a"])], {"a": r(3, 4, low=0.1)}, [3, 4]),
    "identity": lambda: Case([node("Identity", ["a"])], {"a": r(2, 2)}, [2, 2]),
    "cast_roundtrip": lambda: Case(
        [node("Cast", ["a"], ["f"], to=F32), node("Cast", ["f"], to=F64)], {"a": r(3, 3)},
        [3, 3], loose=True),
    "sum3": lambda: Case([node("Sum", ["a", "b", "c"])], {"a": r(2, 3)}, [2, 3],
                         params={"b": r(3), "c": r(2, 1)}),
    "expand": lambda: Case([node("Expand", ["a", "s"])], {"a": r(3, 1)}, [2, 3, 4],
                           consts={"s": ints(2, 3, 4)}),
    "where": lambda: Case([node("Where", ["c", "a", "b"])], {"a": r(2, 3)}, [2, 3],
                          params={"b": r(3)},
                          consts={"c": np.array([[True, False, True], [False, True, False]])}),
    "max_broadcast": lambda: Case([node("Max", ["a", "b"])], {"a": r(3, 4)}, [3, 4],
                                  params={"b": r(4)}),
    "min": lambda: Case([node("Min", ["a", "b"])], {"a": r(3, 4)}, [3, 4],
                        params={"b": r(3, 4, seed=7)}),
    "clip": lambda: Case([node("Clip", ["a", "lo", "hi"])], {"a": r(4, 5) * 2}, [4, 5],
                         consts={"lo": np.array(-1.0), "hi": np.array(1.0)}),
    # -- activations
    "relu": lambda: Case([node("Relu", ["a"])], {"a": r(3, 4)}, [3, 4]),
    "leaky_relu": lambda: Case([node("LeakyRelu", ["a"], alpha=0.1)], {"a": r(3, 4)}, [3, 4]),
    "sigmoid": lambda: Case([node("Sigmoid", ["a"])], {"a": r(3, 4)}, [3, 4]),
    "tanh": lambda: Case([node("Tanh", ["a"])], {"a": r(3, 4)}, [3, 4]),
    "erf": lambda: Case([node("Erf", ["a"])], {"a": r(3, 4)}, [3, 4], float64=False),
    "gelu": lambda: Case([node("Gelu", ["a"])], {"a": r(3, 4)}, [3, 4], opset=20,
                         float64=False),
    "gelu_tanh": lambda: Case([node("Gelu", ["a"], approximate="tanh")], {"a": r(3, 4)},
                              [3, 4], opset=20, float64=False),
    "softmax_last": lambda: Case([node("Softmax", ["a"])], {"a": r(2, 3, 5)}, [2, 3, 5]),
    "softmax_axis1": lambda: Case([node("Softmax", ["a"], axis=1)], {"a": r(2, 3, 5)},
                                  [2, 3, 5]),
    "log_softmax": lambda: Case([node("LogSoftmax", ["a"], axis=-1)], {"a": r(4, 6)}, [4, 6]),
    # -- matrix products
    "matmul_2d": lambda: Case([node("MatMul", ["a", "w"])], {"a": r(2, 3)}, [2, 4],
                              params={"w": r(3, 4)}),
    "matmul_batched": lambda: Case([node("MatMul", ["a", "w"])], {"a": r(2, 3, 4)}, [2, 3, 5],
                                   params={"w": r(4, 5)}),
    "matmul_broadcast": lambda: Case([node("MatMul", ["a", "w"])], {"a": r(2, 1, 3, 4)},
                                     [2, 5, 3, 2], params={"w": r(5, 4, 2)}),
    "matmul_vec_left": lambda: Case([node("MatMul", ["a", "w"])], {"a": r(3)}, [2, 4],
                                    params={"w": r(2, 3, 4)}),
    "matmul_vec_right": lambda: Case([node("MatMul", ["a", "w"])], {"a": r(2, 3, 4)}, [2, 3],
                                     params={"w": r(4)}),
    "matmul_vec_vec": lambda: Case([node("MatMul", ["a", "w"])], {"a": r(4)}, [],
                                   params={"w": r(4)}),
    **{
        f"gemm_t{ta}{tb}_{c}": (lambda ta=ta, tb=tb, c=c: Case(
            [node("Gemm", ["a", "w", "c"], alpha=0.7, beta=1.3, transA=ta, transB=tb)],
            {"a": r(3, 2) if ta else r(2, 3)}, [2, 4],
            params={"w": r(4, 3) if tb else r(3, 4),
                    "c": {"vec": r(4), "mat": r(2, 4), "row": r(1, 4), "one": r(1)}[c]}))
        for ta in (0, 1) for tb in (0, 1) for c in ("vec", "mat", "row", "one")
        if c == "vec" or (ta, tb) == (0, 1)
    },
    # -- reductions
    "reduce_sum_axes": lambda: Case([node("ReduceSum", ["a", "ax"], keepdims=0)],
                                    {"a": r(2, 3, 4)}, [2, 4], consts={"ax": ints(1)}),
    "reduce_sum_all": lambda: Case([node("ReduceSum", ["a"], keepdims=1)], {"a": r(2, 3)},
                                   [1, 1]),
    "reduce_mean_17": lambda: Case([node("ReduceMean", ["a"], axes=[0, 2], keepdims=0)],
                                   {"a": r(2, 3, 4)}, [3]),
    "reduce_mean_18": lambda: Case([node("ReduceMean", ["a", "ax"], keepdims=1)],
                                   {"a": r(2, 3, 4)}, [2, 1, 1], opset=18,
                                   consts={"ax": ints(-1, 1)}),
    # -- shapes
    "reshape": lambda: Case([node("Reshape", ["a", "s"])], {"a": r(2, 6)}, [3, 4],
                            consts={"s": ints(3, -1)}),
    "flatten": lambda: Case([node("Flatten", ["a"], axis=1)], {"a": r(2, 3, 2)}, [2, 6]),
    "squeeze": lambda: Case([node("Squeeze", ["a", "ax"])], {"a": r(2, 1, 3)}, [2, 3],
                            consts={"ax": ints(1)}),
    "unsqueeze": lambda: Case([node("Unsqueeze", ["a", "ax"])], {"a": r(2, 3)}, [2, 1, 3],
                              consts={"ax": ints(1)}),
    "transpose_perm": lambda: Case([node("Transpose", ["a"], perm=[2, 0, 1])],
                                   {"a": r(2, 3, 4)}, [4, 2, 3]),
    "transpose_default": lambda: Case([node("Transpose", ["a"])], {"a": r(2, 3, 4)},
                                      [4, 3, 2]),
    "concat": lambda: Case([node("Concat", ["a", "b", "c"], axis=1)], {"a": r(2, 1)}, [2, 6],
                           params={"b": r(2, 3), "c": r(2, 2)}),
    "split_partial_use": lambda: Case(
        [node("Split", ["a", "s"], ["p", "q", "u"], axis=1), node("Mul", ["p", "u"])],
        {"a": r(2, 7)}, [2, 2], consts={"s": ints(2, 3, 2)}),
    "slice_steps": lambda: Case(
        [node("Slice", ["a", "st", "en", "ax", "sp"])], {"a": r(4, 7)}, [2, 3],
        consts={"st": ints(-1, 1), "en": ints(-100, 100), "ax": ints(0, 1),
                "sp": ints(-2, 2)}),
    "gather_embedding": lambda: Case([node("Gather", ["w", "i"], axis=0)], {}, [2, 3, 4],
                                     params={"w": r(5, 4)},
                                     consts={"i": np.array([[0, 2, 2], [4, 0, 1]], np.int64)}),
    "gather_axis1": lambda: Case([node("Gather", ["a", "i"], axis=1)], {"a": r(3, 5)}, [3, 2],
                                 consts={"i": ints(4, -1)}),
    "pad": lambda: Case([node("Pad", ["a", "p"])], {"a": r(2, 3)}, [3, 6],
                        consts={"p": ints(1, 2, 0, 1)}),
    # -- convolutions and pools (float32-only kernels)
    "conv1d_stride_pad": lambda: Case(
        [node("Conv", ["x", "w", "b"], strides=[2], pads=[1, 1], kernel_shape=[5])],
        {"x": r(2, 1, 40) * 0.5}, [2, 3, 19], params={"w": r(3, 1, 5), "b": r(3)},
        float64=False),
    "conv1d_dilation_asym": lambda: Case(
        [node("Conv", ["x", "w"], dilations=[2], pads=[2, 0])], {"x": r(2, 2, 9)}, [2, 3, 7],
        params={"w": r(3, 2, 3)}, float64=False),
    "conv1d_groups": lambda: Case(
        [node("Conv", ["x", "w", "b"], group=2, strides=[2], pads=[0, 1])], {"x": r(3, 4, 8)},
        [3, 6, 4], params={"w": r(6, 2, 3), "b": r(6)}, float64=False),
    "conv2d_stride_pad": lambda: Case(
        [node("Conv", ["x", "w", "b"], strides=[2, 1], pads=[1, 0, 1, 1])], {"x": r(2, 2, 6, 5)},
        [2, 3, 3, 4], params={"w": r(3, 2, 3, 3), "b": r(3)}, float64=False),
    "conv2d_depthwise_same": lambda: Case(
        [node("Conv", ["x", "w"], group=3, auto_pad="SAME_UPPER", strides=[2, 2])],
        {"x": r(1, 3, 5, 6)}, [1, 3, 3, 3], params={"w": r(3, 1, 3, 3)}, float64=False),
    "max_pool_1d": lambda: Case(
        [node("MaxPool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 1])], {"x": r(2, 3, 9)},
        [2, 3, 5], float64=False),
    "max_pool_2d_ceil": lambda: Case(
        [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
        {"x": r(2, 2, 5, 5)}, [2, 2, 3, 3], float64=False),
    "avg_pool_1d_pad": lambda: Case(
        [node("AveragePool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 1])],
        {"x": r(2, 3, 9)}, [2, 3, 5], float64=False),
    "avg_pool_2d_include_pad": lambda: Case(
        [node("AveragePool", ["x"], kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 1],
              count_include_pad=1)], {"x": r(2, 2, 4, 5)}, [2, 2, 4, 3], float64=False),
    "avg_pool_ceil": lambda: Case(
        [node("AveragePool", ["x"], kernel_shape=[2], strides=[2], ceil_mode=1)],
        {"x": r(1, 2, 7)}, [1, 2, 4], float64=False),
    "global_avg_pool": lambda: Case([node("GlobalAveragePool", ["x"])], {"x": r(2, 3, 4, 5)},
                                    [2, 3, 1, 1], float64=False),
    # -- normalisation
    "batch_norm_train_2d": lambda: Case(
        [node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)], {"x": r(6, 4)},
        [6, 4], params={"s": r(4), "b": r(4), "m": np.zeros(4), "v": np.ones(4)},
        wrt=["x", "s", "b"]),
    "batch_norm_train_4d": lambda: Case(
        [node("BatchNormalization", ["x", "s", "b", "m", "v"])], {"x": r(3, 2, 3, 2)},
        [3, 2, 3, 2], params={"s": r(2), "b": r(2), "m": np.zeros(2), "v": np.ones(2)},
        wrt=["x", "s", "b"]),
    "layer_norm_last": lambda: Case(
        [node("LayerNormalization", ["x", "s", "b"], axis=-1, epsilon=1e-5)], {"x": r(3, 4, 5)},
        [3, 4, 5], params={"s": r(5), "b": r(5)}),
    "layer_norm_axis1": lambda: Case(
        [node("LayerNormalization", ["x", "s"], axis=1)], {"x": r(3, 2, 4)}, [3, 2, 4],
        params={"s": r(2, 4)}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_finite_differences(name: str) -> None:
    check(CASES[name]())


def test_every_rule_has_a_case() -> None:
    from cloud_aggregator._traingraph import RULES

    covered: set[str] = set()
    for make in CASES.values():
        covered.update(n.op_type for n in make().nodes)
    internal = {"fl.BatchNormTrain", "fl.DropoutTrain"}  # via BatchNormalization, Dropout
    missing = sorted(set(RULES) - covered - internal)
    assert not missing, f"gradient rules without a finite-difference case: {missing}"


def test_dropout_gradient_follows_its_mask() -> None:
    # Random: no finite differences. The gradient must be probe / (1 - ratio) where the
    # output kept the input, and 0 where it dropped it.
    case = Case([node("Dropout", ["a", "ratio"])], {"a": r(50, 40, low=0.1)}, [50, 40],
                consts={"ratio": np.array(0.25, np.float32)}, float64=False)
    model = gradient_model(_model(case, F32), wrt=["a"])
    model.graph.output.append(helper.make_tensor_value_info("y", F32, [50, 40]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = case.inputs["a"].astype(np.float32)
    probe = np.random.default_rng(0).standard_normal(a.shape).astype(np.float32)
    _, grad, y = session.run([LOSS, grad_name("a"), "y"], {"a": a, PROBE: probe})
    kept = y != 0
    assert 0.6 < kept.mean() < 0.9  # ratio 0.25
    np.testing.assert_allclose(y[kept], a[kept] / 0.75, rtol=1e-6)
    np.testing.assert_allclose(grad[kept], probe[kept] / 0.75, rtol=1e-6)
    assert np.all(grad[~kept] == 0)


def test_op_without_rule_is_named_at_build_time() -> None:
    case = Case([node("Sin", ["a"], ["s"]), node("Mul", ["s", "w"])], {"a": r(2, 3)}, [2, 3],
                params={"w": r(3)}, wrt=["a"])
    with pytest.raises(ModelBuildError, match=r"Sin.*no gradient rule for Sin"):
        gradient_model(_model(case, F64), wrt=["a"], float_type=F64)
    # Not on a gradient path (before the only parameter): fine.
    ok = Case([node("Sin", ["a"], ["s"]), node("Mul", ["s", "w"])], {"a": r(2, 3)}, [2, 3],
              params={"w": r(3)}, wrt=["w"])
    check(ok)
