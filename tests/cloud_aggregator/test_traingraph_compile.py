"""The compiled training graph: losses, optimizers, frozen parameters, running statistics,
bad models; checked against plain numpy and against finite differences of itself."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud_aggregator import ModelBuildError
from cloud_aggregator._artifacts import build_artifacts
from cloud_aggregator._models import build_reference_model
from cloud_aggregator._traingraph import (
    SGD,
    AdamW,
    BinaryCrossEntropy,
    CrossEntropy,
    Distillation,
    LossSpec,
    MeanSquaredError,
    parse_optimizer,
)
from edge_runtime import PortableTrainer
from edge_runtime._training import batch_schedule


def _linear(inputs: int = 6, outputs: int = 4, *, extra: list[Any] | None = None,
            opset: int = 17, batch: Any = "batch", seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["h"], transB=1, name="fc")]
    nodes += extra or [helper.make_node("Identity", ["h"], ["logits"], name="out")]
    graph = helper.make_graph(
        nodes, "lin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, outputs])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((outputs, inputs)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(outputs).astype(np.float32) * 0.1, "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _trainer(model: onnx.ModelProto, tmp: Path, **build: Any) -> PortableTrainer:
    build_artifacts(model, tmp, **build)
    trainer = PortableTrainer(artifacts_dir=tmp)
    return trainer


# -- the loss, through the whole compiled graph ------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference_loss(spec: LossSpec, logits: np.ndarray, y: np.ndarray, soft: np.ndarray,
                    w: np.ndarray, params: np.ndarray, anchor: np.ndarray) -> float:
    per = np.zeros(len(logits))
    for term in spec.terms:
        if isinstance(term, CrossEntropy):
            c = logits.shape[1]
            target = np.full_like(logits, term.label_smoothing / c)
            target[np.arange(len(y)), y.astype(int)] += 1 - term.label_smoothing
            value = -(target * np.log(_softmax(logits))).sum(axis=1)
        elif isinstance(term, MeanSquaredError):
            value = ((logits - y) ** 2).mean(axis=1)
        elif isinstance(term, BinaryCrossEntropy):
            p = 1 / (1 + np.exp(-logits))
            value = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)
        else:
            assert isinstance(term, Distillation)
            t = term.temperature
            pt, ps = _softmax(soft / t), _softmax(logits / t)
            value = (pt * (np.log(pt) - np.log(ps))).sum(axis=1) * t * t
        per += term.weight * value
    loss = float((per * w).sum() / w.sum())
    return loss + spec.prox_mu / 2 * float(((params - anchor) ** 2).sum())


LOSSES = {
    "ce_smoothing": (LossSpec(terms=(CrossEntropy(label_smoothing=0.1),)), "int"),
    "mse": (LossSpec(terms=(MeanSquaredError(),)), "float"),
    "bce": (LossSpec(terms=(BinaryCrossEntropy(),)), "binary"),
    "ce_plus_kd_prox": (
        LossSpec(terms=(CrossEntropy(), Distillation(weight=0.5, temperature=2.0)),
                 prox_mu=0.3), "int"),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_value_and_gradient_through_the_graph(name: str, tmp_path: Path) -> None:
    """One step at lr 1 moves the parameters by minus the gradient; the loss and that
    gradient match a numpy reference of the loss (and float32 central differences)."""
    spec, kind = LOSSES[name]
    rng = np.random.default_rng(1)
    trainer = _trainer(_linear(), tmp_path, loss=spec)
    n = 8
    x = rng.standard_normal((n, 6)).astype(np.float32)
    if kind == "int":
        y: np.ndarray = rng.integers(0, 4, n).astype(np.int64)
    elif kind == "binary":
        y = rng.integers(0, 2, (n, 4)).astype(np.float32)
    else:
        y = rng.standard_normal((n, 4)).astype(np.float32)
    soft = rng.standard_normal((n, 4)).astype(np.float32)
    w = rng.random(n).astype(np.float32) + 0.5
    start = trainer.get_parameters()
    anchor = start.copy()

    def loss_at(params: np.ndarray) -> float:
        wm, bm = params[:24].reshape(4, 6).astype(np.float64), params[24:].astype(np.float64)
        logits = x.astype(np.float64) @ wm.T + bm
        return _reference_loss(spec, logits, y, soft, w, params, anchor)

    trainer.set_parameters(start)  # the proximal anchor
    kwargs: dict[str, Any] = {"sample_weight": w}
    if spec.needs_soft_targets:
        kwargs["soft_targets"] = soft
    result = trainer.train(x, y, epochs=1, batch_size=n, lr=1.0, seed=0, **kwargs)
    assert result.steps == 1
    assert result.mean_loss == pytest.approx(loss_at(start), rel=1e-4)
    grad = start - trainer.get_parameters()
    h = 1e-3
    for i in range(start.size):
        up, down = start.astype(np.float64), start.astype(np.float64)
        up[i] += h
        down[i] -= h
        numeric = (loss_at(up) - loss_at(down)) / (2 * h)
        assert abs(grad[i] - numeric) <= 1e-4 + 1e-3 * abs(numeric), (i, grad[i], numeric)


def test_loss_spec_text_form() -> None:
    spec = LossSpec.parse("cross_entropy:label_smoothing=0.1+distillation:weight=0.5,"
                          "temperature=2+prox:mu=0.01")
    assert spec == LossSpec(terms=(CrossEntropy(label_smoothing=0.1),
                                   Distillation(weight=0.5, temperature=2.0)), prox_mu=0.01)
    assert LossSpec.from_json(spec.to_json()) == spec
    for bad, match in [("hinge", "unknown loss"), ("cross_entropy:smooth=1", "unknown option"),
                       ("mse+cross_entropy", "mix"), ("distillation", "first loss term"),
                       ("cross_entropy:label_smoothing=x", "not a number"),
                       ("cross_entropy:label_smoothing=1.5", r"\[0, 1\)")]:
        with pytest.raises(ModelBuildError, match=match):
            LossSpec.parse(bad)


def test_optimizer_text_form() -> None:
    assert parse_optimizer("sgd") == SGD()
    assert parse_optimizer("sgd:momentum=0.9,weight_decay=5e-4,nesterov=1") == SGD(
        momentum=0.9, weight_decay=5e-4, nesterov=True)
    assert parse_optimizer("adamw:mode=hf,eps=1e-6") == AdamW(mode="hf", eps=1e-6)
    for bad, match in [("lamb", "unknown optimizer"), ("sgd:lr=1", "unknown option"),
                       ("sgd:momentum=1.5", "momentum"), ("adamw:mode=x", "mode"),
                       ("sgd:nesterov=1", "Nesterov"), ("sgd:momentum", "key=value")]:
        with pytest.raises(ModelBuildError, match=match):
            parse_optimizer(bad)


# -- optimizers against numpy ------------------------------------------------------------------


def _mlp_reference(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
                   ) -> dict[str, np.ndarray]:
    """Gradients of mean cross-entropy of the reference mlp (Gemm, Relu x2, Gemm)."""
    acts = [x]
    pre = []
    for i in (1, 2, 3):
        z = acts[-1] @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        pre.append(z)
        acts.append(np.maximum(z, 0) if i < 3 else z)
    p = _softmax(acts[-1])
    g = p.copy()
    g[np.arange(len(y)), y] -= 1
    g /= len(y)
    grads = {}
    for i in (3, 2, 1):
        grads[f"fc{i}.weight"] = g.T @ acts[i - 1]
        grads[f"fc{i}.bias"] = g.sum(axis=0)
        if i > 1:
            g = (g @ params[f"fc{i}.weight"]) * (pre[i - 2] > 0)
    return grads


@pytest.mark.parametrize("optimizer", [SGD(), SGD(momentum=0.9, weight_decay=1e-3),
                                       SGD(momentum=0.5, nesterov=True),
                                       AdamW(weight_decay=0.01), AdamW(mode="hf", eps=1e-6)])
def test_optimizer_steps_match_numpy(optimizer: Any, tmp_path: Path) -> None:
    trainer = _trainer(build_reference_model("mlp", 0), tmp_path, optimizer=optimizer)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((70, 40)).astype(np.float32)
    y = rng.integers(0, 10, 70).astype(np.int64)
    lr = 0.05 if isinstance(optimizer, SGD) else 1e-3
    flat = trainer.get_parameters().astype(np.float64)
    names = [n for n, _ in trainer.parameter_shapes()]
    params, pos = {}, 0
    for name, shape in trainer.parameter_shapes():
        params[name] = flat[pos:pos + math.prod(shape)].reshape(shape)
        pos += math.prod(shape)
    state: dict[str, list[np.ndarray]] = {n: [np.zeros_like(params[n])] * 2 for n in names}
    plan = batch_schedule(70, epochs=2, batch_size=16, rng=np.random.default_rng(5),
                          max_steps=None)
    for t, (s, e) in enumerate(zip(plan.starts, plan.ends, strict=True), start=1):
        idx = plan.order[s:e]
        grads = _mlp_reference(params, x[idx].astype(np.float64), y[idx])
        for n in names:
            p, g = params[n], grads[n]
            if isinstance(optimizer, SGD):
                g = g + optimizer.weight_decay * p
                if optimizer.momentum:
                    m = optimizer.momentum * state[n][0] + g
                    state[n][0] = m
                    g = g + optimizer.momentum * m if optimizer.nesterov else m
                params[n] = p - lr * g
            else:
                b1, b2, eps, wd = optimizer.beta1, optimizer.beta2, optimizer.eps, \
                    optimizer.weight_decay
                m = b1 * state[n][0] + (1 - b1) * g
                v = b2 * state[n][1] + (1 - b2) * g * g
                state[n] = [m, v]
                if optimizer.mode == "torch":
                    p = p * (1 - lr * wd)
                    params[n] = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
                else:
                    size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                    params[n] = (p - size * m / (np.sqrt(v) + eps)) * (1 - lr * wd)
    result = trainer.train(x, y, epochs=2, batch_size=16, lr=lr, seed=5)
    assert result.steps == len(plan.starts)
    expected = np.concatenate([params[n].ravel() for n in names])
    np.testing.assert_allclose(trainer.get_parameters(), expected, rtol=2e-4, atol=2e-5)


def test_chunked_runs_equal_one_run(tmp_path: Path) -> None:
    """Parameters and optimizer state carry between runs exactly."""
    build_artifacts(build_reference_model("cnn", 0), tmp_path, optimizer="sgd:momentum=0.9")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 40)).astype(np.float32)
    y = rng.integers(0, 10, 200).astype(np.int64)
    one, many = PortableTrainer(artifacts_dir=tmp_path), PortableTrainer(artifacts_dir=tmp_path)
    one.train(x, y, epochs=3, batch_size=32, lr=0.05, seed=1)
    calls = {"n": 0}

    def count() -> bool:
        calls["n"] += 1
        return False

    import edge_runtime._portable as portable

    saved = portable.CHUNK_S
    portable.CHUNK_S = 1e-9  # every chunk is one step: 21 runs
    try:
        many.train(x, y, epochs=3, batch_size=32, lr=0.05, seed=1, should_stop=count)
    finally:
        portable.CHUNK_S = saved
    assert calls["n"] == 21
    np.testing.assert_allclose(many.get_parameters(), one.get_parameters(), rtol=1e-6, atol=1e-7)


# -- frozen parameters, running statistics, dropout, transformers -----------------------------


def test_frozen_parameters_stay_and_do_not_travel(tmp_path: Path) -> None:
    model = build_reference_model("mlp", 0)
    info = build_artifacts(model, tmp_path, trainable=["fc3.weight", "fc3.bias"])
    assert [n for n, _ in info.parameters] == ["fc3.weight", "fc3.bias"]
    assert (tmp_path / "frozen.f32").exists()
    trainer = PortableTrainer(artifacts_dir=tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 40)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int64)
    before = trainer.evaluate(x, y)
    trainer.train(x, y, epochs=20, batch_size=16, lr=0.1, seed=0)
    after = trainer.evaluate(x, y)
    assert trainer.num_parameters == 1290 and after.loss < before.loss
    # The frozen body still computes the features: the eval graph agrees with a model
    # whose last layer was replaced by the trained one.
    trained = trainer.get_parameters()
    tensors = {t.name: t for t in model.graph.initializer}
    tensors["fc3.weight"].CopyFrom(numpy_helper.from_array(trained[:1280].reshape(10, 128),
                                                           "fc3.weight"))
    tensors["fc3.bias"].CopyFrom(numpy_helper.from_array(trained[1280:], "fc3.bias"))
    import onnxruntime as ort

    logits = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    ce = -(shifted[np.arange(64), y] - np.log(np.exp(shifted).sum(axis=1))).mean()
    assert after.loss == pytest.approx(float(ce), rel=1e-4)


def _bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["input", "w", "b"], ["h"], transB=1),
        helper.make_node("BatchNormalization", ["h", "s", "t", "rm", "rv"], ["hn"],
                         momentum=0.8, name="bn"),
        helper.make_node("Relu", ["hn"], ["a"]),
        helper.make_node("Dropout", ["a", "ratio"], ["d"], name="drop"),
        helper.make_node("Gemm", ["d", "w2", "b2"], ["logits"], transB=1),
    ]
    inits = {
        "w": rng.standard_normal((8, 6)), "b": np.zeros(8), "s": np.ones(8), "t": np.zeros(8),
        "rm": np.zeros(8), "rv": np.ones(8), "w2": rng.standard_normal((3, 8)) * 0.3,
        "b2": np.zeros(3),
    }
    graph = helper.make_graph(
        nodes, "bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array(0.2, np.float32), "ratio")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_batch_norm_running_statistics_travel_and_dropout_trains(tmp_path: Path) -> None:
    info = build_artifacts(_bn_model(), tmp_path)
    assert info.buffers == ("rm", "rv")
    names = [n for n, _ in info.parameters]
    assert names[-2:] == ["rm", "rv"] and "s" in names
    trainer = PortableTrainer(artifacts_dir=tmp_path)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((96, 6)) * 3 + 2).astype(np.float32)
    y = (x[:, 0] > 2).astype(np.int64) + (x[:, 1] > 2).astype(np.int64)
    before = trainer.get_parameters()
    trainer.train(x, y, epochs=1, batch_size=96, lr=1e-9, seed=0)  # one step, no learning
    after = trainer.get_parameters()
    h = x @ before[:48].reshape(8, 6).T
    np.testing.assert_allclose(after[-16:-8], 0.2 * h.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after[-8:], 0.8 + 0.2 * h.var(axis=0), rtol=1e-4, atol=1e-5)
    first = trainer.evaluate(x, y)
    trainer.train(x, y, epochs=30, batch_size=16, lr=0.05, seed=1)
    last = trainer.evaluate(x, y)
    assert last.loss < 0.7 * first.loss and last.accuracy > 0.6


def test_small_transformer_trains(tmp_path: Path) -> None:
    trainer = _trainer(build_reference_model("transformer", 0), tmp_path,
                       optimizer="adamw:weight_decay=0")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 40)).astype(np.float32)
    y = (x.reshape(128, 8, 5).mean(axis=(1, 2)) > 0).astype(np.int64) * 3
    before = trainer.evaluate(x, y)
    trainer.train(x, y, epochs=15, batch_size=32, lr=3e-3, seed=0)
    after = trainer.evaluate(x, y)
    assert after.loss < 0.5 * before.loss and after.accuracy > 0.9


def test_old_opset_models_are_converted(tmp_path: Path) -> None:
    model = _linear(opset=13)
    info = build_artifacts(model, tmp_path)
    assert info.extra["opset"] == 17


# -- bad models: a typed error at build time, naming what is wrong ---------------------------


def test_bad_models_are_named(tmp_path: Path) -> None:
    sin = _linear(extra=[helper.make_node("Sin", ["h"], ["logits"], name="wave")])
    with pytest.raises(ModelBuildError, match=r"node 'wave' \(Sin\).*no gradient rule"):
        build_artifacts(sin, tmp_path)
    fixed = _linear(batch=32)
    with pytest.raises(ModelBuildError, match=r"fixed batch size 32.*dynamic first axis"):
        build_artifacts(fixed, tmp_path)
    twice = _linear()
    twice.graph.initializer.append(twice.graph.initializer[0])
    with pytest.raises(ModelBuildError, match=r"named twice.*w"):
        build_artifacts(twice, tmp_path)
    custom = _linear(extra=[helper.make_node("FusedGemm", ["h"], ["logits"], name="f",
                                             domain="com.microsoft")])
    custom.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(ModelBuildError, match="not a standard ONNX operator"):
        build_artifacts(custom, tmp_path)
    none = _linear()
    with pytest.raises(ModelBuildError, match="no float initializer"):
        build_artifacts(none, tmp_path, frozen=["w", "b"])
    unused = _linear()
    unused.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "spare"))
    with pytest.raises(ModelBuildError, match=r"spare.*do not affect the loss"):
        build_artifacts(unused, tmp_path)
    new = _linear(opset=22)
    with pytest.raises(ModelBuildError, match="opset 22"):
        build_artifacts(new, tmp_path)
    assert not (tmp_path / "artifacts.json").exists()
