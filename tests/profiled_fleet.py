"""Fake devices with hand-made profiles, for aggregator tests on an in-memory broker.

They speak the device side of the protocol from its payload classes (as in
``aggregator_rig``) and are started after the aggregator so that it hears their hellos.
Shared by the adaptive-work and scheduling tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from aggregator_rig import make
from keys import device_key

from broker_bridge import (
    Channel,
    CodecSpec,
    Hello,
    Kind,
    Layout,
    MemoryBroker,
    MemoryTransport,
    Message,
    TaskSpec,
    UpdateMeta,
    encode_update,
    presence_message,
    presence_will,
    update_message,
)
from cloud_aggregator import Aggregator
from device_profiles import DeviceProfile, get_profile

SAMPLES = 320  # 10 steps of 32 per epoch


def profile(name: str, step_ms: float, **changes: object) -> DeviceProfile:
    """A pi4 that has measured ``step_ms`` per mlp step at batch 32."""
    return dataclasses.replace(get_profile("pi4"), name=name,  # type: ignore[arg-type]
                               measured_step_ms=(("mlp", step_ms),), **changes)


class ProfiledDevice:
    """The device side of the protocol, driven by hand."""

    def __init__(self, broker: MemoryBroker, device_id: str, prof: DeviceProfile | None,
                 *, fleet: str) -> None:
        self.id = device_id
        self.fleet = fleet
        self.key = device_key(device_id)
        self.transport = MemoryTransport(broker=broker, client_id=device_id,
                                         will=presence_will(fleet=fleet, device=device_id))
        self.channel = Channel(transport=self.transport, fleet=fleet)
        self.tasks: list[TaskSpec] = []
        self.acks: list[str] = []
        self.transport.connect()
        topics = self.channel.topics
        self.channel.subscribe(topics.device_down(device_id), self._on_message)
        self.channel.subscribe(topics.broadcast("control"), self._on_message)
        self.hello = Hello(profile=prof.to_dict() if prof is not None else {},
                           eligibility={"eligible": True}, num_samples=SAMPLES)
        self.greet()

    def greet(self) -> None:
        """Presence and hello: on connect, and to answer an aggregator's roll call."""
        topics = self.channel.topics
        self.channel.send(topics.presence(self.id),
                          presence_message(fleet=self.fleet, device=self.id, status="online"),
                          retain=True)
        self.channel.send(topics.up(self.id, "hello"),
                          self.hello.to_message(fleet=self.fleet, device=self.id))

    def _on_message(self, topic: str, message: Message) -> None:
        if message.kind == Kind.CONTROL:
            self.greet()
        elif message.kind == Kind.TASK:
            self.tasks.append(TaskSpec.from_message(message))
        elif message.kind == Kind.ACK:
            self.acks.append(message.json().get("status", ""))

    def send_update(self, values: np.ndarray | None = None, *, layout: Layout,
                    codec: str = "fp32", num_samples: int = SAMPLES, steps: int = 10,
                    emulated_s: float | None = None) -> bytes:
        """Send an update for the last task; returns its codec body."""
        task = self.tasks[-1]
        if values is None:
            values = (np.random.default_rng(len(self.id)).standard_normal(layout.size)
                      * 0.01).astype(np.float32)
        body = encode_update(values, layout, CodecSpec.parse(codec), rng=0).body
        meta = UpdateMeta(num_samples=num_samples, steps=steps, nonce=task.nonce,
                          train_loss=1.0, duration_s=0.1, emulated_s=emulated_s)
        msg = update_message(fleet=self.fleet, device=self.id, round=task.round,
                             model_version=task.model_version, attempt=0, codec=codec,
                             meta=meta, codec_body=body)
        self.channel.send(self.channel.topics.up(self.id, "update"), self.key.sign_update(msg))
        return body


def start_aggregator(tmp: Path, artifacts: Path, broker: MemoryBroker, n: int, *, fleet: str,
                     **overrides: object) -> Aggregator:
    """An mlp aggregator on ``broker`` choosing ``n`` devices per round, on a manual clock."""
    settings: dict[str, object] = {"fleet": fleet, "devices_per_round": n, "quorum": 1,
                                   "batch_size": 32}
    settings.update(overrides)
    return make(tmp, artifacts, broker, **settings)
