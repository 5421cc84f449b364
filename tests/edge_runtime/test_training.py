"""The portable training backend on real ONNX Runtime (plain onnxruntime) and real MNIST-1D data."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from agent_rig import linear_regression_artifacts
from onnx import numpy_helper

from cloud_aggregator._artifacts import build_artifacts, initial_parameters, read_manifest
from cloud_aggregator._models import build_reference_model
from edge_runtime import ArtifactError, TrainingBackendMissing
from edge_runtime._datasets import load_mnist1d
from edge_runtime._ort import install_hint
from edge_runtime._training import Trainer, batch_schedule, open_trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # Shared across runs (pytest keeps its base temp's parent), so generation is paid once.
    return load_mnist1d(cache_dir=tmp_path_factory.getbasetemp().parent / "fleetlearn-cache")


def _trainer(directory: Path) -> Trainer:
    return open_trainer(directory, intra_op_threads=1, inter_op_threads=1)


def test_device_side_imports_no_torch_no_onnx_no_cloud() -> None:
    code = (
        "import sys\n"
        "import edge_runtime, edge_runtime._portable, edge_runtime._data, edge_runtime._datasets\n"
        "from edge_runtime._ort import import_onnxruntime\n"
        "import_onnxruntime()\n"
        "bad = [m for m in ('torch', 'cloud_aggregator', 'mnist1d', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_edge_runtime_source_never_imports_graph_tooling() -> None:
    # onnxruntime itself imports onnx when it happens to be installed; our code must not.
    banned = re.compile(r"^\s*(import|from)\s+(onnx|torch|cloud_aggregator)\b", re.MULTILINE)
    for path in (REPO / "edge_runtime").glob("*.py"):
        match = banned.search(path.read_text())
        assert match is None, f"{path.name}: {match.group(0).strip() if match else ''}"


def test_missing_onnxruntime_says_what_to_do() -> None:
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None\n"
        "from edge_runtime._ort import import_onnxruntime\n"
        "from edge_runtime import TrainingBackendMissing\n"
        "try:\n"
        "    import_onnxruntime()\n"
        "except TrainingBackendMissing as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install onnxruntime" in result.stdout
    assert issubclass(TrainingBackendMissing, ImportError)


def test_ort_training_artifacts_on_plain_onnxruntime_say_what_to_do(tmp_path: Path) -> None:
    # Artifacts of the optional backend, as an older fleetlearn wrote them: a device
    # with plain onnxruntime must say what to do, not crash.
    (tmp_path / "artifacts.json").write_text(
        '{"format": "fleetlearn-artifacts/1", "files": {}, "content_hash": ""}')
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises((TrainingBackendMissing, ArtifactError)) as info:
        open_trainer(tmp_path)
    assert "artifacts.json" in str(info.value) or "portable" in str(info.value)


def test_install_hint_names_the_portable_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(sys, "platform", "linux")
    hint = install_hint()
    assert "no wheel" in hint and "portable" in hint


def test_layout_is_graph_order_and_matches_the_model(mlp_dir: Path) -> None:
    trainer = _trainer(mlp_dir)
    shapes = trainer.parameter_shapes()
    assert [name for name, _ in shapes] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
    ]
    assert shapes[0][1] == (128, 40)
    assert trainer.num_parameters == 23050
    assert trainer.backend == "portable"
    # Each slice of the flat vector is the model's initializer of that name.
    model = onnx.load(str(mlp_dir / "model.onnx"))
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    flat = trainer.get_parameters()
    offset = 0
    for name, shape in shapes:
        size = math.prod(shape)
        np.testing.assert_array_equal(flat[offset : offset + size].reshape(shape), tensors[name])
        offset += size
    assert offset == flat.size
    assert read_manifest(mlp_dir).parameters == shapes
    np.testing.assert_array_equal(initial_parameters(mlp_dir), flat)


def test_set_then_get_is_exact_and_no_step_changes_nothing(mlp_dir: Path) -> None:
    trainer = _trainer(mlp_dir)
    vector = np.random.default_rng(1).standard_normal(trainer.num_parameters).astype(np.float32)
    trainer.set_parameters(vector)
    np.testing.assert_array_equal(trainer.get_parameters(), vector)
    x = np.zeros((4, 40), np.float32)
    y = np.zeros(4, np.int64)
    trainer.evaluate(x, y)
    result = trainer.train(x, y, epochs=3, max_steps=0)
    assert result.steps == 0 and result.samples_seen == 0
    np.testing.assert_array_equal(trainer.get_parameters(), vector)
    trainer.train(x, y, epochs=1, lr=0.1)
    assert not np.array_equal(trainer.get_parameters(), vector)


def test_wrong_parameter_vector_is_refused(mlp_dir: Path) -> None:
    trainer = _trainer(mlp_dir)
    with pytest.raises(ArtifactError, match="23050"):
        trainer.set_parameters(np.zeros(23049, np.float32))
    with pytest.raises(ValueError):
        trainer.set_parameters(np.zeros((2, 23050), np.float32))
    with pytest.raises(ValueError):
        trainer.set_learning_rate(-1.0)


def test_training_on_mnist1d_lowers_loss_and_raises_accuracy(mlp_dir: Path, mnist) -> None:  # type: ignore[no-untyped-def]
    trainer = _trainer(mlp_dir)
    x, y = mnist.x_train[:3000], mnist.y_train[:3000]
    before = trainer.evaluate(mnist.x_test, mnist.y_test)
    result = trainer.train(x, y, epochs=5, batch_size=32, lr=0.05, seed=0)
    after = trainer.evaluate(mnist.x_test, mnist.y_test)
    assert result.steps == 5 * math.ceil(3000 / 32)
    assert result.samples_seen == 5 * 3000
    assert not result.stopped_early
    assert trainer.learning_rate == pytest.approx(0.05)
    assert before.accuracy < 0.2
    assert after.loss < 0.75 * before.loss
    assert after.accuracy > before.accuracy + 0.2
    assert after.accuracy > 0.35


def test_stop_between_batches_reports_true_sample_count(mlp_dir: Path) -> None:
    trainer = _trainer(mlp_dir)
    x = np.random.default_rng(0).standard_normal((100, 40)).astype(np.float32)
    y = np.arange(100, dtype=np.int64) % 10
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    result = trainer.train(x, y, epochs=4, batch_size=16, should_stop=stop, seed=3)
    # Steps run in chunks between checks; whatever ran, the count is the exact sum of
    # the batches taken (each epoch of 100 ends with a batch of 4).
    plan = batch_schedule(100, epochs=4, batch_size=16, rng=np.random.default_rng(3),
                          max_steps=None)
    taken = plan.ends[: result.steps] - plan.starts[: result.steps]
    assert result.steps >= 1 and result.samples_seen == int(taken.sum())
    assert result.stopped_early == (result.steps < len(plan.starts))
    expired = trainer.train(x, y, epochs=4, batch_size=16, deadline_s=0.0)
    assert expired.stopped_early and expired.samples_seen == 0
    assert math.isnan(expired.mean_loss)
    partial = trainer.train(x, y, epochs=1, batch_size=64)
    assert partial.steps == 2 and partial.samples_seen == 100


def test_should_stop_is_asked_between_chunks_and_the_first_chunk_is_one_step(
    mlp_dir: Path,
) -> None:
    trainer = _trainer(mlp_dir)
    x = np.random.default_rng(0).standard_normal((100, 40)).astype(np.float32)
    y = np.arange(100, dtype=np.int64) % 10
    calls = {"n": 0}

    def stop_after_first() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    result = trainer.train(x, y, epochs=4, batch_size=16, should_stop=stop_after_first)
    assert result.stopped_early and result.steps == 1 and result.samples_seen == 16


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if path.is_file():
            (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_the_schedule_is_drawn_as_training_reaches_it() -> None:
    """Chunks of the lazy schedule are the steps of drawing every epoch first, and a task
    of a billion epochs costs nothing until it trains (its deadline holds)."""
    import tracemalloc

    n, bs, epochs = 70, 16, 5
    rng = np.random.default_rng(7)
    eager = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    plan = batch_schedule(n, epochs=epochs, batch_size=bs, rng=np.random.default_rng(7),
                          max_steps=None)
    assert plan.total == math.ceil(n / bs) * epochs
    batches = []
    for first, last in ((0, 1), (1, 4), (4, 13), (13, plan.total)):
        order, starts, ends = plan.chunk(first, last)
        batches += [order[s:e] for s, e in zip(starts, ends, strict=True)]
    expected = [eager[e * n + b * bs:e * n + min((b + 1) * bs, n)]
                for e in range(epochs) for b in range(math.ceil(n / bs))]
    assert len(batches) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(batches, expected, strict=True))
    with pytest.raises(ValueError, match="in order"):
        plan.chunk(0, 1)  # epoch 0 was forgotten once chunk 13.. was drawn

    tracemalloc.start()
    try:
        huge = batch_schedule(320, epochs=10**9, batch_size=32, rng=np.random.default_rng(0),
                              max_steps=None)
        order, starts, ends = huge.chunk(0, 25)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert huge.total == 10**10 and len(starts) == 25 and len(order) == 3 * 320
    assert peak < 1_000_000  # three epochs' order, not a billion


def test_missing_artifact_file(mlp_dir: Path, tmp_path: Path) -> None:
    broken = _copy(mlp_dir, tmp_path / "a")
    (broken / "train.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"train\.onnx"):
        _trainer(broken)


@pytest.mark.parametrize("name", ["parameters.f32", "train.onnx", "eval.onnx"])
def test_corrupted_file_fails_its_hash(mlp_dir: Path, tmp_path: Path, name: str) -> None:
    broken = _copy(mlp_dir, tmp_path / "a")
    data = bytearray((broken / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte ORT itself would load as a wrong weight
    (broken / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        _trainer(broken)


def test_portable_artifacts_need_their_manifest(mlp_dir: Path, tmp_path: Path) -> None:
    broken = _copy(mlp_dir, tmp_path / "a")
    (broken / "artifacts.json").unlink()
    with pytest.raises(ArtifactError, match=r"artifacts\.json"):
        _trainer(broken)


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "fleetlearn-artifacts/9"}',
                                  '{"format": "fleetlearn-artifacts/2", "files": {"../x": "0"}}'])
def test_malformed_manifest_is_a_typed_error(mlp_dir: Path, tmp_path: Path, text: str) -> None:
    broken = _copy(mlp_dir, tmp_path / "a")
    (broken / "artifacts.json").write_text(text)
    with pytest.raises(ArtifactError):
        _trainer(broken)


def test_manifest_that_lies_about_the_graph_is_refused(mlp_dir: Path, tmp_path: Path) -> None:
    import json

    from broker_bridge import content_hash

    broken = _copy(mlp_dir, tmp_path / "a")
    manifest = json.loads((broken / "artifacts.json").read_text())
    manifest["train"]["parameters"][0]["in"] = "fl::in/nope"
    (broken / "artifacts.json").write_text(json.dumps(manifest))
    assert manifest["content_hash"] == content_hash(manifest["files"])
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        _trainer(broken)


def test_pinned_content_hash(mlp_dir: Path) -> None:
    good = read_manifest(mlp_dir).content_hash
    assert _trainer(mlp_dir).manifest is not None
    open_trainer(mlp_dir, expected_hash=good)
    with pytest.raises(ArtifactError, match="content hash"):
        open_trainer(mlp_dir, expected_hash="0" * 64)


def test_frozen_parameters_are_not_exchanged(tmp_path: Path) -> None:
    build_artifacts(
        build_reference_model("cnn", 0), tmp_path, frozen=["conv1.weight"], optimizer="adamw"
    )
    trainer = _trainer(tmp_path)
    names = [name for name, _ in trainer.parameter_shapes()]
    assert "conv1.weight" not in names and names[0] == "conv1.bias"
    assert trainer.num_parameters == 7460 - 125
    x = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    y = np.arange(64, dtype=np.int64) % 10
    before = trainer.get_parameters()
    trainer.train(x, y, epochs=1, lr=1e-3)
    assert trainer.get_parameters().shape == before.shape


def test_regression_with_mse(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    trainer = _trainer(linear_regression_artifacts(tmp_path))
    x = rng.standard_normal((256, 5)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0], [3.0]], np.float32)).astype(np.float32)
    before = trainer.evaluate(x, y)
    trainer.train(x, y, epochs=20, batch_size=32, lr=0.05, seed=0)
    after = trainer.evaluate(x, y)
    assert math.isnan(after.accuracy)
    assert after.loss < 0.01 * before.loss
