"""Adaptive local work: a device too slow for the whole task is given fewer steps, not dropped.

The aggregator runs on an in-memory broker with fake devices that speak the protocol
(as in ``test_service``), started after the aggregator so that it hears their hellos,
which carry hand-made profiles whose measured step
time makes the cost model's answer easy to check by hand.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pytest

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
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._rounds import ManualClock
from cloud_aggregator._selection import local_steps_for
from cloud_aggregator._service import ADAPTIVE_HEADROOM, Aggregator
from device_profiles import DeviceProfile, Task, get_profile, predict

FLEET = "adaptive"
SAMPLES = 320  # 10 steps of 32 per epoch
DEADLINE_S = 30.0


def profile(name: str, step_ms: float) -> DeviceProfile:
    """A pi4 that has measured ``step_ms`` per mlp step at batch 32."""
    return dataclasses.replace(get_profile("pi4"), name=name, measured_step_ms=(("mlp", step_ms),))


FAST = profile("fast", 20.0)  # 10 steps: 0.2 s
SLOW = profile("slow", 5_000.0)  # 10 steps: 50 s, past the 30 s deadline
HOPELESS = profile("hopeless", 100_000.0)  # not even one step fits


class Device:
    """The device side of the protocol, driven by hand."""

    def __init__(self, broker: MemoryBroker, device_id: str, prof: DeviceProfile | None) -> None:
        self.id = device_id
        self.transport = MemoryTransport(broker=broker, client_id=device_id,
                                         will=presence_will(fleet=FLEET, device=device_id))
        self.channel = Channel(transport=self.transport, fleet=FLEET)
        self.tasks: list[TaskSpec] = []
        self.acks: list[str] = []
        self.transport.connect()
        topics = self.channel.topics
        self.channel.subscribe(topics.device_down(device_id), self._on_message)
        self.channel.send(topics.presence(device_id),
                          presence_message(fleet=FLEET, device=device_id, status="online"),
                          retain=True)
        hello = Hello(profile=prof.to_dict() if prof is not None else {},
                      eligibility={"eligible": True}, num_samples=SAMPLES)
        self.channel.send(topics.up(device_id, "hello"),
                          hello.to_message(fleet=FLEET, device=device_id))

    def _on_message(self, topic: str, message: Message) -> None:
        if message.kind == Kind.TASK:
            self.tasks.append(TaskSpec.from_message(message))
        elif message.kind == Kind.ACK:
            self.acks.append(message.json().get("status", ""))

    def send_update(self, values: np.ndarray, *, layout: Layout, num_samples: int,
                    steps: int, emulated_s: float | None = None) -> None:
        task = self.tasks[-1]
        body = encode_update(values, layout, CodecSpec.parse("fp32"), rng=0).body
        meta = UpdateMeta(num_samples=num_samples, steps=steps, train_loss=1.0, duration_s=0.1,
                          emulated_s=emulated_s)
        msg = update_message(fleet=FLEET, device=self.id, round=task.round,
                             model_version=task.model_version, attempt=0, codec="fp32",
                             meta=meta, codec_body=body)
        self.channel.send(self.channel.topics.up(self.id, "update"), msg)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloud_aggregator._artifacts import build_artifacts
    from cloud_aggregator._models import build_reference_model

    out = tmp_path_factory.mktemp("mlp-artifacts")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out


def start(tmp: Path, artifacts: Path, broker: MemoryBroker, n: int, **overrides: object
          ) -> Aggregator:
    settings: dict[str, object] = {
        "fleet": FLEET, "model": "mlp", "rounds": 3, "devices_per_round": n,
        "over_selection": 1.0, "quorum": 1, "deadline_s": DEADLINE_S, "state_dir": tmp,
        "local_epochs": 1, "batch_size": 32, "server_opt": "fedavg",
        "store_synchronous": "NORMAL",
    }
    settings.update(overrides)
    config = AggregatorConfig(**settings)  # type: ignore[arg-type]
    agg = Aggregator(config=config,
                     channel=Channel(transport=MemoryTransport(broker=broker, client_id="agg"),
                                     fleet=FLEET),
                     clock=ManualClock(), artifacts_dir=artifacts)
    agg.start()
    return agg


def expected_steps(prof: DeviceProfile, *, factor: float = 1.0) -> int:
    """What fits in the deadline by the cost model, written out independently."""
    cost = predict(prof, Task.for_model("mlp", n_samples=SAMPLES, epochs=1, batch_size=32))
    return local_steps_for(cost, DEADLINE_S * ADAPTIVE_HEADROOM, factor=factor)


def test_a_slow_device_gets_fewer_steps_a_fast_one_the_whole_task(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 4)
    fleet = {p.name: Device(broker, p.name, p) for p in (FAST, SLOW, HOPELESS)}
    fleet["unprofiled"] = Device(broker, "unprofiled", None)
    assert agg.tick()
    tasks = {name: dev.tasks[-1] for name, dev in fleet.items()}
    assert tasks["fast"].max_steps is None  # 0.2 s of training: the whole task fits
    assert tasks["unprofiled"].max_steps is None  # no profile, nothing to adapt by
    slow = tasks["slow"].max_steps
    assert slow is not None and slow == expected_steps(SLOW)
    assert 1 <= slow < 10  # fewer than the 10 steps of one epoch
    assert tasks["hopeless"].max_steps == 1  # never dropped: at least one step
    assert all(t.epochs == 1 and t.deadline_s == DEADLINE_S for t in tasks.values())
    agg.close()


def test_the_flag_turns_it_off(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2, adaptive_local_work=False, max_steps=8)
    fleet = {p.name: Device(broker, p.name, p) for p in (FAST, SLOW)}
    assert agg.tick()
    assert {d.tasks[-1].max_steps for d in fleet.values()} == {8}  # the configured cap
    agg.close()


def test_the_round_is_weighted_by_the_samples_reported(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2)
    fast, slow = Device(broker, "fast", FAST), Device(broker, "slow", SLOW)
    before = agg.params.copy()
    assert agg.tick()
    steps = slow.tasks[-1].max_steps
    assert steps is not None
    rng = np.random.default_rng(zlib.crc32(b"adaptive"))
    ups = {d.id: (rng.standard_normal(agg.layout.size) * 0.01).astype(np.float32)
           for d in (fast, slow)}
    fast.send_update(ups["fast"], layout=agg.layout, num_samples=SAMPLES, steps=10)
    slow.send_update(ups["slow"], layout=agg.layout, num_samples=32 * steps, steps=steps)
    assert fast.acks[-1] == slow.acks[-1] == "accepted"
    assert agg.tick()  # both answered: the round closes
    total = SAMPLES + 32 * steps
    expected = (SAMPLES * ups["fast"].astype(np.float64)
                + 32 * steps * ups["slow"].astype(np.float64)) / total
    np.testing.assert_allclose(agg.params, before + expected.astype(np.float32), atol=1e-6)
    agg.close()


def test_a_device_that_ran_late_is_given_less_next_time(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = start(tmp_path, artifacts, broker, 2, clock="virtual")
    fast, slow = Device(broker, "fast", FAST), Device(broker, "slow", SLOW)
    assert agg.tick()
    first = slow.tasks[-1].max_steps
    assert first == expected_steps(SLOW)
    # It took twice what its profile says (emulated time past the deadline): late.
    fast.send_update(np.zeros(agg.layout.size, np.float32), layout=agg.layout,
                     num_samples=SAMPLES, steps=10, emulated_s=1.0)
    slow.send_update(np.zeros(agg.layout.size, np.float32), layout=agg.layout,
                     num_samples=32 * first, steps=first, emulated_s=2 * 5.0 * first)
    assert slow.acks[-1] == "rejected"
    assert agg.tick() and agg.model_version == 1
    assert agg.tick()  # round 2
    second = slow.tasks[-1].max_steps
    assert second is not None and 1 <= second < first
    assert fast.tasks[-1].max_steps is None
    agg.close()
