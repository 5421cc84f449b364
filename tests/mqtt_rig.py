"""Real aggregators and protocol-speaking devices over a real broker, for wire tests.

Devices sign their updates with their own key (``keys.device_key``); the aggregators
made here know every test device's key (``keys.ENROLMENT``)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from keys import ENROLMENT, device_key

from broker_bridge import (
    Ack,
    Channel,
    CodecSpec,
    Hello,
    Kind,
    Message,
    MqttTransport,
    TaskSpec,
    UpdateMeta,
    encode_update,
    is_signed,
    presence_message,
    presence_will,
    update_message,
)
from cloud_aggregator import Aggregator
from cloud_aggregator._config import AggregatorConfig


def transport(url: str, cid: str, fleet: str, *, device: bool = True,
              **kw: object) -> MqttTransport:
    will = presence_will(fleet=fleet, device=cid) if device else None
    return MqttTransport(url=url, client_id=cid, will=will, clean_session=False,  # type: ignore[arg-type]
                         backoff_min_s=0.1, backoff_max_s=1.0, **kw)


def aggregator(url: str, fleet: str, state: Path, artifacts: Path, **kw: object) -> Aggregator:
    settings: dict[str, object] = {
        "fleet": fleet, "model": "mlp", "rounds": 5, "devices_per_round": 2,
        "over_selection": 1.0, "deadline_s": 60.0, "state_dir": state, "local_epochs": 1,
        "server_opt": "fedavg", "store_synchronous": "NORMAL"}
    enrolment = kw.pop("enrolment", ENROLMENT)  # None: the config's (file or nothing)
    settings.update(kw)
    return Aggregator(config=AggregatorConfig(**settings),  # type: ignore[arg-type]
                      channel=Channel(transport=transport(url, "aggregator", fleet,
                                                          device=False), fleet=fleet),
                      artifacts_dir=artifacts, enrolment=enrolment)  # type: ignore[arg-type]


class Device:
    """A device speaking the protocol by hand over MQTT (sends what a test tells it)."""

    def __init__(self, url: str, fleet: str, device_id: str, **kw: object) -> None:
        self.id, self.fleet = device_id, fleet
        self.key = device_key(device_id)
        self.channel = Channel(transport=transport(url, device_id, fleet), fleet=fleet, **kw)  # type: ignore[arg-type]
        self.tasks: list[TaskSpec] = []
        self.acks: list[Ack] = []
        self.sent: list[Message] = []
        self.lock = threading.Lock()
        topics = self.channel.topics
        self.channel.subscribe(topics.device_down(device_id), self._on_message)
        self.channel.transport.connect()
        self.channel.send(topics.presence(device_id),
                          presence_message(fleet=fleet, device=device_id, status="online"),
                          retain=True)
        self.hello()

    def hello(self) -> None:
        self.channel.send(self.channel.topics.up(self.id, "hello"), Hello(
            eligibility={"eligible": True}, num_samples=50).to_message(fleet=self.fleet,
                                                                       device=self.id))

    def _on_message(self, _topic: str, m: Message) -> None:
        with self.lock:
            if m.kind == Kind.TASK:
                self.tasks.append(TaskSpec.from_message(m))
            elif m.kind == Kind.ACK:
                self.acks.append(Ack.from_message(m))

    def update(self, size: int, *, layout: object, norm: float = 0.3) -> Message:
        """An update for the last task, not signed yet (``send`` signs it)."""
        task = self.tasks[-1]
        v = np.random.default_rng([task.round, len(self.id)]).standard_normal(size)
        body = encode_update((v / np.linalg.norm(v) * norm).astype(np.float32), layout,  # type: ignore[arg-type]
                             CodecSpec.parse("fp32")).body
        meta = UpdateMeta(num_samples=50, steps=2, nonce=task.nonce, train_loss=1.0,
                          duration_s=0.1)
        return update_message(fleet=self.fleet, device=self.id, round=task.round,
                              model_version=task.model_version, attempt=0, codec="fp32",
                              meta=meta, codec_body=body)

    def send(self, message: Message, *, sign: bool = True) -> None:
        """Send an update, signed with this device's key unless ``sign`` is False (or it
        is signed already: a copy of another update)."""
        if sign and not is_signed(message.body):
            message = self.key.sign_update(message)
        self.sent.append(message)
        self.channel.send(self.channel.topics.up(self.id, "update"), message)

    def ack(self, round_index: int) -> Ack | None:
        with self.lock:
            return next((a for a in reversed(self.acks) if a.round == round_index), None)

    def close(self) -> None:
        self.channel.transport.close()
