"""Hellos and tasks in the orders a deployment produces them (issue 12, item 16).

- The ``devices.profile`` column read ``{}`` for agents whose hello carried a full
  profile: a profile with one key this version does not know (every availability field
  of the dataclass, say) was thrown away whole.
- A task can reach a device before its hello (the aggregator restarted mid-round and
  sends the round's tasks at once; a device's persistent session holds a task sent
  while it was away), and the same task can come twice (the re-sent round's task, then
  again for the ``busy_round`` of the device's hello). Over a real Mosquitto: the device
  trains once and its update counts once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from agent_rig import make_data
from aggregator_rig import make
from keys import enrol_agent
from mqtt_rig import aggregator, transport
from waiting import wait_for

from broker_bridge import (
    Ack,
    Channel,
    Hello,
    Kind,
    MemoryBroker,
    MemoryTransport,
    Message,
    MosquittoProcess,
    presence_message,
    presence_will,
)
from cloud_aggregator import Aggregator
from cloud_aggregator._rounds import DeviceState
from device_profiles import get_profile
from edge_runtime import Agent, AgentSettings, DeviceStatus

FLEET = "test"
T = TypeVar("T")


def say_hello(broker: MemoryBroker, device: str, profile: dict[str, object]) -> None:
    t = MemoryTransport(broker=broker, client_id=device,
                        will=presence_will(fleet=FLEET, device=device))
    channel = Channel(transport=t, fleet=FLEET)
    t.connect()
    channel.send(channel.topics.presence(device),
                 presence_message(fleet=FLEET, device=device, status="online"), retain=True)
    channel.send(channel.topics.up(device, "hello"),
                 Hello(profile=profile, eligibility={"eligible": True},
                       num_samples=50).to_message(fleet=FLEET, device=device))


def test_a_hello_with_a_full_profile_fills_the_profile_column(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    agg = make(tmp_path, artifacts, broker)
    profile = get_profile("pi4").to_dict()
    # As an agent written from the dataclass sends it: every availability field, and
    # a field this aggregator does not know.
    profile["availability"] = {"kind": "always_on", "start_hour": 0.0, "end_hour": 24.0,
                               "daily_probability": 1.0, "mean_up_s": 3600.0,
                               "mean_down_s": 600.0}
    profile["os"] = "Android 14"
    profile["sources"] = {"os": "android.os.Build", "cores": "Runtime.availableProcessors"}
    say_hello(broker, "phone-1", profile)
    row = agg.store.device("phone-1")
    assert row is not None
    # Before: {} (the whole profile refused for the extra keys).
    assert row.profile["name"] == "pi4" and row.profile["gflops"] == 8.0
    assert row.profile["sources"] == {"cores": "Runtime.availableProcessors"}
    info = agg.registry.get("phone-1")
    assert info is not None and info.profile is not None and info.profile.cores == 4
    # A profile whose known fields are wrong is still refused, and said so.
    bad = dict(profile, cores="four")
    say_hello(broker, "phone-2", bad)
    row2 = agg.store.device("phone-2")
    assert row2 is not None and row2.profile == {}
    assert agg.counters.snapshot()["updates"]["malformed:profile"] == 1


class GatedExecutor(ThreadPoolExecutor):
    """An agent's executor whose jobs wait for ``gate`` before they start."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(max_workers=1)
        self.gate = gate

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        def held() -> T:
            self.gate.wait(120)
            return fn(*args, **kwargs)

        return super().submit(held)


def test_a_task_before_the_hello_and_the_same_task_twice_over_mosquitto(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    fleet = "order"
    state = tmp_path / "aggregator"
    opts: dict[str, object] = {"devices_per_round": 2, "quorum": 2, "rounds": 1,
                               "deadline_s": 300.0}
    gate = threading.Event()  # no device trains before the aggregator has restarted
    agents: list[Agent] = []
    executors: list[GatedExecutor] = []
    task_acks: dict[str, list[tuple[int, str]]] = {}

    def on_up(_topic: str, m: Message) -> None:  # the task acks, as the broker carries them
        if m.kind == Kind.ACK:
            ack = Ack.from_message(m)
            if ack.what == "task":
                task_acks.setdefault(m.device, []).append((ack.round, ack.status))

    spy = Channel(transport=transport(mosquitto.url, "ack-spy", fleet, device=False),
                  fleet=fleet)
    spy.subscribe(spy.topics.all_up, on_up)
    spy.transport.connect()

    def agent(device: str) -> Agent:
        channel = Channel(transport=transport(mosquitto.url, device, fleet), fleet=fleet)
        executors.append(GatedExecutor(gate))
        a = Agent(device_id=device, channel=channel, data=make_data(seed=len(agents)),
                  state_dir=tmp_path / device, executor=executors[-1],
                  status_probe=lambda: DeviceStatus(free_memory_mb=1000.0),
                  settings=AgentSettings(request_timeout_s=60.0, status_interval_s=None),
                  owns_transport=True)
        agents.append(enrol_agent(a))
        a.start()
        return a

    def run(agg: Aggregator) -> threading.Thread:
        agg.start()
        thread = threading.Thread(target=agg.run, kwargs={"timeout_s": 120}, daemon=True)
        thread.start()
        return thread

    first = aggregator(mosquitto.url, fleet, state, artifacts, **opts)
    again: Aggregator | None = None
    try:
        dev1, dev2 = agent("dev-1"), agent("dev-2")
        runner = run(first)
        assert wait_for(lambda: dev1.stats.tasks == 1 and dev2.stats.tasks == 1, 60)
        # The aggregator dies with round 1 open; dev-2 dies too (its will says offline).
        first.stop()
        runner.join(10)
        first.abort()
        dev2.abort()  # as a power cut: its held task never runs, its will fires
        agents.remove(dev2)
        # The restarted aggregator re-sends round 1's tasks at once, before any hello:
        # dev-1 gets its task a second time, dev-2's copy waits in its broker session.
        again = aggregator(mosquitto.url, fleet, state, artifacts, **opts)
        runner = run(again)
        assert wait_for(lambda: dev1.stats.tasks == 1 and len(task_acks.get("dev-1", [])) >= 2,
                        30)
        dev2b = agent("dev-2")  # the queued task comes with the connection
        assert wait_for(lambda: dev2b.stats.tasks == 1, 30)
        # Back and working on its task: the round waits for it. Before: it stayed
        # "dropped" (its will had fired), and the round ended without it when dev-1
        # reported.
        rnd = again.current_round
        assert rnd is not None
        assert wait_for(lambda: rnd.state("dev-2") is DeviceState.WORKING, 30), rnd.states
        gate.set()
        assert wait_for(lambda: again is not None and len(again.history) == 1, 120), (
            again.status_line())
        assert again.model_version == 1
        assert again.store.count_accepted(fleet, 1) == 2
        assert again.history[-1].devices_reported == 2
        # Each device trained once, however many copies of its task arrived.
        assert dev1.stats.tasks == 1 and dev2b.stats.tasks == 1
        assert all(status == "accepted" for _, status in task_acks["dev-1"])
        assert dev1.stats.updates_sent == 1 and dev2b.stats.updates_sent == 1
        assert np.isfinite(again.params).all()
        again.stop()
        runner.join(10)
    finally:
        gate.set()
        for a in agents:
            a.stop()
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)
        spy.transport.close()
        if again is not None:
            again.close()
            again.channel.transport.close()


def test_a_device_back_from_offline_gets_its_task_again(tmp_path: Path, artifacts: Path) -> None:
    """Its session may have lost the task; a device that only reported an error (and
    never left) is not sent the task again for each hello."""
    from aggregator_rig import devices

    from broker_bridge import ErrorReport

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0, d1 = fleet["d0"], fleet["d1"]
    d1.channel.send(d1.channel.topics.up("d1", "error"), ErrorReport(
        round=1, code="disk_full", message="no space").to_message(fleet=FLEET, device="d1"))
    d1.hello()  # still connected: no new copy of its task
    assert len(d1.tasks) == 1
    d0.transport.kill()  # its will: offline
    rnd = agg.current_round
    assert rnd is not None and rnd.state("d0") is DeviceState.DROPPED
    d0.transport.connect()
    d0.channel.send(d0.channel.topics.presence("d0"),
                    presence_message(fleet=FLEET, device="d0", status="online"), retain=True)
    d0.hello()  # back, not busy: its task comes again
    assert len(d0.tasks) == 2 and d0.tasks[-1] == d0.tasks[0]
