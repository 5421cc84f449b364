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
