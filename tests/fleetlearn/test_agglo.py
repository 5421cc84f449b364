"""Agglomerative tiers: a model per tier, knowledge moved by distillation on a public
bridge set (``fleetlearn._agglo``), with real ONNX Runtime training and, for the tree,
real Mosquitto brokers (one for the cloud, one per edge site).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_profiles import ConfigError
from edge_runtime import load_mnist1d
from fleetlearn._agglo import (
    BRIDGE_SEED,
    DistillSettings,
    TierModel,
    TierModels,
    bridge_inputs,
    kl_divergence,
)
from fleetlearn._tree import LocalTree, TreeSpec


def _cache(tmp_path: Path) -> Path:
    return tmp_path.parent.parent / "fleetlearn-cache"


def test_tier_models_parse_and_fill_missing_tiers() -> None:
    tiers = TierModels.parse("device:mlp, edge:cnn, cloud:cnn-wide")
    assert (tiers.device, tiers.edge, tiers.cloud) == ("mlp", "cnn", "cnn-wide")
    assert not tiers.uniform
    assert tiers.text() == "device:mlp,edge:cnn,cloud:cnn-wide"
    # A tier left out trains the model of the tier below it.
    assert TierModels.parse("edge:cnn") == TierModels(device="mlp", edge="cnn", cloud="cnn")
    assert TierModels.parse("device:cnn", default="mlp").uniform


@pytest.mark.parametrize(("text", "message"), [
    ("device:mlp,edge:resnet", "not a reference model"),
    ("devices:mlp", "unknown tier 'devices'"),
    ("device:mlp,device:cnn", "given twice"),
    ("device=mlp", "not TIER:MODEL"),
    ("edge:", "not TIER:MODEL"),
    ("", "empty"),
])
def test_tier_models_refuse_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TierModels.parse(text)


def test_tree_spec_checks_its_tier_models() -> None:
    with pytest.raises(ConfigError, match="not a reference model"):
        TreeSpec(tier_models="device:mlp,cloud:big").tiers()
    with pytest.raises(ConfigError, match="temperature"):
        DistillSettings(temperature=0)


def test_bridge_set_is_public_and_not_the_devices_data(tmp_path: Path) -> None:
    bridge = bridge_inputs(samples=300, cache_dir=_cache(tmp_path))
    again = bridge_inputs(samples=300, cache_dir=_cache(tmp_path))
    devices = load_mnist1d(cache_dir=_cache(tmp_path), num_samples=2000)
    assert bridge.shape == (300, 40) and bridge.dtype == np.float32
    np.testing.assert_array_equal(bridge, again)  # every tier derives the same set
    assert BRIDGE_SEED != 42
    # No bridge input is one of the devices' samples.
    seen = {row.tobytes() for row in devices.x_train}
    assert not any(row.tobytes() in seen for row in bridge)


def test_distillation_moves_the_student_towards_the_teacher(tmp_path: Path) -> None:
    """Real ORT training of the compiled distillation loss: the KL to a teacher's soft
    labels falls, and the student comes to agree with the teacher's predictions."""
    bridge = bridge_inputs(samples=600, cache_dir=_cache(tmp_path))
    teacher = TierModel("mlp", tmp_path / "mlp", seed=1)
    student = TierModel("cnn", tmp_path / "cnn", settings=DistillSettings(epochs=4))
    # A teacher with opinions: its random weights, sharpened.
    targets = teacher.logits(teacher.initial, bridge) * 3.0
    out = student.distil(student.initial, targets, bridge, seed=0)
    assert out.kl_before == pytest.approx(student.kl(student.initial, targets, bridge))
    assert out.kl_after < 0.5 * out.kl_before
    assert out.params.shape == student.initial.shape
    assert not np.allclose(out.params, student.initial)

    def agreement(params: np.ndarray) -> float:
        return float(np.mean(student.logits(params, bridge).argmax(1) == targets.argmax(1)))

    assert agreement(out.params) > agreement(student.initial) + 0.2


def test_kl_divergence_matches_its_definition() -> None:
    t = np.array([[2.0, 0.0, -1.0]])
    assert kl_divergence(t, t, 2.0) == pytest.approx(0.0, abs=1e-12)
    s = np.array([[0.0, 0.0, 0.0]])
    p = np.exp(t / 2) / np.exp(t / 2).sum()
    want = 4.0 * float(np.sum(p * (np.log(p) - np.log(np.full(3, 1 / 3)))))
    assert kl_divergence(t, s, 2.0) == pytest.approx(want)


def test_tier_model_refuses_parameters_of_another_size(tmp_path: Path) -> None:
    model = TierModel("mlp", tmp_path / "mlp")
    with pytest.raises(ValueError, match="parameters"):
        model.logits(np.zeros(10, np.float32), np.zeros((2, 40), np.float32))


@pytest.mark.slow
def test_a_tree_with_a_model_per_tier_trains(tmp_path: Path) -> None:
    """Cloud + 2 edges x 3 devices over real brokers: devices train the mlp, edges the
    cnn, the cloud cnn-wide, with parent -> child feedback at both tiers; the wire
    carries the child's model on each link, and the cloud's model ends above chance."""
    spec = TreeSpec(edges=2, devices_per_edge=3, cloud_rounds=4,
                    tier_models="device:mlp,edge:cnn,cloud:cnn-wide", num_samples=4000,
                    bridge_samples=1000, distill=DistillSettings(feedback_epochs=1))
    tree = LocalTree(spec, workdir=tmp_path / "tree", cache_dir=_cache(tmp_path))
    try:
        tree.start()
        assert tree.wait_ready(timeout_s=60)
        cloud, strategy = tree.cloud, tree.cloud_strategy
        assert cloud is not None and strategy is not None
        assert cloud.config.model == "cnn"  # the cloud's children (edges) train the cnn
        x_test, y_test = tree.data.x_test, tree.data.y_test
        untrained = strategy.own.accuracy(strategy.tier_params, x_test, y_test)
        history = tree.run(timeout_s=300)
        closed = [m for m in history if m.outcome == "closed"]
        assert len(closed) == 4 and all(m.devices_reported == 2 for m in closed)
        for edge in tree.edges:
            assert edge is not None and edge.aggregator.config.model == "mlp"
            assert edge.aggregator.layout.size == tree._tier_model("mlp").size
        assert cloud.layout.size == tree._tier_model("cnn").size
        accuracy = [a for _, a in strategy.tier_accuracy]
        assert len(accuracy) == 4
        print("cloud model accuracy by round", accuracy, "untrained", untrained)
        assert accuracy[-1] > 0.15 and accuracy[-1] > untrained + 0.05  # chance: 0.1
        assert accuracy[-1] == strategy.own.accuracy(strategy.tier_params, x_test, y_test)
        assert strategy.tier_params.size == tree._tier_model("cnn-wide").size
        # Each aggregator kept its last round's children's models (the ensemble teacher):
        # the cloud its 2 edges' cnn models, each edge its 3 devices' mlp models.
        assert len(strategy.children) == 2
        assert all(m.size == cloud.layout.size for _, m in strategy.children)
        for edge in tree.edges:
            assert edge is not None
            kept = edge.strategy.children  # type: ignore[attr-defined]
            assert len(kept) == 3 and all(w > 0 for w, _ in kept)
            # Their FedAvg is the edge's model (plain FedAvg at the edges).
            mean = sum(w * m for w, m in kept) / sum(w for w, _ in kept)
            np.testing.assert_allclose(mean, edge.aggregator.params, atol=1e-5)
        # The cloud model learnt from its children: each round's distillation moved it.
        assert all(after < before for before, after in strategy.distil_kl)
    finally:
        tree.close()


def test_simulate_checks_its_tier_models() -> None:
    from fleetlearn import SimConfig

    cfg = SimConfig(topology="cloud:1,edge:2,device:4", model="mlp",
                    tier_models="device:mlp,edge:cnn,cloud:cnn-wide")
    assert cfg.tier_models == "device:mlp,edge:cnn,cloud:cnn-wide"
    with pytest.raises(ConfigError, match="needs a topology"):
        SimConfig(tier_models="edge:cnn")
    with pytest.raises(ConfigError, match="device tier must train"):
        SimConfig(topology="cloud:1,edge:2,device:4", model="mlp", tier_models="device:cnn")
    with pytest.raises(ConfigError, match="unknown tier"):
        SimConfig(topology="cloud:1,edge:2,device:4", tier_models="fog:cnn")


@pytest.mark.slow
def test_simulate_an_agglomerative_tree(tmp_path: Path) -> None:
    from fleetlearn import simulate

    result = simulate(topology="cloud:1,edge:2,device:4", rounds=2, model="mlp",
                      tier_models="device:mlp,edge:cnn,cloud:cnn-wide",
                      out_dir=tmp_path / "run", quiet=True, seed=1,
                      aggregator={"local_epochs": 1})
    report = result.report
    assert report["tier_models"] == "device:mlp,edge:cnn,cloud:cnn-wide"
    assert len(report["cloud_model_accuracy_by_round"]) == 2
    assert report["cloud_model_accuracy"] == report["cloud_model_accuracy_by_round"][-1]


def test_tier_model_refuses_a_folder_of_other_artifacts(tmp_path: Path) -> None:
    TierModel("mlp", tmp_path / "m", settings=DistillSettings(temperature=2.0))
    with pytest.raises(ConfigError, match="other artifacts"):
        TierModel("mlp", tmp_path / "m", settings=DistillSettings(temperature=4.0))
    with pytest.raises(ConfigError, match="other artifacts"):
        TierModel("cnn", tmp_path / "m", settings=DistillSettings(temperature=2.0))


def test_ensemble_logits_weigh_each_child() -> None:
    from fleetlearn._agglo_rounds import ensemble_logits

    def logits(model: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.outer(x, model)

    x = np.array([1.0, 2.0])
    children = [(1.0, np.array([1.0, 0.0], np.float32)), (3.0, np.array([0.0, 1.0], np.float32))]
    np.testing.assert_allclose(ensemble_logits(logits, children, x),
                               [[0.25, 0.75], [0.5, 1.5]])


def test_a_loss_that_only_distils_evaluates_its_primary_term(tmp_path: Path) -> None:
    """``cross_entropy:weight=0+distillation``: the training graph skips the weight-0
    cross-entropy, the eval graph reports it unweighted (it used to refuse to build)."""
    data = load_mnist1d(cache_dir=_cache(tmp_path), num_samples=2000)
    model = TierModel("mlp", tmp_path / "mlp")
    x, y = data.x_test[:200], data.y_test[:200]
    logits = model.logits(model.initial, x).astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce = float(-np.mean(logp[np.arange(len(y)), y]))
    result = model._trainer.evaluate(x, y)
    assert result.loss == pytest.approx(ce, rel=1e-4)
    assert result.accuracy == pytest.approx(model.accuracy(model.initial, x, y))


def test_the_cloud_model_survives_a_checkpoint(tmp_path: Path) -> None:
    import json

    from fleetlearn._agglo_cloud import AgglomerativeRounds

    bridge = bridge_inputs(samples=50, cache_dir=_cache(tmp_path))
    own, child = TierModel("cnn", tmp_path / "cnn"), TierModel("mlp", tmp_path / "mlp")
    first = AgglomerativeRounds(own=own, child=child, bridge=bridge)
    first.tier_params = np.random.default_rng(0).standard_normal(own.size).astype(np.float32)
    first.tier_accuracy = [(1, 0.25), (2, 0.5)]
    saved = json.loads(json.dumps(first.state()))  # the checkpoint is JSON
    again = AgglomerativeRounds(own=own, child=child, bridge=bridge)
    again.load_state(saved)
    np.testing.assert_array_equal(again.tier_params, first.tier_params)
    assert again.tier_accuracy == first.tier_accuracy
    other = AgglomerativeRounds(own=child, child=child, bridge=bridge)
    with pytest.raises(ConfigError, match="saved cloud model"):
        other.load_state(saved)
