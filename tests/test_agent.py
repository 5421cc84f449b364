"""The device agent over MemoryTransport: tasks, training, updates, declines, failures."""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_bridge import (
    Ack,
    Cancel,
    Channel,
    CodecSpec,
    ErrorFeedback,
    ErrorReport,
    Hello,
    Kind,
    Layout,
    MemoryBroker,
    MemoryTransport,
    Message,
    ModelMeta,
    Request,
    TaskSpec,
    decode_update,
    encode_model,
    json_message,
    model_message,
    pack_bundle,
    presence_will,
    unpack_update_body,
    weights_hash,
)
from cloud_aggregator._artifacts import build_artifacts, initial_parameters, read_manifest
from cloud_aggregator._models import build_reference_model
from device_profiles import ConfigError, get_profile
from edge_runtime import (
    Agent,
    AgentSettings,
    DeviceStatus,
    EligibilityRules,
    Emulation,
    LocalData,
    ModelCache,
    TaskStatus,
    TrainerPool,
    load_config,
    open_trainer,
)

FLEET = "unit"


def wait_for(cond: Callable[[], object], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


# -- a test-side aggregator stand-in (also used by test_agent_mqtt.py) -------------------


class StandIn:
    """The aggregator's side of the protocol, just enough to drive an agent."""

    def __init__(
        self,
        channel: Channel,
        *,
        artifacts_dir: Path,
        ack_updates: bool | Callable[[Message], bool] = True,
        resend_tasks: bool = True,
    ) -> None:
        self.channel = channel
        self.topics = channel.topics
        manifest = read_manifest(artifacts_dir)
        self.artifacts_hash = manifest.content_hash
        self.layout = Layout(tensors=manifest.parameters)
        self.files = {
            name: (artifacts_dir / name).read_bytes()
            for name in (*manifest.files, "artifacts.json")
        }
        self.bundle = pack_bundle(self.files)
        self.models: dict[int, np.ndarray] = {0: initial_parameters(artifacts_dir)}
        self.ack_updates = ack_updates
        self.resend_tasks = resend_tasks
        self.lock = threading.Lock()
        self.hellos: list[Hello] = []
        self.task_acks: list[Ack] = []
        self.updates: list[Message] = []
        self.errors: list[ErrorReport] = []
        self.requests: list[Request] = []
        self.tasks: dict[tuple[str, int], TaskSpec] = {}
        self.presence: list[tuple[str, str]] = []
        self.accepted: set[tuple[int, str]] = set()

    def start(self) -> StandIn:
        self.channel.subscribe(self.topics.all_up, self._on_up)
        self.channel.subscribe(self.topics.all_presence, self._on_presence)
        return self

    def _on_presence(self, _topic: str, m: Message) -> None:
        with self.lock:
            self.presence.append((m.device, m.json()["status"]))

    def _on_up(self, topic: str, m: Message) -> None:
        device = m.device
        if m.kind == Kind.HELLO:
            hello = Hello.from_dict(m.json())
            with self.lock:
                self.hellos.append(hello)
                task = self.tasks.get((device, hello.busy_round or -1))
            if task is not None and self.resend_tasks and (task.round, device) not in self.accepted:
                self.send_task(device, task)
        elif m.kind == Kind.ACK:
            with self.lock:
                self.task_acks.append(Ack.from_message(m))
        elif m.kind == Kind.ERROR:
            with self.lock:
                self.errors.append(ErrorReport.from_message(m))
        elif m.kind == Kind.CONTROL:
            req = Request.from_message(m)
            with self.lock:
                self.requests.append(req)
            if req.want == "artifacts":
                self.serve_artifacts(device)
            elif req.want == "model" and req.model_version in self.models:
                self.send_model(device, req.model_version)
        elif m.kind == Kind.UPDATE:
            with self.lock:
                self.updates.append(m)
                duplicate = (m.round, device) in self.accepted
            ack = self.ack_updates(m) if callable(self.ack_updates) else self.ack_updates
            if ack:
                with self.lock:
                    self.accepted.add((m.round, device))
                reply = Ack(round=m.round, attempt=m.attempt, what="update",
                            status="duplicate" if duplicate else "accepted")
                self.channel.send(self.topics.down(device, "ack"),
                                  reply.to_message(fleet=self.channel.fleet, device=device,
                                                   round=m.round))

    def serve_artifacts(self, device: str, bundle: bytes | None = None) -> None:
        self.channel.send(
            self.topics.down(device, "artifacts"),
            Message(kind=Kind.ARTIFACTS, fleet=self.channel.fleet, device=device, codec="zip",
                    body=bundle if bundle is not None else self.bundle),
        )

    def model_message(self, version: int, device: str = "") -> Message:
        spec = CodecSpec.parse("fp32")
        body = encode_model(self.models[version], self.layout, spec)
        meta = ModelMeta(run="stand-in", model_version=version,
                         model_hash=weights_hash(self.models[version]))
        return model_message(fleet=self.channel.fleet, device=device, meta=meta,
                             codec=str(spec), codec_body=body)

    def send_model(self, device: str, version: int) -> None:
        self.channel.send(self.topics.down(device, "model"), self.model_message(version, device))

    def broadcast_model(self, version: int) -> None:
        self.channel.send(self.topics.broadcast("model"), self.model_message(version))

    def task(self, round_: int = 1, **kw: object) -> TaskSpec:
        fields: dict[str, object] = {"round": round_, "model_version": 0,
                                     "artifacts_hash": self.artifacts_hash, "codec": "fp32",
                                     "epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 7,
                                     "deadline_s": 60.0, "nonce": f"nonce-of-round-{round_}"}
        fields.update(kw)
        version = int(fields["model_version"])  # type: ignore[call-overload]
        fields.setdefault("model_hash", weights_hash(self.models[version])
                          if version in self.models else "f" * 64)
        return TaskSpec(**fields)  # type: ignore[arg-type]

    def send_task(self, device: str, task: TaskSpec) -> None:
        with self.lock:
            self.tasks[(device, task.round)] = task
        self.channel.send(self.topics.down(device, "task"),
                          task.to_message(fleet=self.channel.fleet, device=device,
                                          round=task.round, model_version=task.model_version))

    def cancel(self, device: str, round_: int) -> None:
        self.channel.send(self.topics.down(device, "cancel"),
                          Cancel(round=round_, reason="round closed").to_message(
                              fleet=self.channel.fleet, device=device, round=round_))


def expected_delta(
    artifacts_dir: Path, weights: np.ndarray, x: np.ndarray, y: np.ndarray, task: TaskSpec
) -> np.ndarray:
    """What local training from ``weights`` produces, computed apart from the agent."""
    trainer = open_trainer(artifacts_dir, intra_op_threads=1)
    trainer.set_parameters(weights)
    trainer.train(x, y, epochs=task.epochs, batch_size=task.batch_size, lr=task.lr,
                  seed=task.seed, max_steps=task.max_steps)
    return trainer.get_parameters() - weights


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp-artifacts")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out


def make_data(n: int = 96, seed: int = 0, features: int = 40) -> LocalData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return LocalData(x=x, y=y, x_eval=x[:16], y_eval=y[:16])


class Rig:
    def __init__(self, tmp: Path, artifacts_dir: Path) -> None:
        self.tmp = tmp
        self.artifacts_dir = artifacts_dir
        self.broker = MemoryBroker()
        agg_t = MemoryTransport(broker=self.broker, client_id="aggregator")
        agg_t.connect()
        self.agg = StandIn(Channel(transport=agg_t, fleet=FLEET), artifacts_dir=artifacts_dir)
        self.agg.start()
        self.agents: list[Agent] = []

    def agent(self, device: str = "dev-1", *, data: LocalData | None = None,
              settings: AgentSettings | None = None,
              status_probe: Callable[[], DeviceStatus] | None = None, **kw: object) -> Agent:
        t = MemoryTransport(broker=self.broker, client_id=device,
                            will=presence_will(fleet=FLEET, device=device))
        agent = Agent(
            device_id=device, channel=Channel(transport=t, fleet=FLEET),
            data=data if data is not None else make_data(), state_dir=self.tmp / device,
            status_probe=status_probe or (lambda: DeviceStatus(free_memory_mb=1000.0)),
            settings=settings or AgentSettings(request_timeout_s=5.0), **kw,  # type: ignore[arg-type]
        )
        agent.start(timer=False)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for a in self.agents:
            a.stop()


@pytest.fixture
def rig(tmp_path: Path, mlp_dir: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, mlp_dir)
    try:
        yield r
    finally:
        r.close()


def idle(agent: Agent) -> bool:
    return agent.busy_round() is None


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
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "onnxruntime" in result.stderr and "pip install" in result.stderr
