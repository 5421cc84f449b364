"""``fleetlearn edge``: its settings, and the process killed with SIGKILL mid-job and
started again over real brokers (one Mosquitto for the cloud, one for the site).

The cloud's round has two children: the edge (a ``fleetlearn edge`` process with two
devices) and a device attached to the cloud directly (a tree of mixed depth), which
answers only once the edge is back, so the cloud's round is still open when the
restarted edge announces the task it was busy with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from keys import ENROLMENT, device_key
from waiting import wait_for

from broker_bridge import Channel, Enrolment, MosquittoProcess, MqttTransport, TaskSpec
from cloud_aggregator import Aggregator, AggregatorConfig
from cloud_aggregator._rounds import DeviceState
from device_profiles import ConfigError
from edge_runtime import (
    Agent,
    DeviceKey,
    DeviceStatus,
    LocalData,
    LocalResult,
    Trainer,
    TrainingBudget,
    load_mnist1d,
    make_agent_transport,
    partition_dirichlet,
    state_key_path,
    train_locally,
)
from fleetlearn._edge_cli import EDGE, EdgeOptions
from fleetlearn.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_edge_help_lists_the_parent_side_and_every_aggregator_flag(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["edge", "--help"])
    out = capsys.readouterr().out
    for spec in EDGE.specs:
        if spec.flag is not None:
            assert spec.flag in out, spec.name
    assert "--parents" in out and "FLEETLEARN_EDGE_NAME" in out


def test_edge_options_are_checked_at_start_up() -> None:
    ok = EdgeOptions(device_id="edge-1",
                     parents="cloud@mqtt://127.0.0.1:1883, up@mqtts://other:8883")
    assert [(p.fleet, p.broker) for p in ok.links()] == [
        ("cloud", "mqtt://127.0.0.1:1883"), ("up", "mqtts://other:8883")]
    for bad in ("mqtt://127.0.0.1:1883", "cloud@http://x", "a@mqtt://x,a@mqtt://y"):
        with pytest.raises(ConfigError):
            EdgeOptions(device_id="edge-1", parents=bad)
    with pytest.raises(ConfigError):
        EdgeOptions(device_id="edge-1", parents="cloud@mqtt://x", rounds_per_task=0)
    tiered = EdgeOptions(device_id="edge-1", parents="cloud@mqtt://x", tier_model="cnn",
                         distill="temperature:3,epochs:1")
    assert (tiered.distill_settings().temperature, tiered.distill_settings().epochs) == (3, 1)
    for wrong, says in (({"tier_model": "resnet"}, "not a reference model"),
                        ({"tier_model": "cnn", "distill": "heat:2"}, "unknown name"),
                        ({"tier_model": "cnn", "distill": "epochs:0"}, "epochs must be"),
                        ({"distill": "epochs:2"}, "needs tier_model"),
                        ({"tier_model": "cnn", "bridge_samples": 0}, "bridge_samples")):
        with pytest.raises(ConfigError, match=says):
            EdgeOptions(device_id="edge-1", parents="cloud@mqtt://x", **wrong)
    with pytest.raises(ConfigError, match="children's --model"):
        tiered.tier_link(child_model="cnn", state_dir=Path("unused"), seed=0)


def _launch(site: str, cloud: str, state: Path, enrolment: Path,
            *extra: str, rounds_per_task: int = 4) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlearn", "-v", "edge", "--broker", site, "--fleet", "site-1",
         "--model", "mlp", "--devices-per-round", "2", "--over-selection", "1",
         "--quorum", "2", "--min-devices", "2", "--deadline-s", "60", "--local-epochs", "3",
         "--server-opt", "fedavg", "--state-dir", str(state), "--device-id", "edge-1",
         "--parents", f"cloud@{cloud}", "--rounds-per-task", str(rounds_per_task), "--quiet",
         "--enrolment", str(enrolment), *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=(state.parent / "edge.log").open("ab"))


def _enrol_edge(tmp_path: Path, state: Path) -> Path:
    """The cloud knows the edge's key (made where the edge keeps it); the edge knows its
    children's (dev-0, dev-1) from the enrolment file returned."""
    ENROLMENT.enrol("edge-1", DeviceKey.load_or_create(
        state_key_path(state / "device")).public_key, replace=True)
    site_enrolment = Enrolment(fleet="site-1")
    for did in ("dev-0", "dev-1"):
        site_enrolment.enrol(did, device_key(did).public_key)
    enrolment_file = tmp_path / "site-enrolment.toml"
    site_enrolment.write(enrolment_file)
    return enrolment_file


def _stop_all(edge: subprocess.Popen[bytes], cloud: Aggregator, agents: list[Agent],
              runner: threading.Thread) -> None:
    if edge.poll() is None:
        edge.send_signal(signal.SIGTERM)
        try:
            edge.wait(timeout=30)
        except subprocess.TimeoutExpired:
            edge.kill()
    cloud.stop()
    for agent in agents:
        agent.stop()
    if runner.is_alive():
        runner.join(timeout=30)
    cloud.close()
    cloud.channel.transport.close()


def _edge_rounds(state: Path) -> list[dict[str, object]]:
    path = state / "aggregator" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_edge_killed_mid_job_resumes_it_from_its_store(
        tmp_path: Path, mosquittos: Callable[..., MosquittoProcess]) -> None:
    cloud_broker, site_broker = mosquittos(), mosquittos()
    data = load_mnist1d(cache_dir=tmp_path.parent.parent / "fleetlearn-cache")
    parts = partition_dirichlet(data.y_train, 20, alpha=0.5, seed=0)
    cloud = Aggregator(
        config=AggregatorConfig(
            fleet="cloud", model="mlp", rounds=2, devices_per_round=2, over_selection=1.0,
            quorum=2, min_devices=2, deadline_s=300.0, server_opt="fedavg", local_epochs=12,
            state_dir=tmp_path / "cloud", store_synchronous="NORMAL"),
        enrolment=ENROLMENT,
        channel=Channel(transport=MqttTransport(url=cloud_broker.url, client_id="aggregator",
                                                clean_session=False, backoff_min_s=0.1,
                                                backoff_max_s=1.0), fleet="cloud"))
    agents = []
    state = tmp_path / "edge"
    enrolment_file = _enrol_edge(tmp_path, state)
    edge = _launch(site_broker.url, cloud_broker.url, state, enrolment_file)
    runner = threading.Thread(target=cloud.run, kwargs={"timeout_s": 300.0}, daemon=True)
    try:
        cloud.start()
        for i in range(2):
            did = f"dev-{i}"
            idx = np.concatenate([parts[2 * i], parts[2 * i + 1]])
            agent = Agent(device_id=did, channel=Channel(transport=make_agent_transport(
                site_broker.url, fleet="site-1", device_id=did, backoff_min_s=0.1,
                backoff_max_s=1.0), fleet="site-1"),
                data=LocalData(x=data.x_train[idx], y=data.y_train[idx]),
                state_dir=tmp_path / did, owns_transport=True, status_probe=DeviceStatus,
                key=device_key(did))
            agent.start()
            agents.append(agent)
        restarted = threading.Event()

        def after_restart(task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
                          budget: TrainingBudget) -> LocalResult:
            restarted.wait(timeout=min(budget.seconds / 2, 120.0))
            return train_locally(task, params, data, trainer, budget)

        direct = Agent(device_id="dev-c", channel=Channel(transport=make_agent_transport(
            cloud_broker.url, fleet="cloud", device_id="dev-c", backoff_min_s=0.1,
            backoff_max_s=1.0), fleet="cloud"),
            data=LocalData(x=data.x_train[parts[10]], y=data.y_train[parts[10]]),
            state_dir=tmp_path / "dev-c", owns_transport=True, status_probe=DeviceStatus,
            training=after_restart, key=device_key("dev-c"))
        direct.start()
        agents.append(direct)
        runner.start()
        # Killed once the first job has closed one or two of its four rounds.
        assert wait_for(lambda: len(_edge_rounds(state)) >= 1, timeout=120, step=0.005)
        edge.send_signal(signal.SIGKILL)
        edge.wait(timeout=30)
        killed_after = len(_edge_rounds(state))
        assert killed_after < 4, "the job finished before the kill: nothing to resume"
        edge = _launch(site_broker.url, cloud_broker.url, state, enrolment_file)

        def edge_back() -> bool:  # the cloud re-sent the task the edge was busy with
            with cloud._lock:
                rnd = cloud.current_round
                return (rnd is not None and rnd.spec.index == 1
                        and rnd.state("edge-1") is not DeviceState.DROPPED)

        assert wait_for(edge_back, timeout=120)
        restarted.set()
        assert wait_for(lambda: cloud.done, timeout=300), cloud.status_line()
        for r in (1, 2):
            assert sorted(k.device_id for k in cloud.store.accepted_keys("cloud", r)) == [
                "dev-c", "edge-1"]
        rounds = _edge_rounds(state)
        closed = [r for r in rounds if r["outcome"] == "closed"]
        assert [r["round"] for r in closed] == list(range(1, 9))  # each round once
        # Versions: the first job adopted v1 and its rounds made v2..v5; the second
        # adopted v6, its rounds made v7..v10. A job adopted again after the restart
        # would have shifted them.
        assert [r["model_version"] for r in closed] == [2, 3, 4, 5, 7, 8, 9, 10]
        assert np.isfinite(cloud.params).all()
    finally:
        _stop_all(edge, cloud, agents, runner)


@pytest.mark.slow
def test_an_edge_with_a_tier_model_sends_its_parent_that_model(
        tmp_path: Path, mosquittos: Callable[..., MosquittoProcess]) -> None:
    """``fleetlearn edge --model mlp --tier-model cnn``: the children train the mlp, the
    edge distils their ensemble into the cnn its parent trains and sends that update."""
    cloud_broker, site_broker = mosquittos(), mosquittos()
    data = load_mnist1d(cache_dir=tmp_path.parent.parent / "fleetlearn-cache")
    parts = partition_dirichlet(data.y_train, 4, alpha=0.5, seed=0)
    cloud = Aggregator(
        config=AggregatorConfig(
            fleet="cloud", model="cnn", rounds=1, devices_per_round=1, over_selection=1.0,
            quorum=1, min_devices=1, deadline_s=300.0, server_opt="fedavg", local_epochs=2,
            state_dir=tmp_path / "cloud", store_synchronous="NORMAL"),
        enrolment=ENROLMENT,
        channel=Channel(transport=MqttTransport(url=cloud_broker.url, client_id="aggregator",
                                                backoff_min_s=0.1, backoff_max_s=1.0),
                        fleet="cloud"))
    state = tmp_path / "edge"
    enrolment_file = _enrol_edge(tmp_path, state)
    edge = _launch(site_broker.url, cloud_broker.url, state, enrolment_file, "--tier-model",
                   "cnn", "--distill", "epochs:1", "--bridge-samples", "500",
                   rounds_per_task=1)
    agents = []
    runner = threading.Thread(target=cloud.run, kwargs={"timeout_s": 300.0}, daemon=True)
    try:
        cloud.start()
        start = cloud.params.copy()
        for i, did in enumerate(("dev-0", "dev-1")):
            agent = Agent(device_id=did, channel=Channel(transport=make_agent_transport(
                site_broker.url, fleet="site-1", device_id=did, backoff_min_s=0.1,
                backoff_max_s=1.0), fleet="site-1"),
                data=LocalData(x=data.x_train[parts[i]], y=data.y_train[parts[i]]),
                state_dir=tmp_path / did, owns_transport=True, status_probe=DeviceStatus,
                key=device_key(did))
            agent.start()
            agents.append(agent)
        runner.start()
        assert wait_for(lambda: cloud.done, timeout=300), cloud.status_line()
        assert [k.device_id for k in cloud.store.accepted_keys("cloud", 1)] == ["edge-1"]
        assert cloud.history[-1].outcome == "closed"
        assert cloud.params.shape == start.shape and not np.allclose(cloud.params, start)
        closed = [r for r in _edge_rounds(state) if r["outcome"] == "closed"]
        assert closed and closed[0]["devices_reported"] == 2  # the children's mlp round
        built = {p.parent.name for p in (state / "distil").glob("*/artifacts.json")}
        assert built == {"mlp", "cnn"}  # the edge distilled between its two models
    finally:
        _stop_all(edge, cloud, agents, runner)
