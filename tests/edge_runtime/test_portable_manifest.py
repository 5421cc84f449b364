"""A portable manifest is checked whole when the trainer loads it: every file it opens is
one it verified, every graph input and output it names exists, every shape adds up.

Each case edits a valid manifest (its content hash covers the file list only, so the
edit keeps it) and expects an ``ArtifactError`` at ``open_trainer``, before any data or
training could be blamed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_aggregator._artifacts import build_artifacts
from cloud_aggregator._models import build_reference_model
from edge_runtime import ArtifactError
from edge_runtime._training import open_trainer

Edit = Callable[[dict[str, Any], Path], None]


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out


def _edited(src: Path, dst: Path, edit: Edit) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "artifacts.json").read_text())
    edit(manifest, dst)
    (dst / "artifacts.json").write_text(json.dumps(manifest))
    return dst


def test_the_unedited_copy_loads(mlp_dir: Path, tmp_path: Path) -> None:
    trainer = open_trainer(_edited(mlp_dir, tmp_path / "a", lambda m, d: None))
    assert trainer.num_parameters == 23050


# -- files the manifest names --------------------------------------------------------------


def _outside(directory: Path, name: str) -> Path:
    """A copy of ``name`` outside the artifacts folder (never hash-checked)."""
    elsewhere = directory.parent / f"elsewhere-{directory.name}"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(directory / name, elsewhere / name)
    return elsewhere / name


def _absolute_train(m: dict[str, Any], d: Path) -> None:
    m["train"]["file"] = str(_outside(d, "train.onnx"))


def _relative_eval(m: dict[str, Any], d: Path) -> None:
    m["eval"]["file"] = f"../{_outside(d, 'eval.onnx').parent.name}/eval.onnx"


def _absolute_initial(m: dict[str, Any], d: Path) -> None:
    path = _outside(d, "parameters.f32")
    np.full(np.fromfile(path, "<f4").size, 7.0, np.float32).tofile(path)
    m["initial"] = str(path)


def _unlisted_initial(m: dict[str, Any], d: Path) -> None:
    (d / "other.f32").write_bytes((d / "parameters.f32").read_bytes())
    m["initial"] = "other.f32"


def _unlisted_frozen(m: dict[str, Any], d: Path) -> None:
    m["frozen_values"] = "/dev/zero"


@pytest.mark.parametrize("edit", [_absolute_train, _relative_eval, _absolute_initial,
                                  _unlisted_initial],
                         ids=["absolute train.file", "../ eval.file", "absolute initial",
                              "unlisted initial"])
def test_a_file_outside_the_verified_list_is_refused(mlp_dir: Path, tmp_path: Path,
                                                     edit: Edit) -> None:
    broken = _edited(mlp_dir, tmp_path / "a", edit)
    with pytest.raises(ArtifactError, match="not one of the files"):
        open_trainer(broken)


def test_frozen_values_outside_the_list_are_refused(tmp_path: Path) -> None:
    built = tmp_path / "cnn"
    build_artifacts(build_reference_model("cnn", 0), built, frozen=["conv1.weight"])
    open_trainer(built)
    broken = _edited(built, tmp_path / "a", _unlisted_frozen)
    with pytest.raises(ArtifactError, match="not one of the files"):
        open_trainer(broken)


# -- names and shapes the graphs must agree with ------------------------------------------


def _set(path: str, value: Any) -> Edit:
    """An edit setting ``path`` (keys and list indexes, dotted) to ``value``."""

    def edit(m: dict[str, Any], _d: Path) -> None:
        *parents, last = path.split(".")
        node: Any = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return edit


def _drop_last_eval_parameter(m: dict[str, Any], _d: Path) -> None:
    m["eval"]["parameters"].pop()


def _swap_eval_biases(m: dict[str, Any], _d: Path) -> None:
    params = m["eval"]["parameters"]  # fc1.bias and fc2.bias: both [128]
    params[1], params[3] = params[3], params[1]


BROKEN: dict[str, tuple[Edit, str]] = {
    "train output renamed": (_set("train.loss_sum", "fl::loss_total"), "outputs"),
    "train parameter output renamed": (_set("train.parameters.0.out", "fl::out/x"), "outputs"),
    "eval output renamed": (_set("eval.correct", "fl::hits"), "eval graph"),
    "eval parameter missing": (_drop_last_eval_parameter, "eval"),
    "eval parameters reordered": (_swap_eval_biases, "eval graph's parameters"),
    "eval input renamed": (_set("eval.x", "features"), "eval graph"),
    "negative dim": (_set("parameters.1.shape", [-128]), "shape"),
    "dim not an integer": (_set("parameters.1.shape", [128.5]), "shape"),
    "huge state dim": (_set("train.state.0.shape", [1 << 40, 40]), "shape"),
    "state shape no parameter has": (_set("train.state.1.shape", [40, 128]), "no parameter"),
    "state shape of another parameter": (_set("train.state.1.shape", [10]), "its graph"),
    "anchor of no parameter": (_set("train.global.0.parameter", "fc9.weight"), "global"),
    "label dtype not the graph's": (_set("label.dtype", "float32"), "label"),
}


@pytest.fixture(scope="module")
def adam_prox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Artifacts with optimizer state (two tensors per parameter) and FedProx anchors."""
    out = tmp_path_factory.mktemp("adam-prox")
    build_artifacts(build_reference_model("mlp", 0), out, optimizer="adamw",
                    loss="cross_entropy+prox:mu=0.01")
    return out


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_manifest_that_does_not_fit_its_graphs_is_refused_at_load(
        adam_prox_dir: Path, tmp_path: Path, case: str) -> None:
    edit, match = BROKEN[case]
    broken = _edited(adam_prox_dir, tmp_path / "a", edit)
    with pytest.raises(ArtifactError, match=match):
        open_trainer(broken)


def test_a_parameter_shape_the_graph_does_not_declare_is_refused(mlp_dir: Path,
                                                                  tmp_path: Path) -> None:
    # plain SGD: no optimizer state to give the edit away first; the sizes still add up
    broken = _edited(mlp_dir, tmp_path / "a", _set("parameters.0.shape", [40, 128]))
    with pytest.raises(ArtifactError, match=r"gives 'fc1.weight' the shape \[40, 128\]"):
        open_trainer(broken)


def test_the_adam_prox_artifacts_train_unedited(adam_prox_dir: Path) -> None:
    trainer = open_trainer(adam_prox_dir)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 40)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int64)
    assert trainer.train(x, y, lr=1e-3).samples_seen == 64
    assert np.isfinite(trainer.evaluate(x, y).loss)
