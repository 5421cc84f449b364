"""The aggregator's SQLite store: idempotent accepts, durable checkpoints, resume, SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_aggregator._aggregation import StreamingAccumulator
from cloud_aggregator._server_opt import make_server_optimizer
from cloud_aggregator._store import (
    SCHEMA_VERSION,
    CheckpointCorrupt,
    SchemaTooNew,
    Store,
    StoreError,
    UpdateKey,
)

REPO = Path(__file__).resolve().parents[2]
FLEET = "fleet-a"


def _key(device: str, *, round_index: int = 0, attempt: int = 0) -> UpdateKey:
    return UpdateKey(fleet=FLEET, round=round_index, device_id=device, attempt=attempt)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "agg.db") as s:
        yield s


# --------------------------------------------------------------------------- schema


def test_fresh_store_is_wal_and_versioned(tmp_path: Path) -> None:
    with Store(tmp_path / "agg.db") as s:
        assert s.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(tmp_path / "agg.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with Store(tmp_path / "agg.db") as s:  # reopening keeps the schema
        assert s.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "agg.db").close()
    conn = sqlite3.connect(tmp_path / "agg.db")
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match="Upgrade fleetlearn"):
        Store(tmp_path / "agg.db")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store(junk)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="no fleetlearn schema"):
        Store(other)


# --------------------------------------------------------------------------- idempotency


def test_duplicate_key_counted_once(store: Store) -> None:
    store.upsert_device("d1", profile={"class": "rpi4"})
    assert store.accept_update(_key("d1")) is True
    assert store.accept_update(_key("d1")) is False  # QoS 1 redelivery
    assert store.accept_update(_key("d1", attempt=1)) is True  # a new attempt is new
    assert store.count_accepted(FLEET, 0) == 2


def test_duplicate_across_connections(tmp_path: Path) -> None:
    with Store(tmp_path / "agg.db") as a, Store(tmp_path / "agg.db") as b:
        results = [a.add_round_update(_key("d1"), b"x"), b.add_round_update(_key("d1"), b"y")]
        assert results == [True, False]
        bodies = [u.body for u in b.round_updates(FLEET, 0)]
        assert bodies == [b"x"]


def test_accept_with_state_is_atomic(store: Store) -> None:
    assert store.accept_update(_key("d1"), states={"partial": b"sum-1"})
    assert not store.accept_update(_key("d1"), states={"partial": b"sum-dup"})
    assert store.get_state("partial") == b"sum-1"  # the duplicate wrote nothing


# --------------------------------------------------------------------------- rounds, devices


def test_round_lifecycle_and_devices(store: Store) -> None:
    for d in ("d1", "d2", "d3"):
        store.upsert_device(d, profile={"ram_mb": 512}, seen_at=1.0)
    rec = store.open_round(
        fleet=FLEET,
        round_index=0,
        model_version=4,
        selected=["d1", "d2", "d3"],
        quorum=2,
        deadline=100.0,
        started_at=10.0,
    )
    assert store.round(FLEET, 0) == rec
    with pytest.raises(StoreError, match="exists"):
        store.open_round(fleet=FLEET, round_index=0, model_version=4, selected=[], quorum=1)
    store.close_round(fleet=FLEET, round_index=0, ended_at=50.0)
    closed = store.round(FLEET, 0)
    assert closed is not None and closed.state == "closed" and closed.ended_at == 50.0
    with pytest.raises(StoreError, match="not open"):
        store.close_round(fleet=FLEET, round_index=0)
    store.open_round(fleet=FLEET, round_index=1, model_version=5, selected=["d1"], quorum=1)
    store.close_round(fleet=FLEET, round_index=1, state="abandoned")
    assert [r.state for r in store.rounds(FLEET)] == ["closed", "abandoned"]
    d1 = store.device("d1")
    assert d1 is not None and d1.history.selections == 0  # the registry's to record
    assert store.mark_seen("d2", online=False, at=7.0)
    assert not store.mark_seen("ghost", online=True)
    assert [d.device_id for d in store.devices(online_only=True)] == ["d1", "d3"]
    assert d1.profile == {"ram_mb": 512}


def test_metrics_and_state_blobs(store: Store) -> None:
    store.record_metrics(fleet=FLEET, round_index=0, values={"loss": 1.5, "acc": 0.3}, at=1.0)
    store.record_metrics(fleet=FLEET, round_index=1, values={"loss": 0.9}, at=2.0)
    assert [m.value for m in store.metrics(FLEET, name="loss")] == [1.5, 0.9]
    with pytest.raises(StoreError):
        store.record_metrics(fleet=FLEET, round_index=2, values={"loss": float("nan")})
    store.put_state("opt", b"\x00\x01")
    store.put_state("opt", b"\x02")
    assert store.get_state("opt") == b"\x02"
    assert store.get_state("missing") is None


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_atomic_write(store: Store) -> None:
    params = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    rec = store.save_checkpoint(fleet=FLEET, model_version=3, params=params)
    assert rec.path.exists() and rec.path.parent == store.checkpoint_dir
    assert [p.name for p in store.checkpoint_dir.iterdir()] == [rec.path.name]  # no temp left
    loaded_rec, loaded = store.load_checkpoint(FLEET)
    assert loaded_rec == rec
    np.testing.assert_array_equal(loaded, params)
    store.save_checkpoint(fleet=FLEET, model_version=4, params=params + 1)
    assert store.load_checkpoint(FLEET)[0].model_version == 4
    np.testing.assert_array_equal(store.load_checkpoint(FLEET, model_version=3)[1], params)


def test_failed_checkpoint_write_keeps_previous(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = np.ones(16, np.float32)
    store.save_checkpoint(fleet=FLEET, model_version=1, params=old)

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save_checkpoint(fleet=FLEET, model_version=1, params=old * 2)
    monkeypatch.undo()
    assert len(list(store.checkpoint_dir.iterdir())) == 1  # temp file removed
    np.testing.assert_array_equal(store.load_checkpoint(FLEET)[1], old)


def test_corrupted_checkpoint_is_detected(store: Store) -> None:
    params = np.arange(64, dtype=np.float32)
    rec = store.save_checkpoint(fleet=FLEET, model_version=1, params=params)
    data = bytearray(rec.path.read_bytes())
    data[-5] ^= 0x01  # one bit in the weights
    rec.path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="sha256"):
        store.load_checkpoint(FLEET)
    rec.path.write_bytes(bytes(data[:40]))  # truncated
    with pytest.raises(CheckpointCorrupt):
        store.load_checkpoint(FLEET)
    rec.path.unlink()
    with pytest.raises(CheckpointCorrupt, match="unreadable"):
        store.load_checkpoint(FLEET)
    with pytest.raises(StoreError, match="no checkpoint"):
        store.load_checkpoint("other-fleet")


def test_checkpoint_closes_round_with_optimizer_state(store: Store) -> None:
    store.open_round(fleet=FLEET, round_index=0, model_version=0, selected=["d1"], quorum=1)
    assert store.add_round_update(_key("d1"), b"body", {"samples": 10})
    opt = make_server_optimizer("fedadam")
    x = opt.step(np.zeros(8, np.float32), np.ones(8, np.float32))
    store.save_checkpoint(
        fleet=FLEET, model_version=1, params=x, states={"server_opt": opt.to_bytes()}, close_round=0
    )
    rnd = store.round(FLEET, 0)
    assert rnd is not None and rnd.state == "closed"
    assert list(store.round_updates(FLEET, 0)) == []  # bodies cleared with the round
    assert not store.add_round_update(_key("d1"), b"late")  # key still remembered
    restored = make_server_optimizer("fedadam")
    blob = store.get_state("server_opt")
    assert blob is not None
    restored.load_bytes(blob)
    np.testing.assert_array_equal(restored.state_dict()["v"], opt.state_dict()["v"])


def test_odd_fleet_names_make_safe_file_names(store: Store) -> None:
    rec = store.save_checkpoint(fleet="../../etc/x y", model_version=0, params=np.zeros(2, "f4"))
    assert rec.path.parent == store.checkpoint_dir and "/" not in rec.path.name


# --------------------------------------------------------------------------- resume


def test_open_round_updates_survive_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ups = [rng.normal(size=50).astype(np.float32) for _ in range(6)]
    samples = [float(s) for s in rng.integers(1, 100, 6)]
    straight = StreamingAccumulator(size=50)
    with Store(tmp_path / "agg.db") as s:
        s.open_round(fleet=FLEET, round_index=2, model_version=2, selected=[], quorum=3)
        for i, (u, n) in enumerate(zip(ups, samples, strict=True)):
            assert s.add_round_update(_key(f"d{i}", round_index=2), u.tobytes(), {"samples": n})
            straight.add(u, n)
        assert not s.add_round_update(_key("d0", round_index=2), ups[0].tobytes(), {})
    with Store(tmp_path / "agg.db") as s:  # "restart"
        open_rounds = s.rounds(FLEET, state="open")
        assert [r.round for r in open_rounds] == [2]
        resumed = StreamingAccumulator(size=50)
        stored = list(s.round_updates(FLEET, 2))
        assert [u.key.device_id for u in stored] == [f"d{i}" for i in range(6)]
        for row in stored:
            resumed.add(np.frombuffer(row.body, dtype=np.float32), float(row.meta["samples"]))
    np.testing.assert_array_equal(resumed.result(), straight.result())


def test_round_updates_pages_through_many_rows(store: Store) -> None:
    for i in range(150):
        store.add_round_update(_key(f"d{i:03d}"), i.to_bytes(2, "big"))
    got = [int.from_bytes(u.body, "big") for u in store.round_updates(FLEET, 0)]
    assert got == list(range(150))


_CHILD = textwrap.dedent(
    """
    import sys
    from cloud_aggregator._store import Store, UpdateKey

    store = Store(sys.argv[1])
    store.open_round(fleet="f", round_index=0, model_version=0, selected=[], quorum=1)
    print("READY", flush=True)
    for i in range(1_000_000):
        key = UpdateKey(fleet="f", round=0, device_id=f"d{i}", attempt=0)
        body = i.to_bytes(4, "big") * 4096  # 16 KiB, content tied to the key
        if store.add_round_update(key, body, {"i": i}):
            print(f"COMMITTED d{i}", flush=True)
    """
)


def test_sigkill_mid_writes_leaves_exactly_the_committed_updates(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        assert proc.stdout.readline().strip() == "READY"
        while len(printed) < 300:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "child died"
            printed.append(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        rest = proc.stdout.read()  # the buffered object, not communicate(): it skips buffers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    printed += [line.split()[1] for line in rest.splitlines() if line.startswith("COMMITTED")]

    with Store(db) as s:
        assert s._read("PRAGMA integrity_check") == [("ok",)]
        keys = [k.device_id for k in s.accepted_keys("f", 0)]
        bodies = {u.key.device_id: u.body for u in s.round_updates("f", 0)}
    # Every printed key committed. At most one more: the one whose commit finished
    # just before the kill landed, ahead of its print.
    n = len(printed)
    assert printed == [f"d{i}" for i in range(n)]
    assert keys[:n] == printed and keys[n:] in ([], [f"d{n}"])
    assert set(bodies) == set(keys)  # no key without its body, no body without its key
    for device_id, body in bodies.items():
        i = int(device_id[1:])
        assert body == i.to_bytes(4, "big") * 4096
