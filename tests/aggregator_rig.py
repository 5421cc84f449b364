"""Fake devices and an aggregator on an in-memory broker, for the aggregator's tests.

Fake devices speak the device side of the protocol from its payload classes and send
real encoded updates whose values depend only on (device, round), signed with their own
key (``keys.device_key``), which the aggregators ``make`` builds know.
"""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

import numpy as np
from keys import ENROLMENT, device_key

from broker_bridge import (
    Ack,
    Channel,
    CodecSpec,
    Enrolment,
    Hello,
    Kind,
    Layout,
    MemoryBroker,
    MemoryTransport,
    Message,
    Request,
    TaskSpec,
    UpdateMeta,
    encode_update,
    presence_message,
    presence_will,
    update_message,
)
from cloud_aggregator import Aggregator
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._rounds import ManualClock
from device_profiles import get_profile
from edge_runtime import DeviceKey

FLEET = "test"


def fake_update(device: str, round_index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([zlib.crc32(device.encode()), round_index])
    return (rng.standard_normal(size) * 0.01).astype(np.float32)


class FakeDevice:
    """Speaks the device side of the protocol from its payload classes; answers by hand."""

    def __init__(self, broker: MemoryBroker, device_id: str, *, num_samples: int = 50) -> None:
        self.id = device_id
        self.num_samples = num_samples
        self.key = device_key(device_id)
        self.transport = MemoryTransport(broker=broker, client_id=device_id,
                                         will=presence_will(fleet=FLEET, device=device_id))
        self.channel = Channel(transport=self.transport, fleet=FLEET)
        self.tasks: list[TaskSpec] = []
        self.acks: list[Ack] = []
        self.cancels: list[int] = []
        self.models: dict[int, Message] = {}
        self.other: list[Message] = []
        self.controls: list[str] = []
        self.transport.connect()
        topics = self.channel.topics
        self.channel.subscribe(topics.device_down(device_id), self._on_message)
        self.channel.subscribe(topics.all_broadcast, self._on_message)
        self.channel.send(topics.presence(device_id),
                          presence_message(fleet=FLEET, device=device_id, status="online"),
                          retain=True)
        self.hello()

    def hello(self, busy_round: int | None = None) -> None:
        hello = Hello(profile=get_profile("pi4").to_dict(), eligibility={"eligible": True},
                      num_samples=self.num_samples, busy_round=busy_round)
        self.channel.send(self.channel.topics.up(self.id, "hello"),
                          hello.to_message(fleet=FLEET, device=self.id))

    def _on_message(self, topic: str, message: Message) -> None:
        if message.kind == Kind.CONTROL:
            request = Request.from_message(message)
            if request.want == "hello":  # the aggregator's roll call
                self.hello()
            else:
                self.controls.append(request.want)
        elif message.kind == Kind.TASK:
            self.tasks.append(TaskSpec.from_message(message))
        elif message.kind == Kind.ACK:
            self.acks.append(Ack.from_message(message))
        elif message.kind == Kind.CANCEL:
            self.cancels.append(message.round)
        elif message.kind == Kind.MODEL:
            self.models[message.model_version] = message
        else:
            self.other.append(message)

    def send_update(
        self, *, round_index: int | None = None, model_version: int | None = None,
        values: np.ndarray | None = None, layout: Layout, codec: str = "fp32", attempt: int = 0,
        emulated_s: float | None = None, num_samples: int | None = None,
        codec_body: bytes | None = None, train_loss: float = 1.0, signed: bool = True,
        key: DeviceKey | None = None,
    ) -> Message:
        """Send an update (signed with this device's key, or ``key``; ``signed=False``: not
        at all); returns the message sent."""
        r = self.tasks[-1].round if round_index is None else round_index
        v = self.tasks[-1].model_version if model_version is None else model_version
        if codec_body is None:
            vec = fake_update(self.id, r, layout.size) if values is None else values
            codec_body = encode_update(vec, layout, CodecSpec.parse(codec), rng=0).body
        nonce = next((t.nonce for t in reversed(self.tasks) if t.round == r), "no-task-nonce")
        meta = UpdateMeta(num_samples=self.num_samples if num_samples is None else num_samples,
                          steps=2, nonce=nonce, train_loss=train_loss, duration_s=0.1,
                          emulated_s=emulated_s)
        msg = update_message(fleet=FLEET, device=self.id, round=r, model_version=v,
                             attempt=attempt, codec=codec, meta=meta, codec_body=codec_body)
        if signed:
            msg = (key or self.key).sign_update(msg)
        self.channel.send(self.channel.topics.up(self.id, "update"), msg)
        return msg

    def decline(self) -> None:
        ack = Ack(round=self.tasks[-1].round, what="task", status="declined", reason="battery")
        self.channel.send(self.channel.topics.up(self.id, "ack"),
                          ack.to_message(fleet=FLEET, device=self.id))

    def last_ack(self) -> Ack:
        return self.acks[-1]


def make(
    tmp: Path, artifacts: Path, broker: MemoryBroker, *, manual: ManualClock | None = None,
    **overrides: object,
) -> Aggregator:
    settings: dict[str, object] = {
        "fleet": FLEET, "model": "mlp", "rounds": 3, "devices_per_round": 3,
        "over_selection": 1.0, "deadline_s": 30.0, "state_dir": tmp, "local_epochs": 1,
        "server_opt": "fedavg", "store_synchronous": "NORMAL",
    }
    parts = {k: overrides.pop(k) for k in ("strategy", "policy", "optimizer", "evaluator")
             if k in overrides}  # objects of one's own go to the runtime, not the config
    # enrolment: an Enrolment object (default: every fake device's key), a file (the
    # setting), or None (neither: the defaults)
    enrolment = overrides.pop("enrolment", ENROLMENT)
    if isinstance(enrolment, Enrolment):
        parts["enrolment"] = enrolment
    elif enrolment is not None:
        settings["enrolment"] = enrolment
    settings.update(overrides)
    config = AggregatorConfig(**settings)  # type: ignore[arg-type]
    transport = MemoryTransport(broker=broker, client_id="aggregator")
    agg = Aggregator(config=config, channel=Channel(transport=transport, fleet=config.fleet),
                     clock=manual or ManualClock(), artifacts_dir=artifacts,
                     **parts)  # type: ignore[arg-type]
    OPEN.append(agg)
    agg.start()
    return agg


OPEN: list[Aggregator] = []
"""Aggregators ``make`` created; conftest closes them when each test ends, failed or not."""


def close_all() -> None:
    while OPEN:
        OPEN.pop().close()


def devices(broker: MemoryBroker, n: int) -> dict[str, FakeDevice]:
    return {f"d{i}": FakeDevice(broker, f"d{i}") for i in range(n)}



def feed_async(agg: object, fleet: dict[str, FakeDevice], count: int) -> list[tuple[str, int]]:
    """Answer ``count`` async tasks in dispatch order; returns (device, task round)."""
    answered: list[tuple[str, int]] = []
    while len(answered) < count:
        agg.tick()  # type: ignore[attr-defined]
        waiting = [d for d in fleet.values()
                   if d.tasks and (d.id, d.tasks[-1].round) not in answered]
        assert waiting, "no device holds an unanswered task"
        device = min(waiting, key=lambda d: d.tasks[-1].round)
        device.send_update(layout=agg.layout)  # type: ignore[attr-defined]
        assert device.last_ack().status == "accepted", (device.id, device.last_ack())
        answered.append((device.id, device.tasks[-1].round))
    return answered


def kept_body(conn: sqlite3.Connection, digest: str) -> bytes:
    """The body the training ledger keeps under ``digest`` (its journal row)."""
    row = conn.execute("SELECT r.body FROM ledger_refs l JOIN round_updates r ON r.seq = l.seq"
                       " WHERE l.sha256 = ?", (digest,)).fetchone()
    assert row is not None, f"no kept body {digest}"
    return bytes(row[0])


def set_kept_body(conn: sqlite3.Connection, digest: str, body: bytes) -> None:
    """Overwrite the kept body under ``digest`` (a tampering test)."""
    conn.execute("UPDATE round_updates SET body = ? WHERE seq ="
                 " (SELECT seq FROM ledger_refs WHERE sha256 = ?)", (body, digest))
