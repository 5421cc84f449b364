"""A parent at ``max_children`` serves the first devices to greet it and tells the
others to move (edge tiers' load balancing); a place frees when a served one leaves."""

from __future__ import annotations

from pathlib import Path

import pytest
from aggregator_rig import FLEET, FakeDevice, devices, make
from keys import device_key

from broker_bridge import Enrolment, MemoryBroker, presence_message
from cloud_aggregator import AggregatorConfig
from device_profiles import ConfigError


def test_max_children_is_a_positive_integer() -> None:
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="max_children"):
            AggregatorConfig(max_children=bad)


def test_devices_beyond_capacity_are_asked_to_move_and_not_selected(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = make(tmp_path, artifacts, broker, max_children=2, devices_per_round=3,
               min_devices=2, quorum=2)
    fleet = devices(broker, 3)  # d0, d1 greet first; d2 is one too many
    assert [d.controls for d in fleet.values()] == [[], [], ["move"]]
    assert agg.tick()
    selected = {d.id for d in fleet.values() if d.tasks}
    assert selected == {"d0", "d1"}
    assert agg.counters.snapshot()["updates"]["turned_away:capacity"] == 1
    # A served device leaves: the next greeting takes its place.
    d0 = fleet["d0"]
    d0.channel.send(d0.channel.topics.presence("d0"),
                    presence_message(fleet=d0.channel.fleet, device="d0", status="offline"),
                    retain=True)
    fleet["d2"].hello()
    assert fleet["d2"].controls == ["move"]  # served now: not asked again
    late = FakeDevice(broker, "d3")  # and a newcomer is now one too many again
    assert late.controls == ["move"]


def test_a_device_without_an_enrolled_key_takes_no_place(tmp_path: Path,
                                                          artifacts: Path) -> None:
    """Hellos are not signed: a device the aggregator could never verify must not fill
    the places and push enrolled devices away."""
    enrolment = Enrolment(fleet=FLEET)
    for dev in ("d1", "d2"):
        enrolment.enrol(dev, device_key(dev).public_key)
    broker = MemoryBroker()
    make(tmp_path, artifacts, broker, max_children=2, enrolment=enrolment)
    fleet = devices(broker, 3)  # d0 greets first, unenrolled
    assert [d.controls for d in fleet.values()] == [[], [], []]
