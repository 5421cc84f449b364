"""``evolve`` makes what ``dataclasses.replace`` makes, for the records it is used on."""

from __future__ import annotations

import dataclasses

import pytest

from broker_bridge import Ack
from cloud_aggregator._evolve import evolve
from cloud_aggregator._history import DeviceHistory
from cloud_aggregator._store import JournalEntry, UpdateKey


def test_evolve_equals_replace_and_leaves_the_original_alone() -> None:
    h = DeviceHistory(selections=3, durations=(1.0, 2.0), last_round=7)
    changed = {"selections": 4, "durations": (1.0, 2.0, 3.0), "last_loss": 0.5}
    assert evolve(h, **changed) == dataclasses.replace(h, **changed)
    assert h == DeviceHistory(selections=3, durations=(1.0, 2.0), last_round=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(h, selections=1).selections = 2  # type: ignore[misc]
    key = UpdateKey(fleet="f", round=1, device_id="d", attempt=0)
    entry = JournalEntry(key=key, stream=1, body=b"x", meta={"a": 1})
    assert evolve(entry, stream=2) == dataclasses.replace(entry, stream=2)


def test_evolve_refuses_what_replace_would_check_or_reject() -> None:
    with pytest.raises(TypeError, match="no field 'nope'"):
        evolve(DeviceHistory(), nope=1)
    ack = Ack(round=1, attempt=0, what="update", status="accepted")
    with pytest.raises(TypeError, match="__post_init__"):  # its rules must run again
        evolve(ack, status="nonsense")
