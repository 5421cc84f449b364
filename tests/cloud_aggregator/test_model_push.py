"""How devices get each model version (``model_push``).

FedBuff used to publish every release on ``broadcast/model``: the broker sent every
connected device every version, a release every few updates, though only the devices
given a task need one (an in-memory fleet shares one copy, so the simulation never
showed it). Now a FedBuff device fetches the version its task names (for a model of at
most 1 MiB as sent, by default), and the version is kept for it; sync rounds still
broadcast, where the selected devices need the new model at once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aggregator_rig import FLEET, FakeDevice, devices, feed_async, make

from broker_bridge import MemoryBroker, Request, decode_model, read_model_message
from cloud_aggregator import Aggregator
from cloud_aggregator._config import ON_REQUEST_MAX_BYTES, AggregatorConfig
from cloud_aggregator._serving import KEEP_VERSIONS
from device_profiles import ConfigError


def _broadcasts(dev: FakeDevice) -> list[int]:
    """Versions ``dev`` got on ``broadcast/model`` (a model sent to it alone names it)."""
    return sorted(v for v, m in dev.models.items() if not m.device)


def _fetch(agg: Aggregator, dev: FakeDevice) -> int | None:
    """Ask for the version of ``dev``'s last task, as an agent does; the version got."""
    task = dev.tasks[-1]
    dev.models.clear()
    dev.channel.send(dev.channel.topics.up(dev.id, "request"), Request(
        want="model", model_version=task.model_version, model_hash=task.model_hash,
        artifacts_hash=task.artifacts_hash).to_message(fleet=FLEET, device=dev.id))
    if task.model_version not in dev.models:
        return None
    meta, body = read_model_message(dev.models[task.model_version])
    assert meta.model_hash == task.model_hash and dev.models[task.model_version].device
    assert decode_model(body, agg.layout).shape == (agg.layout.size,)
    return meta.model_version


def test_fedbuff_no_longer_sends_every_release_to_every_device(tmp_path: Path,
                                                               artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 6)
    agg = make(tmp_path / "default", artifacts, broker, mode="async", concurrency=2,
               buffer_size=1, rounds=20)
    feed_async(agg, fleet, 6)
    assert agg.model_version == 6
    assert all(_broadcasts(d) == [] for d in fleet.values())
    # What it did before, still there when asked for: every device got every version.
    broker = MemoryBroker()
    fleet = devices(broker, 6)
    agg = make(tmp_path / "broadcast", artifacts, broker, mode="async", concurrency=2,
               buffer_size=1, rounds=20, model_push="broadcast")
    feed_async(agg, fleet, 6)
    assert all(_broadcasts(d) == list(range(7)) for d in fleet.values())


def test_a_fedbuff_device_fetches_its_tasks_version_every_task(tmp_path: Path,
                                                               artifacts: Path) -> None:
    """One fetch per task, past the request budget (burst 10, 20 a minute: a device that
    trains every few seconds fetches more), never refused as limited."""
    broker = MemoryBroker()
    fleet = devices(broker, 1)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=1, buffer_size=1,
               rounds=40)
    dev = fleet["d0"]
    for _ in range(15):
        agg.tick()
        assert _fetch(agg, dev) == dev.tasks[-1].model_version
        dev.send_update(layout=agg.layout)
        assert dev.last_ack().status == "accepted"
    assert agg.counters.snapshot()["updates"].get("requests_limited:model") is None
    # A fetch the task did not call for is within the budget, as before.
    for _ in range(12):
        dev.channel.send(dev.channel.topics.up("d0", "request"), Request(
            want="model", model_version=agg.model_version).to_message(fleet=FLEET, device="d0"))
    assert agg.counters.snapshot()["updates"]["requests_limited:model"] >= 1


def test_a_task_keeps_its_version_while_later_ones_are_released(
        tmp_path: Path, artifacts: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A device still holding a task of version v fetches v after more releases than the
    server keeps versions; past ``max_staleness`` (its update would be refused anyway)
    v is let go, and the request is answered by nothing but a warning."""
    for max_staleness, kept in ((20, True), (2, False)):
        broker = MemoryBroker()
        fleet = devices(broker, 2)
        agg = make(tmp_path / str(max_staleness), artifacts, broker, mode="async",
                   concurrency=2, buffer_size=1, rounds=40, max_staleness=max_staleness,
                   checkpoint_every_s=3600.0)  # no file of version 1 to fall back on
        agg.tick()
        slow, fast = fleet["d0"], fleet["d1"]
        fast.send_update(layout=agg.layout)
        slow.decline()
        agg.tick()  # both hold tasks of version 1
        version = slow.tasks[-1].model_version
        assert version == 1 == fast.tasks[-1].model_version
        for _ in range(KEEP_VERSIONS + 2):
            fast.send_update(layout=agg.layout)
            assert fast.last_ack().status == "accepted"
            agg.tick()  # its next task, of the version just released
        assert agg.model_version >= version + KEEP_VERSIONS + 2
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert (_fetch(agg, slow) == version) is kept, max_staleness
        assert ("asked for model version 1" in caplog.text) is not kept, caplog.text


def test_sync_rounds_broadcast_unless_told_and_then_devices_fetch(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path / "sync", artifacts, broker, rounds=2)
    assert agg.tick()
    assert all(_broadcasts(d) == [0] for d in fleet.values())
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path / "fetch", artifacts, broker, rounds=2, model_push="on_request")
    for _ in range(2):
        assert agg.tick()  # a round opens
        for dev in fleet.values():
            assert _fetch(agg, dev) == agg.model_version
            dev.send_update(layout=agg.layout)
        assert agg.tick()  # ... and closes
    assert agg.model_version == 2
    assert all(_broadcasts(d) == [] for d in fleet.values())


def test_model_push_is_a_setting_with_a_default_per_mode_and_size() -> None:
    small, large = ON_REQUEST_MAX_BYTES, ON_REQUEST_MAX_BYTES + 1
    assert AggregatorConfig().broadcasts_model(small)
    assert AggregatorConfig().broadcasts_model(large)
    # Async: a small model is fetched per task; a large one costs the aggregator more per
    # copy than the update that answers the task, and is broadcast.
    assert not AggregatorConfig(mode="async").broadcasts_model(small)
    assert AggregatorConfig(mode="async").broadcasts_model(large)
    assert AggregatorConfig(mode="async", model_push="broadcast").broadcasts_model(small)
    assert not AggregatorConfig(mode="async", model_push="on_request").broadcasts_model(large)
    assert not AggregatorConfig(model_push="on_request").broadcasts_model(small)
    with pytest.raises(ConfigError, match="model_push must be one of broadcast, on_request"):
        AggregatorConfig(model_push="sometimes")  # type: ignore[arg-type]
