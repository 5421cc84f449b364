"""The aggregator over a real Mosquitto: real agents learn MNIST-1D; kill -9 and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import fake_update
from keys import ENROLMENT, device_key, enrol_agent
from mqtt_rig import transport as mqtt_transport
from waiting import wait_for

from broker_bridge import (
    Ack,
    Channel,
    CodecSpec,
    Enrolment,
    Hello,
    Kind,
    Layout,
    Message,
    MosquittoProcess,
    TaskSpec,
    UpdateMeta,
    encode_update,
    presence_message,
    update_message,
)
from cloud_aggregator import Aggregator
from cloud_aggregator._aggregation import StreamingAccumulator
from cloud_aggregator._artifacts import initial_parameters, read_manifest
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._server_opt import make_server_optimizer
from cloud_aggregator._store import Store

REPO = Path(__file__).resolve().parents[2]




@pytest.mark.slow
def test_real_agents_learn_over_mosquitto(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    from edge_runtime import (
        Agent,
        DeviceStatus,
        LocalData,
        load_mnist1d,
        make_agent_transport,
        partition_dirichlet,
    )

    fleet = "agg-mqtt"
    data = load_mnist1d(cache_dir=tmp_path.parent.parent / "fleetlearn-cache")
    parts = partition_dirichlet(data.y_train, 100, alpha=0.5, seed=0)
    np.savez(tmp_path / "test.npz", x=data.x_test, y=data.y_test)
    config = AggregatorConfig(
        fleet=fleet, model="mlp", rounds=4, devices_per_round=4, over_selection=1.0,
        deadline_s=60.0, state_dir=tmp_path / "agg", eval_data=tmp_path / "test.npz",
        store_synchronous="NORMAL")
    agg = Aggregator(config=config, channel=Channel(
        transport=mqtt_transport(mosquitto.url, "aggregator", fleet, device=False), fleet=fleet),
        enrolment=ENROLMENT)
    agg.start()
    agents = []
    for i in range(4):
        idx = np.concatenate([parts[2 * i], parts[2 * i + 1]])  # ~160 samples each
        did = f"dev-{i}"
        transport = make_agent_transport(mosquitto.url, fleet=fleet, device_id=did,
                                         backoff_min_s=0.1, backoff_max_s=1.0)
        agent = Agent(device_id=did, channel=Channel(transport=transport, fleet=fleet),
                      data=LocalData(x=data.x_train[idx], y=data.y_train[idx]),
                      state_dir=tmp_path / did, owns_transport=True,
                      status_probe=lambda: DeviceStatus())
        enrol_agent(agent)
        agent.start()
        agents.append(agent)
    assert agg.recorder.evaluator is not None
    before = agg.recorder.evaluator.evaluate(agg.params).accuracy
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 240.0}, daemon=True)
    runner.start()
    try:
        runner.join(timeout=250.0)
        assert agg.model_version == 4, [m.to_json() for m in agg.history]
        closed = [m for m in agg.history if m.outcome == "closed"]
        assert all(m.devices_reported == 4 for m in closed)
        assert closed[-1].accuracy is not None and closed[-1].accuracy > before + 0.1
        assert closed[-1].bytes_up > 0 and closed[-1].bytes_down > 0
        rows = agg.metrics_log.read()
        assert [r["model_version"] for r in rows if r["outcome"] == "closed"] == [1, 2, 3, 4]
    finally:
        agg.stop()
        for agent in agents:
            agent.stop()
        agg.close()
        agg.channel.transport.close()


# -- kill -9 mid-round and restart -----------------------------------------------------



class ScriptedDevice:
    """A device over MQTT that answers each task with a deterministic update, unless
    ``hold(round)`` says to keep quiet for that round's first task."""

    def __init__(self, url: str, fleet: str, device_id: str, layout: Layout) -> None:
        self.id, self.fleet, self.layout = device_id, fleet, layout
        self.key = device_key(device_id)
        self.channel = Channel(transport=mqtt_transport(url, device_id, fleet), fleet=fleet)
        self.tasks: list[TaskSpec] = []
        self.acks: list[Ack] = []
        self.hold: set[int] = set()
        self._lock = threading.Lock()
        topics = self.channel.topics
        self.channel.subscribe(topics.device_down(device_id), self._on_message)
        self.channel.subscribe(topics.broadcast("control"), self._on_message)
        self.channel.transport.connect()
        self.greet()

    def greet(self) -> None:
        """Presence and hello: on connect, and to answer the aggregator's roll call."""
        topics = self.channel.topics
        self.channel.send(topics.presence(self.id),
                          presence_message(fleet=self.fleet, device=self.id, status="online"),
                          retain=True)
        self.channel.send(topics.up(self.id, "hello"), Hello(num_samples=40).to_message(
            fleet=self.fleet, device=self.id))

    def _on_message(self, topic: str, message: Message) -> None:
        if message.kind == Kind.CONTROL:
            self.greet()
            return
        with self._lock:
            if message.kind == Kind.ACK:
                self.acks.append(Ack.from_message(message))
                return
            if message.kind != Kind.TASK:
                return
            task = TaskSpec.from_message(message)
            self.tasks.append(task)
            if task.round in self.hold:
                self.hold.discard(task.round)
                return
        body = encode_update(fake_update(self.id, task.round, self.layout.size), self.layout,
                             CodecSpec.parse("fp32")).body
        meta = UpdateMeta(num_samples=40, steps=2, nonce=task.nonce, train_loss=1.0,
                          duration_s=0.01)
        self.channel.send(self.channel.topics.up(self.id, "update"), self.key.sign_update(
            update_message(fleet=self.fleet, device=self.id, round=task.round,
                           model_version=task.model_version, attempt=0, codec="fp32",
                           meta=meta, codec_body=body)))

    def accepted(self, round_index: int) -> bool:
        with self._lock:
            return any(a.round == round_index and a.status == "accepted" for a in self.acks)


def _launch(url: str, fleet: str, state: Path, artifacts: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    enrolment = artifacts / "enrolment.toml"  # the scripted devices' keys, as an operator would
    book = Enrolment(fleet=fleet)
    for device in ("d0", "d1"):
        book.enrol(device, device_key(device).public_key)
    book.write(enrolment)
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlearn", "aggregator", "--broker", url, "--fleet", fleet,
         "--model", "mlp", "--rounds", "3", "--devices-per-round", "2", "--over-selection", "1",
         "--quorum", "2", "--min-devices", "2", "--deadline-s", "120", "--state-dir",
         str(state), "--server-opt", "fedavgm", "--quiet", "--enrolment", str(enrolment)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_mid_round_resumes_to_the_same_model(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    fleet = "agg-kill"
    state = tmp_path / "state"
    proc = _launch(mosquitto.url, fleet, state, tmp_path)
    try:
        assert wait_for(lambda: (state / "artifacts" / "artifacts.json").exists(), 120)
        time.sleep(0.5)
        info = read_manifest(state / "artifacts")
        layout = Layout(tensors=tuple((n, tuple(s)) for n, s in info.parameters))
        d0 = ScriptedDevice(mosquitto.url, fleet, "d0", layout)
        d1 = ScriptedDevice(mosquitto.url, fleet, "d1", layout)
        d1.hold.add(2)  # d1 stays silent on its first round-2 task
        assert wait_for(lambda: d0.accepted(2), 120), proc.stderr
        proc.send_signal(signal.SIGKILL)  # mid-round: one of two updates stored
        proc.wait(timeout=30)
        proc = _launch(mosquitto.url, fleet, state, tmp_path)
        assert proc.wait(timeout=180) == 0, proc.stderr.read() if proc.stderr else ""
        # d0 had reported round 2: it was not asked again; d1 was.
        assert [t.round for t in d0.tasks] == [1, 2, 3]
        assert [t.round for t in d1.tasks].count(2) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The same rounds without a crash, computed directly: the same model, bit for bit.
    params = initial_parameters(state / "artifacts")
    opt = make_server_optimizer("fedavgm")
    for r in (1, 2, 3):
        acc = StreamingAccumulator(size=layout.size)
        for device in ("d0", "d1"):
            acc.add(fake_update(device, r, layout.size), 40.0)
        params = opt.step(params, acc.result())
    store = Store(state / "aggregator.sqlite")
    record, final = store.load_checkpoint(fleet)
    assert record.model_version == 3
    np.testing.assert_array_equal(final, params)
    assert [len(store.accepted_keys(fleet, r)) for r in (1, 2, 3)] == [2, 2, 2]
    store.close()
