"""The device agent over MemoryTransport: tasks, training, updates, declines, failures."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_rig import FLEET, Rig, expected_delta, idle, make_data
from waiting import wait_for

from broker_bridge import (
    CodecSpec,
    ErrorFeedback,
    Kind,
    Layout,
    Message,
    ModelMeta,
    decode_update,
    encode_model,
    json_message,
    model_message,
    pack_bundle,
    unpack_update_body,
    weights_hash,
)
from cloud_aggregator._artifacts import build_artifacts
from cloud_aggregator._models import build_reference_model
from device_profiles import ConfigError, get_profile
from edge_runtime import (
    AgentSettings,
    DeviceStatus,
    EligibilityRules,
    Emulation,
    ModelCache,
    TaskStatus,
    TrainerPool,
    load_config,
)

# -- a test-side aggregator stand-in (also used by test_agent_mqtt.py) -------------------






# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp-artifacts")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out






@pytest.fixture
def rig(tmp_path: Path, mlp_dir: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, mlp_dir)
    try:
        yield r
    finally:
        r.close()




# -- tests --------------------------------------------------------------------------------


def test_connect_publishes_presence_and_hello(rig: Rig) -> None:
    agent = rig.agent(profile=get_profile("pi4"))
    assert rig.agg.presence == [("dev-1", "online")]
    (hello,) = rig.agg.hellos
    assert hello.num_samples == 96 and hello.busy_round is None
    assert hello.profile["name"] == "pi4"
    assert hello.eligibility_info().eligible is True
    assert hello.artifacts_hash is None and hello.model_versions == []
    agent.stop()
    assert rig.agg.presence[-1] == ("dev-1", "offline")


def test_task_update_equals_local_training_exactly_with_fp32(rig: Rig) -> None:
    data = make_data()
    agent = rig.agent(data=data)
    task = rig.agg.task(round_=1, evaluate=True)
    rig.agg.send_task("dev-1", task)
    assert wait_for(lambda: rig.agg.updates and agent.state.record
                    and agent.state.record.status == TaskStatus.ACKED)
    assert [a.status for a in rig.agg.task_acks] == ["accepted"]
    assert [r.want for r in rig.agg.requests] == ["artifacts", "model"]
    (m,) = rig.agg.updates
    assert (m.round, m.attempt, m.model_version, m.codec) == (1, 0, 0, "fp32")
    meta, body = unpack_update_body(m.body)
    assert meta.num_samples == 96 and meta.steps == 3 and not meta.stopped_early
    assert meta.eval_samples == 16 and meta.eval_accuracy is not None
    got = decode_update(body, rig.agg.layout)
    want = expected_delta(rig.artifacts_dir, rig.agg.models[0], data.x, data.y, task)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).max() > 0
    # The second task reuses the cached artifacts and model: no new requests.
    rig.agg.send_task("dev-1", rig.agg.task(round_=2))
    assert wait_for(lambda: len(rig.agg.updates) == 2 and idle(agent))
    assert len(rig.agg.requests) == 2


def test_lossy_codec_with_error_feedback_persists_the_residual(rig: Rig) -> None:
    data = make_data()
    agent = rig.agent(data=data)
    rig.agg.broadcast_model(0)  # heard before the task: no model request needed
    task = rig.agg.task(round_=1, codec="ef+topk:0.1+q8+zstd")
    rig.agg.send_task("dev-1", task)
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    assert [r.want for r in rig.agg.requests] == ["artifacts"]
    _meta, body = unpack_update_body(rig.agg.updates[0].body)
    sent = decode_update(body, rig.agg.layout)
    want = expected_delta(rig.artifacts_dir, rig.agg.models[0], data.x, data.y, task)
    residual = ErrorFeedback.load(rig.tmp / "dev-1" / "residual.ef", rig.agg.layout)
    # What was not sent is exactly what is carried: sent + residual == the true update.
    np.testing.assert_allclose(sent + residual.residual, want, atol=1e-6)
    kept = np.count_nonzero(sent)
    assert 0 < kept <= int(np.ceil(0.1 * want.size))
    # q8 error bound on the kept values: half a level of the per-tensor scale.
    scale = np.abs(want).max() / 127
    np.testing.assert_allclose(sent[sent != 0], want[sent != 0], atol=scale / 2 + 1e-7)
    # The next round starts from that residual.
    rig.agg.send_task("dev-1", rig.agg.task(round_=2, codec="ef+topk:0.1+q8+zstd"))
    assert wait_for(lambda: len(rig.agg.updates) == 2 and idle(agent))
    second = ErrorFeedback.load(rig.tmp / "dev-1" / "residual.ef", rig.agg.layout)
    assert second.rounds == 2


def test_ineligible_device_declines_with_reason(rig: Rig) -> None:
    rig.agent(rules=EligibilityRules(require_charging=True, min_battery_percent=50),
              status_probe=lambda: DeviceStatus(battery_percent=20.0, charging=False))
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.task_acks)
    (ack,) = rig.agg.task_acks
    assert ack.status == "declined" and "not charging" in ack.reason and "battery 20%" in ack.reason
    time.sleep(0.1)
    assert rig.agg.updates == [] and rig.agg.requests == []


def test_cancel_stops_training_promptly_and_sends_nothing(rig: Rig) -> None:
    data = make_data(n=3200)
    agent = rig.agent(data=data)
    rig.agg.send_task("dev-1", rig.agg.task(epochs=500))  # minutes of work
    assert wait_for(lambda: agent.state.record is not None
                    and agent.state.record.status == TaskStatus.TRAINING)
    time.sleep(0.2)
    rig.agg.cancel("dev-1", 1)
    assert wait_for(lambda: idle(agent), 5)  # the task had minutes of work left
    assert agent.state.record is not None and agent.state.record.status == TaskStatus.CANCELLED
    time.sleep(0.1)
    assert rig.agg.updates == []
    assert agent.stats.cancelled == 1


def test_deadline_stops_early_with_the_true_sample_count(rig: Rig) -> None:
    agent = rig.agent(data=make_data(n=320))
    rig.agg.send_task("dev-1", rig.agg.task(epochs=100_000, deadline_s=1.5))
    assert wait_for(lambda: rig.agg.updates, 10)
    meta, _ = unpack_update_body(rig.agg.updates[0].body)
    assert meta.stopped_early
    assert 0 < meta.num_samples < 100_000 * 320
    assert meta.num_samples == meta.steps * 32  # 320 samples: every batch is full
    assert agent.stats.last_samples == meta.num_samples


def test_deadline_with_nothing_trained_withdraws(rig: Rig) -> None:
    agent = rig.agent(settings=AgentSettings(deadline_margin_s=1.0, request_timeout_s=5))
    rig.agg.send_task("dev-1", rig.agg.task(deadline_s=0.5))
    assert wait_for(lambda: len(rig.agg.task_acks) == 2 and idle(agent))
    assert [(a.status, a.reason) for a in rig.agg.task_acks] == [
        ("accepted", ""), ("declined", "deadline")]
    assert rig.agg.updates == []
    assert agent.state.record is not None and agent.state.record.status == TaskStatus.DECLINED


def test_malformed_messages_are_dropped_and_the_agent_lives(rig: Rig) -> None:
    agent = rig.agent()
    t = rig.agg.channel.transport
    down = rig.agg.topics.down("dev-1", "task")
    t.publish(down, b"\x00garbage")
    send = rig.agg.channel.send
    send(down, json_message(Kind.TASK, fleet=FLEET, device="dev-1", payload={"round": "x"}))
    send(down, json_message(Kind.TASK, fleet=FLEET, device="dev-1", payload=[1, 2]))
    send(down, json_message(Kind.TASK, fleet=FLEET, device="dev-1", payload={
        "round": 1, "model_version": 0, "artifacts_hash": "abc", "epochs": 0}))
    send(down, json_message(Kind.TASK, fleet=FLEET, device="dev-1", round=3, payload={
        "round": 1, "model_version": 0, "artifacts_hash": "a" * 64}))  # envelope mismatch
    send(rig.agg.topics.down("dev-1", "ack"), json_message(Kind.ACK, fleet=FLEET,
                                                           device="dev-1", payload={"round": None}))
    send(rig.agg.topics.down("dev-1", "cancel"), Message(kind=Kind.CANCEL, fleet=FLEET,
                                                         device="dev-1", codec="json", body=b"{"))
    send(rig.agg.topics.broadcast("model"), Message(kind=Kind.MODEL, fleet=FLEET,
                                                    model_version=9, body=b"junk"))
    assert agent.stats.malformed >= 6
    rig.agg.send_task("dev-1", rig.agg.task(codec="nonsense:3"))
    assert rig.agg.task_acks[-1].status == "declined"
    assert "unsupported codec" in rig.agg.task_acks[-1].reason
    rig.agg.send_task("dev-1", rig.agg.task(round_=2))
    assert wait_for(lambda: rig.agg.updates and idle(agent))


def test_bad_artifacts_are_reported_and_the_agent_keeps_running(rig: Rig) -> None:
    agent = rig.agent()
    files = dict(rig.agg.files)
    weights = files["parameters.f32"]
    files["parameters.f32"] = weights[:-1] + bytes([weights[-1] ^ 1])
    good = rig.agg.bundle
    rig.agg.bundle = pack_bundle(files)
    rig.agg.send_task("dev-1", rig.agg.task(round_=1))
    assert wait_for(lambda: rig.agg.errors and idle(agent))
    (err,) = rig.agg.errors
    assert err.code == "artifact" and err.round == 1 and "corrupt" in err.message
    assert agent.artifacts.hashes() == []  # nothing unverified was cached
    rig.agg.bundle = b"not a zip"
    rig.agg.send_task("dev-1", rig.agg.task(round_=2))
    assert wait_for(lambda: len(rig.agg.errors) == 2 and idle(agent))
    assert rig.agg.errors[1].code == "artifact"
    rig.agg.bundle = good
    rig.agg.send_task("dev-1", rig.agg.task(round_=3))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    assert agent.artifacts.hashes() == [rig.agg.artifacts_hash]


def test_model_errors_are_reported(rig: Rig) -> None:
    agent = rig.agent(settings=AgentSettings(request_timeout_s=0.3))
    # A model for another layout under version 5.
    other = Layout(tensors=(("w", (3, 3)),))
    body = encode_model(np.ones(9, np.float32), other, CodecSpec.parse("fp32"))
    meta = ModelMeta(run="r", model_version=5, model_hash=weights_hash(np.ones(9, np.float32)))
    rig.agg.channel.send(rig.agg.topics.broadcast("model"), model_message(
        fleet=FLEET, meta=meta, codec="fp32", codec_body=body))
    rig.agg.send_task("dev-1", rig.agg.task(round_=1, model_version=5,
                                            model_hash=meta.model_hash))
    assert wait_for(lambda: rig.agg.errors and idle(agent))
    assert rig.agg.errors[0].code == "model_version" and "does not fit" in rig.agg.errors[0].message
    # A version nobody serves: requested, then reported.
    rig.agg.send_task("dev-1", rig.agg.task(round_=2, model_version=77))
    assert wait_for(lambda: len(rig.agg.errors) == 2 and idle(agent))
    assert rig.agg.errors[1].code == "model_version" and "unknown" in rig.agg.errors[1].message
    assert rig.agg.requests[-1].model_version == 77
    assert rig.agg.requests[-1].model_hash == "f" * 64


def test_data_that_does_not_fit_is_reported(rig: Rig) -> None:
    agent = rig.agent(data=make_data(features=12))
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.errors and idle(agent))
    assert rig.agg.errors[0].code == "data" and "12 features" in rig.agg.errors[0].message
    assert agent.state.record is not None and agent.state.record.status == TaskStatus.FAILED


def test_full_disk_is_reported_and_the_agent_keeps_running(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge_runtime._state as state_mod

    agent = rig.agent()
    real = state_mod.atomic_write
    full = [True]

    def atomic_write(path: Path, data: bytes, **kw: object) -> None:
        if full[0] and path.name == "submission.bin":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(state_mod, "atomic_write", atomic_write)
    rig.agg.send_task("dev-1", rig.agg.task(round_=1))
    assert wait_for(lambda: rig.agg.errors and idle(agent))
    assert rig.agg.errors[0].code == "disk_full"
    assert rig.agg.updates == []  # nothing is sent that was not persisted first
    full[0] = False
    rig.agg.send_task("dev-1", rig.agg.task(round_=2))
    assert wait_for(lambda: rig.agg.updates and idle(agent))


def test_unacknowledged_update_is_resent_with_same_bytes_and_attempt(rig: Rig) -> None:
    seen: list[int] = []

    def ack_second(m: Message) -> bool:
        seen.append(m.round)
        return len(seen) >= 2

    rig.agg.ack_updates = ack_second
    agent = rig.agent(settings=AgentSettings(ack_timeout_s=0.2, request_timeout_s=5))
    rig.agg.send_task("dev-1", rig.agg.task(round_=4, codec="ef+topk:0.2+q8:sr+zstd"))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    time.sleep(0.3)
    agent.poll()
    assert len(rig.agg.updates) == 2
    a, b = rig.agg.updates
    assert (a.round, a.attempt, a.body) == (b.round, b.attempt, b.body)
    assert agent.state.record is not None and agent.state.record.status == TaskStatus.ACKED
    agent.poll(time.monotonic() + 100)
    assert len(rig.agg.updates) == 2  # acknowledged: no more re-sends
    # The same task again (say, a restarted aggregator): nothing is trained twice.
    rig.agg.send_task("dev-1", rig.agg.task(round_=4, codec="ef+topk:0.2+q8:sr+zstd"))
    time.sleep(0.1)
    assert len(rig.agg.updates) == 2 and agent.stats.tasks == 1


def test_emulation_reports_the_profiles_duration(rig: Rig) -> None:
    profile = get_profile("pi-zero-2w")
    rig.agent(emulation=Emulation(profile=profile, model="mlp"))
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.updates)
    meta, _ = unpack_update_body(rig.agg.updates[0].body)
    assert meta.emulated_s is not None and meta.emulated_s > meta.duration_s


def test_many_agents_share_caches_and_one_session(rig: Rig) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from edge_runtime import ArtifactCache

    pool = TrainerPool(sessions_per_model=1)
    models = ModelCache()
    cache = ArtifactCache(root=rig.tmp / "shared-artifacts")
    executor = ThreadPoolExecutor(max_workers=2)
    agents = [rig.agent(f"sim-{i}", data=make_data(seed=i), trainers=pool, models=models,
                        artifacts=cache, executor=executor) for i in range(6)]
    rig.agg.broadcast_model(0)
    for i in range(6):
        rig.agg.send_task(f"sim-{i}", rig.agg.task())
    assert wait_for(lambda: len(rig.agg.updates) == 6 and all(idle(a) for a in agents), 30)
    assert pool.sessions() == {rig.agg.artifacts_hash: 1}
    assert 1 <= [r.want for r in rig.agg.requests].count("artifacts") <= 6
    executor.shutdown()


# -- configuration -----------------------------------------------------------------------


def test_config_precedence_flags_env_file(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(
        'broker = "mqtt://file:1883"\ndevice_id = "from-file"\ndata = "x.npz"\nthreads = 3\n'
        '[eligibility]\nrequire_charging = true\nmin_battery_percent = 40\n'
        '[protocol]\nack_timeout_s = 5\n'
    )
    env = {"FLEETLEARN_DEVICE_ID": "from-env", "FLEETLEARN_THREADS": "2",
           "FLEETLEARN_BROKER": "mqtt://env:1883"}
    cfg = load_config(flags={"broker": "mqtt://flag:1883", "threads": None},
                      env=env, config_file=conf)
    assert cfg.broker == "mqtt://flag:1883" and cfg.device_id == "from-env"
    assert cfg.threads == 2 and cfg.data.kind == "npz"
    assert cfg.rules.require_charging and cfg.rules.min_battery_percent == 40
    assert cfg.settings.ack_timeout_s == 5
    assert cfg.state_dir.name == "from-env"
    assert "password" not in repr(cfg)
    callable_cfg = load_config(flags={"broker": "mqtt://h", "device_id": "d",
                                      "data": "mymod:load"}, env={})
    assert callable_cfg.data.kind == "callable"


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({}, {}, "no broker given"),
        ({"broker": "http://x", "device_id": "d", "data": "a.npz"}, {}, "scheme"),
        ({"broker": "mqtt://x", "device_id": "bad id", "data": "a.npz"}, {}, "device id"),
        ({"broker": "mqtt://x", "device_id": "d", "data": "a.txt"}, {}, "neither"),
        ({"broker": "mqtt://x", "device_id": "d", "data": "a.npz"},
         {"FLEETLEARN_THREADS": "many"}, "FLEETLEARN_THREADS"),
        ({"broker": "mqtt://x", "device_id": "d", "data": "a.npz"},
         {"FLEETLEARN_REQUIRE_IDLE": "maybe"}, "true or false"),
        ({"broker": "mqtt://x", "device_id": "d", "data": "a.npz", "tls_cert": "c.pem"}, {},
         "go together"),
    ],
)
def test_bad_config_is_a_clear_config_error(
    flags: dict[str, object], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags=flags, env=env)


def test_unknown_file_setting_is_rejected(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('brokr = "mqtt://x"\n')
    with pytest.raises(ConfigError, match="unknown setting 'brokr'"):
        load_config(env={}, config_file=conf)


def test_state_record_is_plain_json(rig: Rig) -> None:
    rig.agent()
    rig.agg.send_task("dev-1", rig.agg.task(round_=3))
    assert wait_for(lambda: rig.agg.updates)
    record = json.loads((rig.tmp / "dev-1" / "task.json").read_text())
    assert record["task"]["round"] == 3 and record["status"] in ("encoded", "acked")


def test_agent_without_training_backend_exits_with_instructions(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 40), np.float32), y=np.zeros(4, np.int64))
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None\n"
        "from fleetlearn.cli import main\n"
        f"raise SystemExit(main(['agent', '--broker', 'mqtt://127.0.0.1:1', '--device-id', 'd',"
        f" '--data', {str(data)!r}, '--state-dir', {str(tmp_path / 's')!r}]))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "onnxruntime" in result.stderr and "pip install" in result.stderr
