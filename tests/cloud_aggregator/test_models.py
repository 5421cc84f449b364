"""Reference models, the artifact builder and the ``fleetlearn artifacts`` command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud_aggregator import ModelBuildError
from cloud_aggregator._artifacts import (
    build_artifacts,
    content_hash,
    initial_parameters,
    read_manifest,
)
from cloud_aggregator._models import REFERENCE_MODELS, build_reference_model, count_parameters
from device_profiles._errors import ConfigError
from fleetlearn.cli import main

EXPECTED_PARAMETERS = {"mlp": 23_050, "cnn": 7_460, "mlp-xl": 1_101_834, "transformer": 2_554,
                       "cnn-wide": 44_042}


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_reference_models_are_valid_ir10(name: str) -> None:
    model = build_reference_model(name, 0)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    # Round-trips through bytes with the same IR (what onnx 1.17 writes).
    assert onnx.load_from_string(model.SerializeToString()).ir_version == 10


def test_reference_models_are_seeded() -> None:
    def weights(seed: int) -> np.ndarray:
        model = build_reference_model("mlp", seed)
        return numpy_helper.to_array(model.graph.initializer[0])

    np.testing.assert_array_equal(weights(3), weights(3))
    assert not np.array_equal(weights(3), weights(4))
    w = weights(0)
    assert w.shape == (128, 40)
    assert abs(float(w.std()) - np.sqrt(2 / 40)) < 0.02  # He initialisation


def test_unknown_reference_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="mlp, cnn, mlp-xl"):
        build_reference_model("resnet", 0)


def test_manifest_hashes_and_parameters(tmp_path: Path) -> None:
    info = build_artifacts(build_reference_model("cnn", 1), tmp_path)
    data = json.loads((tmp_path / "artifacts.json").read_text())
    assert data["format"] == "fleetlearn-artifacts/2" and data["backend"] == "portable"
    assert sorted(data["files"]) == ["eval.onnx", "parameters.f32", "train.onnx"]
    for name in data["files"]:
        assert data["files"][name] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert data["content_hash"] == content_hash(data["files"]) == info.content_hash
    assert data["num_parameters"] == 7460
    assert data["input"] == {"name": "input", "shape": ["batch", 40], "dtype": "float32"}
    assert data["loss"]["terms"][0]["name"] == "cross_entropy"
    assert data["optimizer"]["kind"] == "sgd"
    assert read_manifest(tmp_path) == info
    assert initial_parameters(tmp_path).shape == (7460,)
    # parameters.f32 is the same vector, raw little-endian float32.
    np.testing.assert_array_equal(np.fromfile(tmp_path / "parameters.f32", "<f4"),
                                  initial_parameters(tmp_path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]
    # Only standard ONNX operators, in both graphs (the Loop body included).
    for name in ("train.onnx", "eval.onnx"):
        model = onnx.load(str(tmp_path / name))
        assert {o.domain for o in model.opset_import} == {""}
        nodes = list(model.graph.node)
        for node in model.graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    nodes.extend(attr.g.node)
        assert {n.domain for n in nodes} <= {"", "ai.onnx"}
    eval_model = onnx.load(str(tmp_path / "eval.onnx"))
    assert "logits" in [o.name for o in eval_model.graph.output]


def _tiny(**overrides: object) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.ones((3, 4), np.float32), "w"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
    ]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    for key, value in overrides.items():
        setattr(model, key, value)
    return model


def test_builder_refuses_unsupported_models(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="IR version 11"):
        build_artifacts(_tiny(ir_version=11), tmp_path)
    broken = _tiny()
    broken.graph.node[0].input[1] = "missing"
    with pytest.raises(ModelBuildError, match=r"onnx\.checker"):
        build_artifacts(broken, tmp_path)
    frozen_all = _tiny()
    with pytest.raises(ModelBuildError, match="no float initializer"):
        build_artifacts(frozen_all, tmp_path, frozen=["w", "b"])
    with pytest.raises(ModelBuildError, match="no trainable float parameter named nope"):
        build_artifacts(_tiny(), tmp_path, trainable=["nope"])
    with pytest.raises(ModelBuildError, match="unknown loss"):
        build_artifacts(_tiny(), tmp_path, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ModelBuildError, match="unknown optimizer"):
        build_artifacts(_tiny(), tmp_path, optimizer="lamb")  # type: ignore[arg-type]
    two_outputs = _tiny()
    two_outputs.graph.output.append(two_outputs.graph.output[0])
    with pytest.raises(ModelBuildError):
        build_artifacts(two_outputs, tmp_path)
    with pytest.raises(ModelBuildError, match="not found"):
        build_artifacts(tmp_path / "absent.onnx", tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk" * 10)
    with pytest.raises(ModelBuildError):
        build_artifacts(tmp_path / "junk.onnx", tmp_path)
    assert not (tmp_path / "artifacts.json").exists()


def test_builder_accepts_a_path_and_adamw(tmp_path: Path) -> None:
    onnx.save(_tiny(), str(tmp_path / "m.onnx"))
    info = build_artifacts(
        tmp_path / "m.onnx", tmp_path / "out", optimizer="adamw", trainable=["w"]
    )
    assert info.parameters == (("w", (3, 4)),)
    assert info.frozen == (("b", (3,)),)


def test_cli_reference_and_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["artifacts", "reference", "mlp", "--out", str(tmp_path / "ref")]) == 0
    assert "23050" in capsys.readouterr().out
    assert (tmp_path / "ref" / "model.onnx").exists()
    code = main(
        [
            "artifacts",
            "build",
            str(tmp_path / "ref" / "model.onnx"),
            "--out",
            str(tmp_path / "b"),
            "--frozen",
            "fc1.weight",
            "--optimizer",
            "adamw",
        ]
    )
    assert code == 0
    assert read_manifest(tmp_path / "b").frozen == (("fc1.weight", (128, 40)),)
    assert main(["artifacts", "reference", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "known models" in capsys.readouterr().err


def test_every_python_package_ships_in_the_wheel() -> None:
    # A subpackage missing from pyproject's explicit list imports fine from a checkout
    # and is absent from the wheel a device installs.
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {
        ".".join(init.parent.relative_to(repo).parts)
        for init in repo.glob("*/**/__init__.py")
        if init.parent.relative_to(repo).parts[0] in {p.split(".")[0] for p in listed}
    }
    assert found == listed
