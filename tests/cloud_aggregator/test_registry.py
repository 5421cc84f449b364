"""The fleet registry: presence, hello, history, persistence through the Store."""

from __future__ import annotations

from pathlib import Path

from broker_bridge import Hello
from cloud_aggregator._registry import FleetRegistry
from cloud_aggregator._store import SCHEMA_VERSION, Store
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
    assert info.num_samples == 40 and info.eligible and info.hello_seen
    assert info.profile is not None
    history = again.history.get("a")
    assert (history.selections, history.completions, history.misses) == (1, 1, 1)
    assert history.durations == (4.0,) and history.last_loss == 0.7 and history.last_round == 3


def test_a_version_1_store_moves_its_device_blobs_into_typed_tables(tmp_path: Path) -> None:
    """Before schema 2 a device's history was a JSON blob and its counters were kept by
    the round transactions; the migration keeps the larger count of the two."""
    import json
    import sqlite3

    from cloud_aggregator._store import _SCHEMA

    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA + ";INSERT INTO schema_version (version) VALUES (1);")
    conn.execute("INSERT INTO devices (device_id, profile, last_seen, online, rounds_selected,"
                 " missed_deadlines) VALUES ('a', '{}', 1.0, 1, 5, 2)")
    blob = {"eligible": True, "reasons": [], "num_samples": 40, "hello_seen": True,
            "rounds_selected": 4, "rounds_completed": 3, "missed_deadlines": 1,
            "last_round": 9, "last_loss": 0.5, "durations": [2.0, 3.0],
            "model_versions": [1, 2], "artifacts_hash": None}
    conn.execute("INSERT INTO state_blobs (name, body, updated_at) VALUES (?, ?, 1.0)",
                 ("device:a", json.dumps(blob).encode()))
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get_state("device:a") is None  # moved, not copied
    record = store.device("a")
    assert record is not None and record.eligible and record.num_samples == 40
    assert record.model_versions == (1, 2)
    h = record.history
    assert (h.selections, h.completions, h.misses, h.last_round) == (5, 3, 2, 9)
    assert h.durations == (2.0, 3.0) and h.last_loss == 0.5
    store.close()
    assert Store(path).schema_version() == SCHEMA_VERSION  # migrated once
