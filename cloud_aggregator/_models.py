"""Reference models of the MNIST-1D task, built with ``onnx.helper`` (no torch).

Every model takes ``input`` of shape ``[batch, 40]`` (float32) and returns ``logits``
of shape ``[batch, 10]``. Parameter names follow torch's ``layer.weight`` /
``layer.bias`` convention so that numbers can be compared with a torch baseline.
Weights use He initialisation from a seeded generator, biases start at zero.

Models are written at opset 17 and IR version 10: IR 10 is the newest that
onnxruntime-training 1.19.2 loads (``onnx==1.17.0`` writes it by default).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cloud_aggregator._errors import ModelBuildError
from device_profiles._errors import ConfigError

if TYPE_CHECKING:
    import onnx

# onnx is imported when a model is built, not with the package: ``fleetlearn`` and the
# aggregator's front door then work without the cloud extra, and start faster.

OPSET = 17
IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
NUM_FEATURES = 40
NUM_CLASSES = 10


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ModelBuildError(
            f"building models needs the cloud extra: pip install 'fleetlearn[cloud]' ({exc})"
        ) from exc


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _finish(
    name: str,
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        f"fleetlearn_{name.replace('-', '_')}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", NUM_FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="fleetlearn",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def _mlp(name: str, hidden: int, seed: int) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = [NUM_FEATURES, hidden, hidden, NUM_CLASSES]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = INPUT_NAME
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        w, b = f"fc{i}.weight", f"fc{i}.bias"
        inits.append(numpy_helper.from_array(_he(rng, (fan_out, fan_in), fan_in), w))
        inits.append(numpy_helper.from_array(np.zeros(fan_out, np.float32), b))
        last = i == len(sizes) - 1
        out = OUTPUT_NAME if last else f"fc{i}_out"
        nodes.append(helper.make_node("Gemm", [current, w, b], [out], transB=1, name=f"fc{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    return _finish(name, nodes, inits)


def _cnn(name: str, seed: int, channels: int = 25) -> onnx.ModelProto:
    """Three Conv1d (``channels`` channels, kernel 5, stride 2, padding 1) + ReLU, then
    Linear: ``cnn`` has 25 channels, ``cnn-wide`` (a cloud tier's model) 64."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    kernel = 5
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.array([-1, 1, NUM_FEATURES], np.int64), "shape_in"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape_flat"),
    ]
    nodes.append(helper.make_node("Reshape", [INPUT_NAME, "shape_in"], ["x3d"], name="unsqueeze"))
    current, in_ch, length = "x3d", 1, NUM_FEATURES
    for i in range(1, 4):
        w, b = f"conv{i}.weight", f"conv{i}.bias"
        fan_in = in_ch * kernel
        inits.append(numpy_helper.from_array(_he(rng, (channels, in_ch, kernel), fan_in), w))
        inits.append(numpy_helper.from_array(np.zeros(channels, np.float32), b))
        nodes.append(
            helper.make_node(
                "Conv",
                [current, w, b],
                [f"conv{i}_out"],
                kernel_shape=[kernel],
                strides=[2],
                pads=[1, 1],
                name=f"conv{i}",
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}_out"], [f"relu{i}"], name=f"relu{i}"))
        current, in_ch, length = f"relu{i}", channels, (length + 2 - kernel) // 2 + 1
    flat = channels * length  # channels * 4
    nodes.append(helper.make_node("Reshape", [current, "shape_flat"], ["flat"], name="flatten"))
    inits.append(numpy_helper.from_array(_he(rng, (NUM_CLASSES, flat), flat), "linear.weight"))
    inits.append(numpy_helper.from_array(np.zeros(NUM_CLASSES, np.float32), "linear.bias"))
    nodes.append(
        helper.make_node(
            "Gemm", ["flat", "linear.weight", "linear.bias"], [OUTPUT_NAME], transB=1, name="linear"
        )
    )
    return _finish(name, nodes, inits)


def _transformer(name: str, seed: int) -> onnx.ModelProto:
    """A one-block transformer encoder over the 40 features read as 8 tokens of 5.

    Embedding (MatMul + bias) plus a learned position table, pre-norm single-head
    self-attention (LayerNorm, Q/K/V MatMuls, scaled Softmax, output projection,
    residual), a pre-norm GELU MLP (written with Erf) with a residual, mean pooling over
    tokens and a linear classifier: 2,554 parameters.
    """
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    tokens, width, d, hidden = 8, 5, 16, 32
    weights: dict[str, np.ndarray] = {
        "embed.weight": _he(rng, (width, d), width), "embed.bias": np.zeros(d, np.float32),
        "pos": (rng.standard_normal((tokens, d)) * 0.1).astype(np.float32),
        "ln1.weight": np.ones(d, np.float32), "ln1.bias": np.zeros(d, np.float32),
        "attn.q": _he(rng, (d, d), d), "attn.k": _he(rng, (d, d), d),
        "attn.v": _he(rng, (d, d), d), "attn.out": _he(rng, (d, d), d),
        "ln2.weight": np.ones(d, np.float32), "ln2.bias": np.zeros(d, np.float32),
        "mlp.fc1.weight": _he(rng, (d, hidden), d), "mlp.fc1.bias": np.zeros(hidden, np.float32),
        "mlp.fc2.weight": _he(rng, (hidden, d), hidden), "mlp.fc2.bias": np.zeros(d, np.float32),
        "head.weight": _he(rng, (NUM_CLASSES, d), d),
        "head.bias": np.zeros(NUM_CLASSES, np.float32),
    }
    consts: dict[str, np.ndarray] = {
        "shape_tokens": np.array([-1, tokens, width], np.int64),
        "scale": np.array(np.sqrt(d), np.float32), "half": np.array(0.5, np.float32),
        "one": np.array(1.0, np.float32), "inv_sqrt2": np.array(1 / np.sqrt(2), np.float32),
        "token_axis": np.array([1], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("Reshape", [INPUT_NAME, "shape_tokens"], ["tok"], name="tokens"),
        n("MatMul", ["tok", "embed.weight"], ["emb0"], name="embed"),
        n("Add", ["emb0", "embed.bias"], ["emb1"], name="embed_bias"),
        n("Add", ["emb1", "pos"], ["h0"], name="position"),
        n("LayerNormalization", ["h0", "ln1.weight", "ln1.bias"], ["n1", "ln1_mean", "ln1_rstd"],
          axis=-1, name="ln1"),
        n("MatMul", ["n1", "attn.q"], ["q"], name="q"),
        n("MatMul", ["n1", "attn.k"], ["k"], name="k"),
        n("MatMul", ["n1", "attn.v"], ["v"], name="v"),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        n("MatMul", ["q", "kt"], ["s0"], name="scores"),
        n("Div", ["s0", "scale"], ["s1"], name="scaled"),
        n("Softmax", ["s1"], ["att"], axis=-1, name="softmax"),
        n("MatMul", ["att", "v"], ["ctx"], name="context"),
        n("MatMul", ["ctx", "attn.out"], ["proj"], name="proj"),
        n("Add", ["h0", "proj"], ["h1"], name="residual1"),
        n("LayerNormalization", ["h1", "ln2.weight", "ln2.bias"], ["n2", "ln2_mean", "ln2_rstd"],
          axis=-1, name="ln2"),
        n("MatMul", ["n2", "mlp.fc1.weight"], ["f0"], name="fc1"),
        n("Add", ["f0", "mlp.fc1.bias"], ["f1"], name="fc1_bias"),
        n("Mul", ["f1", "inv_sqrt2"], ["g0"], name="gelu_scale"),
        n("Erf", ["g0"], ["g1"], name="gelu_erf"),
        n("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        n("Mul", ["f1", "g2"], ["g3"], name="gelu_mul"),
        n("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
        n("MatMul", ["g4", "mlp.fc2.weight"], ["f2"], name="fc2"),
        n("Add", ["f2", "mlp.fc2.bias"], ["f3"], name="fc2_bias"),
        n("Add", ["h1", "f3"], ["h2"], name="residual2"),
        n("ReduceMean", ["h2"], ["pooled"], axes=[1], keepdims=0, name="pool"),
        n("Gemm", ["pooled", "head.weight", "head.bias"], [OUTPUT_NAME], transB=1, name="head"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    return _finish(name, nodes, inits)


_BUILDERS: dict[str, Callable[[str, int], onnx.ModelProto]] = {
    "mlp": lambda name, seed: _mlp(name, 128, seed),
    "cnn": _cnn,
    "mlp-xl": lambda name, seed: _mlp(name, 1024, seed),
    "transformer": _transformer,
    "cnn-wide": lambda name, seed: _cnn(name, seed, channels=64),
}

REFERENCE_MODELS: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by :func:`build_reference_model`."""


def build_reference_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Build reference model ``name`` (one of :data:`REFERENCE_MODELS`) with seeded weights."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        known = ", ".join(REFERENCE_MODELS)
        raise ConfigError(f"unknown reference model {name!r}; known models: {known}") from None
    _require_onnx()
    return builder(name, seed)


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of float elements in the model's initializers of rank >= 1."""
    from onnx import TensorProto

    total = 0
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= 1:
            total += int(np.prod(init.dims))
    return total
