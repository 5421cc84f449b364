"""Parent failover over real brokers: two parents, each a real aggregator on its own
Mosquitto (started here on free ports), and one real agent that knows both.

The device commits an update for parent A, and A's broker dies before the update gets
there: the device moves to B with its residual, trains there, and the update for A
waits parked. When B's broker dies in turn and A's is back, the device returns to A,
and A counts the parked update once, byte for byte the one committed before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from keys import device_key
from mqtt_rig import aggregator
from mqtt_rig import transport as mqtt_transport
from waiting import wait_for

from broker_bridge import AGGREGATOR_PRESENCE, Channel, MosquittoProcess
from cloud_aggregator import Aggregator
from device_profiles import ConfigError
from edge_runtime import (
    AgentHooks,
    CommitStep,
    DeviceStatus,
    FailoverAgent,
    LocalData,
    ParentLink,
    TaskStatus,
    load_mnist1d,
)
from edge_runtime._failover import PARKED_DIR
from edge_runtime._state import RESIDUAL_FILE, SUBMISSION_FILE, Submission


class Sites:
    """Parent sites for a test: each a real aggregator on its own Mosquitto; whatever is
    started here is stopped and closed at teardown (``sites`` fixture)."""

    def __init__(self, tmp_path: Path, artifacts: Path,
                 mosquittos: Callable[..., MosquittoProcess]) -> None:
        self._tmp, self._artifacts, self._mosquittos = tmp_path, artifacts, mosquittos
        self.aggregators: list[Aggregator] = []
        self.runners: list[threading.Thread] = []
        self.devices: list[FailoverAgent] = []

    def site(self, fleet: str, **settings: object) -> tuple[MosquittoProcess, Aggregator]:
        broker = self._mosquittos()
        agg = aggregator(broker.url, fleet, self._tmp / f"agg-{fleet}", self._artifacts,
                         **settings)
        self.aggregators.append(agg)
        return broker, agg

    def run(self, agg: Aggregator) -> None:
        runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 240.0}, daemon=True)
        self.runners.append(runner)
        runner.start()

    def device(self, device_id: str, parents: list[ParentLink], *, rows: slice = slice(200),
               **options: object) -> FailoverAgent:
        data = load_mnist1d(cache_dir=self._tmp.parent.parent / "fleetlearn-cache")
        agent = FailoverAgent(device_id=device_id, state_dir=self._tmp / device_id,
                              parents=parents,
                              data=LocalData(x=data.x_train[rows], y=data.y_train[rows]),
                              status_probe=DeviceStatus, key=device_key(device_id),
                              **options)  # type: ignore[arg-type]
        self.devices.append(agent)
        return agent

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        for a in self.aggregators:
            a.stop()
        for r in self.runners:
            r.join(timeout=30)
        for a in self.aggregators:
            a.close()
            a.channel.transport.close()


@pytest.fixture
def sites(tmp_path: Path, artifacts: Path,
          mosquittos: Callable[..., MosquittoProcess]) -> Iterator[Sites]:
    made = Sites(tmp_path, artifacts, mosquittos)
    try:
        yield made
    finally:
        made.close()


def test_parent_links_are_checked() -> None:
    with pytest.raises(ConfigError):
        ParentLink(broker="tcp://127.0.0.1:1883", fleet="site-a")
    with pytest.raises(ConfigError):
        ParentLink(broker="mqtt://127.0.0.1:1883", fleet="site.a")
    with pytest.raises(ConfigError):
        FailoverAgent(device_id="dev-1", parents=[], state_dir="/nonexistent")


def test_unacknowledged_update_is_parked_and_counted_once_at_its_parent(
        tmp_path: Path, sites: Sites) -> None:
    settings = {"devices_per_round": 1, "quorum": 1, "min_devices": 1, "rounds": 1,
                "deadline_s": 300.0, "codec": "ef+topk:0.1+q8+zstd"}
    broker_a, agg_a = sites.site("site-a", **settings)
    broker_b, agg_b = sites.site("site-b", **settings)
    committed: list[bytes] = []

    def on_step(step: CommitStep) -> None:
        # The first update (for A) is committed: A's broker dies before it is sent.
        if step == CommitStep.RECORD_COMMITTED and not committed:
            committed.append((device.state_dir / SUBMISSION_FILE).read_bytes())
            broker_a.kill()

    device = sites.device(
        "dev-1", [ParentLink(broker=broker_a.url, fleet="site-a", name="a"),
                  ParentLink(broker=broker_b.url, fleet="site-b", name="b")],
        failover_after_s=0.5, hooks=AgentHooks(on_commit_step=on_step))
    agg_a.start()
    agg_b.start()
    device.start()
    for a in (agg_a, agg_b):
        sites.run(a)
    # Moved to B with the update for A parked, its residual kept.
    assert wait_for(lambda: device.parent.fleet == "site-b", timeout=60)
    parked = tmp_path / "dev-1" / PARKED_DIR / "site-a"
    assert (parked / SUBMISSION_FILE).exists()
    first = Submission.from_bytes(committed[0])
    assert first.residual is not None
    # B trains the device and counts its own update.
    assert wait_for(lambda: agg_b.done, timeout=120), agg_b.status_line()
    assert [k.device_id for k in agg_b.store.accepted_keys("site-b", 1)] == ["dev-1"]
    residual_after_b = (tmp_path / "dev-1" / RESIDUAL_FILE).read_bytes()
    assert residual_after_b != first.residual  # B's update moved it on
    assert agg_a.round_index == 1 and agg_a.store.accepted_keys("site-a") == []
    # B's site goes down, A's comes back: the device returns to A with the update.
    broker_a.start()
    broker_b.kill()
    assert wait_for(lambda: agg_a.done, timeout=120), agg_a.status_line()
    assert device.parent.fleet == "site-a"
    assert [k.device_id for k in agg_a.store.accepted_keys("site-a")] == ["dev-1"]
    assert not parked.exists()
    agent = device.agent
    assert agent is not None

    def acked() -> bool:
        record = agent.state.record
        return record is not None and record.status == TaskStatus.ACKED

    assert wait_for(acked, timeout=30)
    sent = agent.state.submission
    assert sent is not None and sent.body == first.body  # the very bytes committed
    assert sent.attempt == first.attempt and sent.round == first.round
    # Restoring never rolled the device's residual back to A's.
    assert (tmp_path / "dev-1" / RESIDUAL_FILE).read_bytes() == residual_after_b
    assert [m.to_parent for m in device.moves] == ["a", "b", "a"]
    assert [m.parked for m in device.moves] == [False, True, False]
    assert [m.restored for m in device.moves] == [False, False, True]
    assert np.isfinite(agg_a.params).all()


def two_parents(broker_a: MosquittoProcess, broker_b: MosquittoProcess) -> list[ParentLink]:
    return [ParentLink(broker=broker_a.url, fleet="site-a", name="a"),
            ParentLink(broker=broker_b.url, fleet="site-b", name="b")]


@pytest.mark.slow
def test_a_dead_aggregator_behind_a_live_broker_moves_its_children(sites: Sites) -> None:
    """A's aggregator dies (its connection drops: its last will says offline) while A's
    broker stays up: the device moves to B, which trains and counts it. While A's
    aggregator was there, the device stayed, however long it waited for a task."""
    settings = {"devices_per_round": 1, "quorum": 1, "min_devices": 1, "rounds": 1,
                "deadline_s": 300.0}
    # A never selects: two devices per round and only one exists, so the device waits.
    broker_a, agg_a = sites.site("site-a", **{**settings, "devices_per_round": 2,
                                              "min_devices": 2})
    broker_b, agg_b = sites.site("site-b", **settings)
    device = sites.device("dev-1", two_parents(broker_a, broker_b), failover_after_s=0.5,
                          poll_s=0.05)
    agg_a.start()
    agg_b.start()
    device.start()
    # A knows the device (its hello came) and is online: many failover periods pass
    # with the device attached to A.
    assert wait_for(lambda: agg_a.registry.get("dev-1") is not None, timeout=30)
    checks = 0

    def stays() -> bool:
        nonlocal checks
        checks += 1
        return device.parent.fleet != "site-a" or checks >= 40

    wait_for(stays, timeout=10, step=0.05)  # 40 x 0.05 s = 4 failover periods
    assert device.parent.fleet == "site-a" and len(device.moves) == 1
    agg_a.abort()  # the aggregator process dies; its broker keeps running
    assert wait_for(lambda: device.parent.fleet == "site-b", timeout=30)
    # A's broker is up and holds the aggregator's will: offline, retained.
    seen: list[str] = []
    probe = mqtt_transport(broker_a.url, "probe", "site-a", device=False)
    channel = Channel(transport=probe, fleet="site-a")
    channel.subscribe(channel.topics.broadcast(AGGREGATOR_PRESENCE),
                      lambda topic, message: seen.append(str(message.json()["status"])))
    probe.connect(timeout=10)
    try:
        assert wait_for(lambda: bool(seen), timeout=10) and seen[-1] == "offline"
    finally:
        probe.close()
    sites.run(agg_b)
    assert wait_for(lambda: agg_b.done, timeout=120), agg_b.status_line()
    assert [k.device_id for k in agg_b.store.accepted_keys("site-b", 1)] == ["dev-1"]
    assert [m.to_parent for m in device.moves] == ["a", "b"]


@pytest.mark.slow
def test_a_parent_at_capacity_moves_its_extra_children_to_another(sites: Sites) -> None:
    """Two devices know parents A and B and both start at A, which serves one
    (max_children = 1): the other is told to move, goes to B at once, and each parent
    trains and counts its own device."""
    settings = {"devices_per_round": 1, "quorum": 1, "min_devices": 1, "rounds": 1,
                "deadline_s": 300.0}
    broker_a, agg_a = sites.site("site-a", max_children=1, **settings)
    broker_b, agg_b = sites.site("site-b", **settings)
    parents = two_parents(broker_a, broker_b)
    devices = [sites.device(dev, parents, rows=slice(i * 200, (i + 1) * 200),
                            failover_after_s=60.0, poll_s=0.05)
               for i, dev in enumerate(("dev-1", "dev-2"))]
    agg_a.start()
    agg_b.start()
    for d in devices:
        d.start()
    # Well before any failover (60 s): one device moved because A was full.
    assert wait_for(lambda: sorted(d.parent.fleet for d in devices)
                    == ["site-a", "site-b"], timeout=30)
    moved = next(d for d in devices if d.parent.fleet == "site-b")
    stayed = next(d for d in devices if d.parent.fleet == "site-a")
    assert [m.to_parent for m in moved.moves] == ["a", "b"]
    assert [m.to_parent for m in stayed.moves] == ["a"]
    for a in (agg_a, agg_b):
        sites.run(a)
    assert wait_for(lambda: agg_a.done and agg_b.done, timeout=120), (
        agg_a.status_line(), agg_b.status_line())
    assert [k.device_id for k in agg_a.store.accepted_keys("site-a", 1)] == [stayed.device_id]
    assert [k.device_id for k in agg_b.store.accepted_keys("site-b", 1)] == [moved.device_id]


@pytest.mark.slow
def test_a_device_every_parent_turns_away_stays_put(sites: Sites) -> None:
    """Three devices, two parents that serve one each: the third is turned away by both
    and stays where it ended (no back and forth), unselected there."""
    settings = {"devices_per_round": 2, "quorum": 1, "min_devices": 1, "rounds": 1,
                "deadline_s": 300.0, "max_children": 1}
    broker_a, agg_a = sites.site("site-a", **settings)
    broker_b, agg_b = sites.site("site-b", **settings)
    aggs = [agg_a, agg_b]
    parents = two_parents(broker_a, broker_b)
    devices = [sites.device(dev, parents, failover_after_s=60.0, poll_s=0.05)
               for dev in ("dev-1", "dev-2", "dev-3")]
    for a in aggs:
        a.start()
    for d in devices:
        d.start()

    def turned_away_by_both() -> bool:  # two by the first parent, one by the other
        return sum(a.counters.snapshot()["updates"].get("turned_away:capacity", 0)
                   for a in aggs) >= 3 and sum(len(d.moves) for d in devices) >= 5

    assert wait_for(turned_away_by_both, timeout=30)
    # Each parent serves one; the third device was turned away by both and stays
    # where it ended, excluded there.
    by_parent = {a.fleet: [d for d in devices if d.parent.fleet == a.fleet] for a in aggs}
    assert sorted(len(v) for v in by_parent.values()) == [1, 2]
    crowded = next(a for a in aggs if len(by_parent[a.fleet]) == 2)

    def excluded(device: FailoverAgent) -> bool:
        info = crowded.registry.get(device.device_id)
        return info is not None and not info.eligible and "capacity" in " ".join(info.reasons)

    (wanderer,) = [d for d in by_parent[crowded.fleet] if excluded(d)]
    assert [m.to_parent for m in wanderer.moves] == ["a", "b"]
    moves = len(wanderer.moves)
    checks = 0

    def quiet() -> bool:  # many watch periods (0.05 s) pass without another move
        nonlocal checks
        checks += 1
        return len(wanderer.moves) != moves or checks >= 40

    wait_for(quiet, timeout=10, step=0.05)
    assert len(wanderer.moves) == moves
    assert crowded.tick()  # a round with the one device it serves
    assert crowded.registry.history.get(wanderer.device_id).selections == 0
