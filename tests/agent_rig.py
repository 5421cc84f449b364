"""Agents against a stand-in aggregator, local data and small models, for the agent's
tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from keys import enrol_agent

from broker_bridge import (
    Ack,
    Cancel,
    Channel,
    CodecSpec,
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
    encode_model,
    model_message,
    pack_bundle,
    presence_will,
    weights_hash,
)
from cloud_aggregator._artifacts import initial_parameters, read_manifest
from edge_runtime import (
    Agent,
    AgentSettings,
    DeviceStatus,
    LocalData,
    open_trainer,
)

FLEET = "unit"


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


def linear_regression_artifacts(out: Path, *, features: int = 5) -> Path:
    """Artifacts of a ``features`` -> 1 linear model trained with MSE (float32 targets)."""
    from onnx import TensorProto, helper, numpy_helper

    from cloud_aggregator._artifacts import build_artifacts

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w", "b"], ["out"], transB=1)],
        "linreg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.zeros((1, features), np.float32), "w"),
            numpy_helper.from_array(np.zeros(1, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    build_artifacts(model, out, loss="mse")
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
        enrol_agent(agent)
        agent.start(timer=False)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for a in self.agents:
            a.stop()


def idle(agent: Agent) -> bool:
    return agent.busy_round() is None
