"""The fleet registry: presence, hello, history, persistence through the Store."""

from __future__ import annotations

from pathlib import Path

from broker_bridge import Hello
from cloud_aggregator._registry import FleetRegistry
from cloud_aggregator._store import Store
from device_profiles import get_profile


def hello(samples: int = 40, eligible: bool = True) -> Hello:
    return Hello(profile=get_profile("phone-mid").to_dict(),
                 eligibility={"eligible": eligible, "reasons": [] if eligible else ["battery"]},
                 num_samples=samples, artifacts_hash="abc" + "0" * 61, model_versions=[1, 2])


def test_presence_hello_and_candidates(tmp_path: Path) -> None:
    reg = FleetRegistry(store=Store(tmp_path / "s.sqlite"), clock=lambda: 5.0)
    reg.on_presence("a", online=True)
    reg.on_hello("a", hello())
    reg.on_hello("b", hello(eligible=False))
    reg.on_hello("c", hello(samples=0))
    reg.on_presence("d", online=True)  # no hello heard: a retained 'online' may be stale
    reg.on_hello("e", hello())
    assert reg.on_presence("e", online=False)  # the last will
    assert not reg.on_presence("e", online=False)
    reg.on_presence("f", online=True)
    reg.on_hello("f", hello())
    reg.on_presence("f", online=False)
    reg.on_presence("f", online=True)  # back, but no hello since: not yet
    ready = [d.device_id for d in reg.ready()]
    assert ready == ["a"]
    reg.on_hello("d", hello())
    assert [d.device_id for d in reg.ready()] == ["a", "d"]
    info = reg.get("a")
    assert info is not None and info.profile is not None and info.profile.name == "phone-mid"
    assert info.model_versions == (1, 2) and info.artifacts_hash == "abc" + "0" * 61
    cands = reg.candidates(duration=lambda i: 2.5 if i.profile else None)
    assert [(c.device_id, c.predicted_duration_s) for c in cands] == [("a", 2.5), ("d", 2.5)]


def test_history_survives_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    reg = FleetRegistry(store=store)
    reg.on_hello("a", hello())
    reg.record_selected(["a"], 3)
    reg.record_outcome("a", completed=True, duration_s=4.0, loss=0.7)
    reg.record_outcome("a", completed=False)
    reg.flush()  # the aggregator flushes after each group of updates and each tick
    store.close()
    again = FleetRegistry(store=Store(tmp_path / "s.sqlite"))
    info = again.get("a")
    assert info is not None and not info.online  # presence is re-announced after restarts
    assert info.rounds_completed == 1 and info.missed_deadlines == 1
    assert info.durations == (4.0,) and info.last_loss == 0.7 and info.num_samples == 40
    assert info.profile is not None
