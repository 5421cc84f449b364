"""Edge tiers over real brokers: one Mosquitto for the cloud and one per edge site, each
started by the test on a free port; real agents training MNIST-1D with ONNX Runtime.

- a tree of cloud + 3 edges trains (fast: 2 devices per edge; slow: 10, 30 devices), and
  a tree three tiers deep (an edge whose parent is an edge);
- a site killed mid-round: its devices move to another edge, training goes on, and no
  device update reaches a cloud round twice;
- an edge killed mid-job and restarted resumes the job from its store (the parent's
  model is not adopted again, closed child rounds are not run again) and its update
  counts once at the cloud.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from keys import ENROLMENT, device_key
from waiting import wait_for

from broker_bridge import MosquittoProcess, TaskSpec
from cloud_aggregator import Aggregator, RoundEnded, Store, UpdateAccepted
from cloud_aggregator._rounds import DeviceState
from edge_runtime import LocalData, LocalResult, Trainer, TrainingBudget
from fleetlearn._edge import EdgeAggregator
from fleetlearn._tree import LocalTree, TreeSpec


def _cache(tmp_path: Path) -> Path:
    return tmp_path.parent.parent / "fleetlearn-cache"


def _updates(agg: Aggregator, round_index: int) -> list[str]:
    """The devices whose updates ``agg`` accepted (counted) in ``round_index``."""
    return [k.device_id for k in agg.store.accepted_keys(agg.fleet, round_index)]


class Lineage:
    """Which child updates reached which cloud round: each edge round is tied to the
    parent task (cloud round) its job answered when it ended."""

    def __init__(self) -> None:
        self.edge_rounds: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)

    def watch(self, edge: EdgeAggregator) -> None:
        fleet = edge.aggregator.fleet

        def on_event(event: object) -> None:
            job = edge.strategy.job
            if isinstance(event, RoundEnded) and event.metrics.outcome == "closed" \
                    and job is not None:
                parent_round = int(job.key.split(":")[1])
                self.edge_rounds[fleet].append((event.metrics.round, parent_round))

        edge.aggregator.subscribe(on_event)

    def updates_in_cloud_round(self, tree: LocalTree, cloud_round: int,
                               stores: dict[str, Store]) -> list[tuple[str, int, str]]:
        """Every child update (edge fleet, edge round, device) that reached
        ``cloud_round`` through the edges the cloud counted in it."""
        assert tree.cloud is not None
        updates: list[tuple[str, int, str]] = []
        for edge_id in _updates(tree.cloud, cloud_round):
            fleet = f"site-{edge_id.split('-')[1]}"
            for edge_round, parent_round in self.edge_rounds[fleet]:
                if parent_round == cloud_round:
                    updates += [(fleet, edge_round, k.device_id)
                                for k in stores[fleet].accepted_keys(fleet, edge_round)]
        return updates


def test_tree_of_three_edges_trains(tmp_path: Path) -> None:
    spec = TreeSpec(edges=3, devices_per_edge=2, cloud_rounds=3)
    tree = LocalTree(spec, workdir=tmp_path / "tree", cache_dir=_cache(tmp_path))
    try:
        tree.start()
        assert tree.wait_ready(timeout_s=60)
        cloud = tree.cloud
        assert cloud is not None and cloud.recorder.evaluator is not None
        before = cloud.recorder.evaluator.evaluate(cloud.params).accuracy
        accepted: list[UpdateAccepted] = []
        cloud.subscribe(lambda e: accepted.append(e) if isinstance(e, UpdateAccepted) else None)
        history = tree.run(timeout_s=240)
        assert cloud.model_version == 3, [m.to_json() for m in history]
        closed = [m for m in history if m.outcome == "closed"]
        assert [m.devices_reported for m in closed] == [3, 3, 3]  # one update per edge
        assert closed[-1].accuracy is not None and closed[-1].accuracy > before + 0.05
        for r in (1, 2, 3):
            assert sorted(_updates(cloud, r)) == ["edge-0", "edge-1", "edge-2"]
        for i, edge in enumerate(tree.edges):
            assert edge is not None
            rounds = [m for m in edge.aggregator.history if m.outcome == "closed"]
            assert len(rounds) == 3  # one child round per cloud task
            assert all(m.devices_reported == 2 for m in rounds)
            # Each child round trained from the cloud's model it adopted: versions
            # alternate adopted (odd) and aggregated (even).
            assert [m.model_version for m in rounds] == [2, 4, 6]
            children = {d for m in rounds for d in _updates(edge.aggregator, m.round)}
            assert children == {f"dev-{2 * i:03d}", f"dev-{2 * i + 1:03d}"}
        # An edge's update weighs what its children's counted updates carried.
        last = [e for e in accepted if e.task_round == 3]
        assert sorted(e.device for e in last) == ["edge-0", "edge-1", "edge-2"]
        for event in last:
            edge = tree.edges[int(event.device.split("-")[1])]
            assert edge is not None
            final = max(m.round for m in edge.aggregator.history)
            children = _updates(edge.aggregator, final)
            samples = sum(len(tree.parts[int(d.split("-")[1])]) for d in children)
            assert event.num_samples == samples
    finally:
        tree.close()


def test_site_failure_moves_devices_and_training_goes_on(tmp_path: Path) -> None:
    spec = TreeSpec(edges=3, devices_per_edge=2, cloud_rounds=5, rounds_per_task=3,
                    cloud_deadline_s=40.0, edge_deadline_s=15.0, failover_after_s=1.0)
    tree = LocalTree(spec, workdir=tmp_path / "tree", cache_dir=_cache(tmp_path))
    lineage = Lineage()
    try:
        tree.start()
        for edge in tree.edges:
            assert edge is not None
            lineage.watch(edge)
        assert tree.wait_ready(timeout_s=60)
        cloud = tree.cloud
        assert cloud is not None
        tree.run_in_background(timeout_s=400)
        edge0 = tree.edges[0]
        assert edge0 is not None

        def mid_job() -> bool:  # edge 0 is running child rounds for cloud round 2
            job = edge0.strategy.job
            return (cloud.round_index == 2 and job is not None
                    and job.key.split(":")[1] == "2" and not job.finished)

        assert wait_for(mid_job, timeout=120, step=0.005)

        def moved_to_edge_1() -> bool:
            return all(tree.devices[d].moves[-1].to_parent == "edge-1" for d in (0, 1))

        with cloud.condition:  # the cloud waits while the site's devices fail over
            # (its rounds take a fraction of failover_after_s: without this the run
            # could end before they arrive)
            tree.kill_edge(0)
            killed_at_version = cloud.model_version
            assert wait_for(moved_to_edge_1, timeout=60)
        assert wait_for(lambda: cloud.done, timeout=400), cloud.status_line()
        assert cloud.model_version == 5
        history = cloud.history
        after = [m for m in history if m.round > 2 and m.outcome == "closed"]
        assert after and all(m.devices_reported == 2 for m in after)
        assert all("edge-0" not in _updates(cloud, m.round) for m in after)
        # The site's devices moved to the next candidate (edge 1) and trained there.
        for d in (0, 1):
            moves = tree.devices[d].moves
            assert moves[-1].to_parent == "edge-1", moves
        edge1 = tree.edges[1]
        assert edge1 is not None
        later = [r for r, parent in lineage.edge_rounds["site-1"]
                 if parent > killed_at_version + 1]
        moved = {d for r in later for d in _updates(edge1.aggregator, r)}
        assert {"dev-000", "dev-001"} <= moved
        # No device update reaches a cloud round twice (the killed edge's store read
        # as it was left).
        stores = {f"site-{i}": Store(tree.workdir / f"edge-{i}" / "aggregator" /
                                     "aggregator.sqlite") for i in range(3)}
        reached: list[tuple[str, int, str]] = []
        for m in history:
            if m.outcome == "closed":
                updates = lineage.updates_in_cloud_round(tree, m.round, stores)
                assert updates, m.round
                per_device = collections.Counter(device for _, _, device in updates)
                assert max(per_device.values()) <= spec.rounds_per_task, per_device
                reached += updates
        assert len(reached) == len(set(reached))  # each update reached one cloud round
        assert history[-1].accuracy is not None and history[-1].accuracy > 0.3
        for store in stores.values():
            store.close()
    finally:
        tree.close()


class HeldEdge(EdgeAggregator):
    """An edge whose first parent task waits for ``release`` (edge 1 of the resume test:
    the cloud's round stays open while edge 0 is down, as a slower site would keep it)."""

    release = threading.Event()

    def train(self, task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
              budget: TrainingBudget) -> LocalResult:
        if self.aggregator.fleet == "site-1" and task.round == 1:
            self.release.wait(timeout=budget.seconds / 2)
        return super().train(task, params, data, trainer, budget)


def test_killed_edge_resumes_its_job_from_its_store(tmp_path: Path) -> None:
    spec = TreeSpec(edges=2, devices_per_edge=2, cloud_rounds=2, rounds_per_task=4,
                    cloud_deadline_s=240.0, edge_deadline_s=30.0, failover_after_s=300.0,
                    cloud_quorum=2)
    HeldEdge.release.clear()
    tree = LocalTree(spec, workdir=tmp_path / "tree", cache_dir=_cache(tmp_path),
                     edge_class=HeldEdge)
    try:
        tree.start()
        assert tree.wait_ready(timeout_s=60)
        cloud = tree.cloud
        assert cloud is not None
        tree.run_in_background(timeout_s=300)
        edge0 = tree.edges[0]
        assert edge0 is not None

        def some_rounds_done() -> bool:
            job = edge0.strategy.job
            return job is not None and 1 <= job.rounds_done < job.rounds

        assert wait_for(some_rounds_done, timeout=120, step=0.002)
        tree.kill_edge(0)
        reopened = EdgeAggregator  # the same class, from the same state folder
        state = tree.workdir / "edge-0" / "aggregator"
        assert (state / "aggregator.sqlite").exists()
        time.sleep(0.5)
        edge = tree.restart_edge(0)
        assert isinstance(edge, reopened)
        job = edge.strategy.job
        assert job is not None and job.rounds_done >= 1  # resumed, not started over
        key, base = job.key, job.base_version

        def edge_back() -> bool:  # the cloud re-sent the task edge 0 was busy with
            with cloud._lock:
                rnd = cloud.current_round
                return (rnd is not None and rnd.spec.index == 1
                        and rnd.state("edge-0") is not DeviceState.DROPPED)

        assert wait_for(edge_back, timeout=120)
        HeldEdge.release.set()
        assert wait_for(lambda: cloud.done, timeout=300), cloud.status_line()
        assert cloud.model_version == 2
        assert sorted(_updates(cloud, 1)) == ["edge-0", "edge-1"]
        assert sorted(_updates(cloud, 2)) == ["edge-0", "edge-1"]
        # The resumed job ran its remaining rounds on the model it had adopted.
        rounds = edge.aggregator.store.rounds(edge.aggregator.fleet)
        closed = [r for r in rounds if r.state == "closed"]
        assert len(closed) == 2 * spec.rounds_per_task
        indices = [r.round for r in rounds]
        assert len(indices) == len(set(indices))
        versions = [r.model_version for r in closed]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        job_now = edge.strategy.job
        assert job_now is not None and job_now.key != key  # the next task's job
        assert base in versions  # the killed job's first round trained the adopted model
        assert np.isfinite(cloud.params).all()
    finally:
        HeldEdge.release.set()
        tree.close()


@pytest.mark.slow
def test_tree_of_thirty_devices_trains(tmp_path: Path) -> None:
    spec = TreeSpec(edges=3, devices_per_edge=10, cloud_rounds=8)
    tree = LocalTree(spec, workdir=tmp_path / "tree", cache_dir=_cache(tmp_path))
    try:
        tree.start()
        assert tree.wait_ready(timeout_s=120)
        cloud = tree.cloud
        assert cloud is not None and cloud.recorder.evaluator is not None
        before = cloud.recorder.evaluator.evaluate(cloud.params).accuracy
        history = tree.run(timeout_s=600)
        assert cloud.model_version == 8
        closed = [m for m in history if m.outcome == "closed"]
        assert all(m.devices_reported == 3 for m in closed)
        for edge in tree.edges:
            assert edge is not None
            assert all(m.devices_reported == 10 for m in edge.aggregator.history
                       if m.outcome == "closed")
        assert closed[-1].accuracy is not None and closed[-1].accuracy > before + 0.15
    finally:
        tree.close()


def test_simulate_a_topology_with_a_site_failure(tmp_path: Path) -> None:
    from fleetlearn import simulate

    result = simulate(topology="cloud:1,edge:3,device:6", rounds=4, model="mlp",
                      edge_crash_fraction=0.34, out_dir=tmp_path / "run", quiet=True,
                      seed=1, aggregator={"local_epochs": 1})
    report = result.report
    assert result.report_path == tmp_path / "run" / "report.json"
    assert report["topology"] == "cloud:1,edge:3,device:6"
    crashed = [e for e in report["edges"] if e["crashed_at_round"] is not None]
    alive = [e for e in report["edges"] if e["crashed_at_round"] is None]
    assert len(crashed) == 1 and crashed[0]["crashed_at_round"] == 3
    assert report["cloud"]["rounds_closed"] == 4
    assert [r["devices_reported"] for r in report["rounds"]][:2] == [3, 3]
    assert report["rounds"][-1]["devices_reported"] == 2
    # Only the failed site's devices move (the run may end before they do: moving
    # waits out failover_after_s; test_site_failure_... checks that they train there).
    home = int(crashed[0]["id"].split("-")[1])
    assert set(report["devices"]["moved"]) <= {f"dev-{2 * home:03d}",
                                               f"dev-{2 * home + 1:03d}"}
    trained = sum(e["children_trained"] for e in alive)
    assert 4 <= trained <= 4 + len(report["devices"]["moved"])
    assert report["final_accuracy"] is not None


@pytest.mark.slow
def test_simulate_a_topology_with_byzantine_devices(tmp_path: Path) -> None:
    """``byzantine_*`` faults in a tree: the devices a flat fleet of the seed would make
    attackers attack through their edges (norm 1000), whose screens cut or refuse them,
    and the cloud still trains."""
    from edge_runtime._faults import FaultSpec
    from fleetlearn import simulate

    faults = FaultSpec(byzantine_fraction=0.25, byzantine_kind="norm", byzantine_scale=1e3)
    result = simulate(topology="cloud:1,edge:2,device:8", rounds=3, model="mlp", seed=2,
                      faults=faults, out_dir=str(tmp_path / "run"), quiet=True)
    report = result.report
    assert result.report_path == tmp_path / "run" / "report.json"  # a str path is a path
    attackers = [f"dev-{d:03d}" for d in range(8) if faults.is_byzantine(2, f"dev-{d:03d}")]
    assert report["devices"]["byzantine"] == attackers == ["dev-002", "dev-006"]  # one a site
    stopped = sum(e["updates_cut"] + sum(e["updates_refused"].values())
                  for e in report["edges"])
    assert stopped >= len(attackers)  # each attacker's first update at least
    assert report["cloud"]["rounds_closed"] == 3
    closed = [r for r in report["rounds"] if r["outcome"] == "closed"]
    assert closed[-1]["update_norm"] < 100  # no attacker's norm-1000 update got through


def test_topology_settings_are_checked() -> None:
    from device_profiles import ConfigError
    from fleetlearn import SimConfig

    assert SimConfig(topology="cloud:1,edge:2,device:8").tiers() == (2, 8)
    for bad in ("edge:3,device:10", "cloud:2,edge:1,device:4", "cloud:1,edge:0,device:4",
                "cloud:1,edge:2,device:x", "cloud:1,router:2,device:4"):
        with pytest.raises(ConfigError):
            SimConfig(topology=bad)
    with pytest.raises(ConfigError):
        SimConfig(topology="cloud:1,edge:2,device:8", partition="iid")
    with pytest.raises(ConfigError):
        SimConfig(edge_crash_fraction=1.0)


def test_a_tree_three_tiers_deep_trains(tmp_path: Path, artifacts: Path,
                                        mosquittos: Callable[..., MosquittoProcess]) -> None:
    """cloud <- mid edge <- leaf edge <- 2 devices: an edge's parent may be an edge."""
    from broker_bridge import Channel, MqttTransport
    from cloud_aggregator import AggregatorConfig
    from edge_runtime import DeviceStatus, FailoverAgent, ParentLink, load_mnist1d

    brokers = [mosquittos() for _ in range(3)]
    cloud_url, mid_url, leaf_url = (b.url for b in brokers)

    def config(fleet: str, **kw: object) -> AggregatorConfig:
        settings: dict[str, object] = {
            "fleet": fleet, "model": "mlp", "devices_per_round": 1, "over_selection": 1.0,
            "quorum": 1, "min_devices": 1, "local_epochs": 1, "server_opt": "fedavg",
            "store_synchronous": "NORMAL"}
        settings.update(kw)
        return AggregatorConfig(**settings)  # type: ignore[arg-type]

    cloud = Aggregator(
        config=config("cloud", rounds=2, deadline_s=120.0, state_dir=tmp_path / "cloud"),
        channel=Channel(transport=MqttTransport(url=cloud_url, client_id="aggregator",
                                                clean_session=False, backoff_min_s=0.1,
                                                backoff_max_s=1.0), fleet="cloud"),
        artifacts_dir=artifacts, enrolment=ENROLMENT)
    mid = EdgeAggregator(config=config("mid", deadline_s=60.0), broker=mid_url,
                         device_id="edge-mid", state_dir=tmp_path / "mid",
                         parents=[ParentLink(broker=cloud_url, fleet="cloud")],
                         artifacts_dir=artifacts, key=device_key("edge-mid"),
                         enrolment=ENROLMENT)
    leaf = EdgeAggregator(config=config("leaf", deadline_s=30.0, devices_per_round=2,
                                        quorum=2, min_devices=2),
                          broker=leaf_url, device_id="edge-leaf", state_dir=tmp_path / "leaf",
                          parents=[ParentLink(broker=mid_url, fleet="mid")],
                          artifacts_dir=artifacts, key=device_key("edge-leaf"),
                          enrolment=ENROLMENT)
    data = load_mnist1d(cache_dir=_cache(tmp_path))
    devices = [FailoverAgent(device_id=f"dev-{i}", state_dir=tmp_path / f"dev-{i}",
                             parents=[ParentLink(broker=leaf_url, fleet="leaf")],
                             data=LocalData(x=data.x_train[i * 300:(i + 1) * 300],
                                            y=data.y_train[i * 300:(i + 1) * 300]),
                             status_probe=DeviceStatus, key=device_key(f"dev-{i}"))
               for i in range(2)]
    try:
        cloud.start()
        for part in (mid, leaf, *devices):
            part.start()
        history = cloud.run(timeout_s=180)
        assert cloud.model_version == 2, [m.to_json() for m in history]
        assert [k.device_id for k in cloud.store.accepted_keys("cloud")] == ["edge-mid"] * 2
        mid_rounds = [m for m in mid.aggregator.history if m.outcome == "closed"]
        assert len(mid_rounds) == 2
        assert all(_updates(mid.aggregator, m.round) == ["edge-leaf"] for m in mid_rounds)
        leaf_rounds = [m for m in leaf.aggregator.history if m.outcome == "closed"]
        assert len(leaf_rounds) == 2
        assert all(sorted(_updates(leaf.aggregator, m.round)) == ["dev-0", "dev-1"]
                   for m in leaf_rounds)
        # The cloud's model moved by what the devices trained, through two edges.
        assert not np.allclose(cloud.params, mid.aggregator.model.initial)
    finally:
        for device in devices:
            device.stop()
        leaf.stop()
        mid.stop()
        cloud.stop()
        cloud.close()
        cloud.channel.transport.close()


def test_a_tree_refuses_the_flat_settings_it_would_ignore() -> None:
    """Selection, async rounds, secure aggregation, device faults, broker and thread
    settings and most aggregator overrides shape a flat fleet only: with a topology they
    are refused by name, not silently dropped; the four a tree takes still work."""
    from device_profiles import ConfigError
    from edge_runtime._fleet import FaultSpec
    from fleetlearn import SimConfig

    tree = "cloud:1,edge:2,device:8"
    for given, named in (({"selection": "oort"}, "selection"), ({"mode": "async"}, "mode"),
                         ({"secure_aggregation": True}, "secure_aggregation"),
                         ({"per_round": 4}, "per_round"),
                         ({"faults": FaultSpec(crash_fraction=0.2)}, "faults"),
                         ({"broker": "mqtt://127.0.0.1:1883"}, "broker"),
                         ({"aggregator": {"robust": "multi_krum"}}, "aggregator.robust"),
                         ({"aggregator": {"dp_epsilon": 8.0}}, "aggregator.dp_epsilon")):
        with pytest.raises(ConfigError, match=f"^{named}: a tree simulation"):
            SimConfig(topology=tree, **given)  # type: ignore[arg-type]
        SimConfig(**given)  # type: ignore[arg-type]  # a flat fleet takes it
    cfg = SimConfig(topology=tree, aggregator={"lr": 0.1, "local_epochs": 2,
                                               "batch_size": 16, "server_opt": "fedavg"})
    assert cfg.aggregator_config().lr == 0.1
