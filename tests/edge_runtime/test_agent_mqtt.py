"""The agent over a real Mosquitto, on real MNIST-1D data; kill -9 at every commit step.

The crash test runs ``tests/crash_agent.py`` as a child process: the agent of
``fleetlearn agent``, built from the same settings, with ``AgentHooks`` (and a training
callable) that SIGKILL the process at a named point (its docstring lists them). The
restart is the real ``python -m fleetlearn agent``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_rig import StandIn, expected_delta
from waiting import wait_for

from broker_bridge import (
    Channel,
    CodecSpec,
    ErrorFeedback,
    MosquittoProcess,
    MqttTransport,
    decode_update,
    encode_update,
    unpack_update_body,
)
from cloud_aggregator._artifacts import build_artifacts
from cloud_aggregator._models import build_reference_model
from edge_runtime import (
    Agent,
    DeviceStatus,
    LocalData,
    TaskStatus,
    load_mnist1d,
    make_agent_transport,
    partition_dirichlet,
)

REPO = Path(__file__).resolve().parents[2]
FLEET = "mqtt-agent"


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp-artifacts")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out


@pytest.fixture(scope="module")
def device_data(tmp_path_factory: pytest.TempPathFactory) -> LocalData:
    data = load_mnist1d(cache_dir=tmp_path_factory.getbasetemp().parent / "fleetlearn-cache")
    parts = partition_dirichlet(data.y_train, 100, alpha=0.5, seed=0)
    idx = parts[3]
    return LocalData(x=data.x_train[idx], y=data.y_train[idx])


def _transport(url: str, cid: str) -> MqttTransport:
    return MqttTransport(url=url, client_id=cid, backoff_min_s=0.1, backoff_max_s=1.0)


@pytest.fixture
def stand_in(mosquitto: MosquittoProcess, mlp_dir: Path) -> Iterator[StandIn]:
    channel = Channel(transport=_transport(mosquitto.url, "aggregator"), fleet=FLEET)
    agg = StandIn(channel, artifacts_dir=mlp_dir).start()
    channel.transport.connect()
    try:
        yield agg
    finally:
        channel.transport.close()


def test_agent_trains_mnist1d_over_mosquitto(
    mosquitto: MosquittoProcess, stand_in: StandIn, device_data: LocalData, mlp_dir: Path,
    tmp_path: Path,
) -> None:
    transport = make_agent_transport(mosquitto.url, fleet=FLEET, device_id="pi-3",
                                     backoff_min_s=0.1, backoff_max_s=1.0)
    agent = Agent(device_id="pi-3", channel=Channel(transport=transport, fleet=FLEET),
                  data=device_data, state_dir=tmp_path / "pi-3", owns_transport=True,
                  status_probe=lambda: DeviceStatus())
    agent.start()
    try:
        assert wait_for(lambda: stand_in.hellos)
        assert stand_in.hellos[0].num_samples == device_data.num_samples
        task = stand_in.task(round_=1, codec="fp32", epochs=2)
        stand_in.send_task("pi-3", task)
        assert wait_for(lambda: agent.state.record is not None
                        and agent.state.record.status == TaskStatus.ACKED, 30)
        (update,) = stand_in.updates
        meta, body = unpack_update_body(update.body)
        assert meta.num_samples == 2 * device_data.num_samples
        want = expected_delta(mlp_dir, stand_in.models[0], device_data.x, device_data.y, task)
        np.testing.assert_array_equal(decode_update(body, stand_in.layout), want)

        spec = CodecSpec.parse("ef+topk:0.05+q8+zstd")
        task2 = stand_in.task(round_=2, codec=str(spec), seed=11)
        stand_in.send_task("pi-3", task2)
        assert wait_for(lambda: len(stand_in.updates) == 2 and agent.busy_round() is None
                        and agent.state.record is not None
                        and agent.state.record.status == TaskStatus.ACKED, 30)
        _, body2 = unpack_update_body(stand_in.updates[1].body)
        want2 = expected_delta(mlp_dir, stand_in.models[0], device_data.x, device_data.y, task2)
        reference = encode_update(want2, stand_in.layout, spec, rng=task2.seed)
        assert body2 == reference.body  # bit for bit what local training and the codec give
        assert reference.feedback is not None
        residual = (tmp_path / "pi-3" / "residual.ef").read_bytes()
        assert residual == reference.feedback.to_bytes()
    finally:
        agent.stop()
    assert wait_for(lambda: ("pi-3", "offline") in stand_in.presence)


# -- kill -9 and restart -------------------------------------------------------------------


def _launch(url: str, device: str, data: Path, state: Path, crash_at: str | None
            ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FLEETLEARN_ACK_TIMEOUT_S="1",
               PYTHONPATH=str(REPO))
    command = ([str(REPO / "tests" / "crash_agent.py"), "--crash-at", crash_at]
               if crash_at is not None else ["-m", "fleetlearn", "agent"])
    return subprocess.Popen(
        [sys.executable, *command, "--broker", url, "--device-id", device,
         "--fleet", FLEET, "--data", str(data), "--state-dir", str(state), "--profile", "pi4"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


CRASH_CASES = [
    pytest.param("during_training", id="during_training"),
    pytest.param("after_persist", id="after_persist"),
    pytest.param("after_receive", id="after_receive", marks=pytest.mark.slow),
    pytest.param("before_commit", id="before_commit", marks=pytest.mark.slow),
    pytest.param("after_commit", id="after_commit", marks=pytest.mark.slow),
    pytest.param("after_send", id="after_send", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("crash_at", CRASH_CASES)
def test_kill_9_and_restart_neither_duplicates_nor_loses_the_residual(
    mosquitto: MosquittoProcess, stand_in: StandIn, device_data: LocalData, mlp_dir: Path,
    tmp_path: Path, crash_at: str,
) -> None:
    device = "dev-k"
    data_file = tmp_path / "local.npz"
    np.savez(data_file, x=device_data.x, y=device_data.y)
    state = tmp_path / "state"
    state.mkdir()
    # A residual from an earlier round is in place: it must survive, and be used once.
    spec = CodecSpec.parse("ef+topk:0.1+q8+zstd")
    rng = np.random.default_rng(5)
    r0 = ErrorFeedback(fingerprint=stand_in.layout.fingerprint,
                       residual=rng.normal(0, 1e-3, stand_in.layout.size), rounds=1)
    (state / "residual.ef").write_bytes(r0.to_bytes())
    task = stand_in.task(round_=1, codec=str(spec), epochs=2, seed=3)
    want = expected_delta(mlp_dir, stand_in.models[0], device_data.x, device_data.y, task)
    reference = encode_update(want, stand_in.layout, spec, feedback=r0, rng=task.seed)
    assert reference.feedback is not None
    r1 = reference.feedback.to_bytes()

    proc = _launch(mosquitto.url, device, data_file, state, crash_at)
    try:
        if not wait_for(lambda: stand_in.hellos, 30):
            proc.kill()
            pytest.fail(f"the agent never said hello (exit {proc.wait()}):\n"
                        f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        stand_in.send_task(device, task)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    if crash_at == "after_send":
        assert wait_for(lambda: stand_in.updates, 10)
    sent_before = len(stand_in.updates)
    residual_at_kill = (state / "residual.ef").read_bytes()
    committed = crash_at in ("after_commit", "after_persist", "after_send")
    if committed:
        assert (state / "submission.bin").exists()
    else:
        assert residual_at_kill == r0.to_bytes()  # untouched until the commit point
    assert sent_before == (1 if crash_at == "after_send" else 0)

    proc = _launch(mosquitto.url, device, data_file, state, None)
    try:
        assert wait_for(lambda: (1, device) in stand_in.accepted, 40), \
            f"no accepted update; hellos={stand_in.hellos}"
        assert wait_for(lambda: b'"acked"' in (state / "task.json").read_bytes(), 10)
        residual_after = (state / "residual.ef").read_bytes()
        time.sleep(1.5)  # past the agent's 1 s ack timeout: nothing more may come
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    ups = [m for m in stand_in.updates if (m.round, m.device) == (1, device)]
    assert ups, "no update"
    # At most one distinct update: every (re-)send has the same attempt and the same bytes.
    assert {m.attempt for m in ups} == {0}
    assert len({m.body for m in ups}) == 1
    _, codec_body = unpack_update_body(ups[0].body)
    assert codec_body == reference.body  # trained once, from the residual r0, never twice
    # No lost residual: the committed one survives the kill, and is r0 carried forward.
    assert residual_after == r1
    if crash_at in ("after_persist", "after_send"):
        assert residual_at_kill == r1
    busy = [h.busy_round for h in stand_in.hellos]
    if not committed:
        assert 1 in busy  # the restarted agent announced the round it was working on
